"""Entity-level precision, recall and F1 for BIO-tagged sequences, scored strictly as CoNLL does.

A tag is `O`, `B-TYPE` (begins an entity) or `I-TYPE` (continues the entity before it). An entity
is a maximal run `B-X I-X ... I-X`; a predicted entity counts as correct only when the gold has an
entity with the same type and the same first and last token (Tjong Kim Sang & De Meulder 2003,
the CoNLL-2003 shared task; its `conlleval` script). Precision = correct / predicted entities,
recall = correct / gold entities, F1 their harmonic mean, all micro-averaged over the corpus.

A model's output may be an invalid sequence: `I-X` after `O`, at the start, or after `B-Y`/`I-Y`
of another type. `repair_bio` rewrites such an `I-X` as `B-X`, the reading conlleval gives it (an
entity starts there). Spans are read from repaired sequences only, so that rule is written once.

Tag sets that are not BIO (part-of-speech tags) have no entities: `is_bio` detects them, and the
tagging task then scores every token as its own unit, where micro P = R = F1 = accuracy.

Limits: BIO (IOB2) only; no IOBES/BILOU, no IOB1 (where `I-` may start an entity); no per-type
breakdown beyond `per_type` counts.
"""

from train.tasks.metrics import prf


def is_bio(tags):
    """True when every tag is O, B-X or I-X."""
    return all(t == "O" or (t[:2] in ("B-", "I-") and len(t) > 2) for t in tags)


def repair_bio(tags):
    """A valid BIO sequence: each I-X that does not continue an X entity becomes B-X."""
    out, prev_type = [], None  # prev_type: the type of the entity the previous tag is in
    for t in tags:
        if t.startswith("I-") and prev_type != t[2:]:
            t = "B-" + t[2:]
        out.append(t)
        prev_type = None if t == "O" else t[2:]
    return out


def spans(tags):
    """(type, first, last) of every entity, token indices inclusive; the sequence is repaired."""
    out, start = [], None
    tags = repair_bio(tags)
    for i, t in enumerate(tags + ["O"]):  # a final O closes the last entity
        if start is not None and not t.startswith("I-"):
            out.append((tags[start][2:], start, i - 1))
            start = None
        if t.startswith("B-"):
            start = i
    return out


def entity_scores(gold_seqs, pred_seqs):
    """Micro P/R/F1 over lists of tag sequences, plus per-type counts and token accuracy."""
    if len(gold_seqs) != len(pred_seqs):
        raise ValueError(f"{len(gold_seqs)} gold sequences but {len(pred_seqs)} predicted")
    correct = n_pred = n_gold = tok_ok = tok_n = 0
    per_type = {}
    for g, p in zip(gold_seqs, pred_seqs):
        if len(g) != len(p):
            raise ValueError(f"sequence lengths differ: gold {len(g)}, predicted {len(p)}")
        gs, ps = set(spans(g)), set(spans(p))
        correct += len(gs & ps)
        n_pred += len(ps)
        n_gold += len(gs)
        for kind, group in (("gold", gs), ("pred", ps), ("correct", gs & ps)):
            for typ, _, _ in group:
                per_type.setdefault(typ, {"gold": 0, "pred": 0, "correct": 0})[kind] += 1
        # the tags as their entities read them: a gold I-X that starts an entity is B-X, as in
        # a repaired prediction (which it would otherwise never equal)
        tok_ok += sum(a == b for a, b in zip(repair_bio(g), repair_bio(p)))
        tok_n += len(g)
    p, r, f = prf(correct, n_pred, n_gold)
    return {"precision": p, "recall": r, "f1": f, "accuracy": tok_ok / max(tok_n, 1),
            "entities_gold": n_gold, "entities_pred": n_pred, "per_type": per_type}


def token_scores(gold_seqs, pred_seqs):
    """For tag sets without entities: token accuracy, reported also as micro P/R/F1 (equal to it,
    since every token has exactly one gold and one predicted tag)."""
    ok = sum(a == b for g, p in zip(gold_seqs, pred_seqs) for a, b in zip(g, p))
    n = sum(len(g) for g in gold_seqs)
    acc = ok / max(n, 1)
    return {"accuracy": acc, "precision": acc, "recall": acc, "f1": acc}
