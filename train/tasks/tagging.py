"""Token tagging (named entities, part of speech): one tag per word, `--task tokens`.

Input is CoNLL-style text (`.conll`/`.txt`: a token and its tag per line, the tag in the last
column; a blank or whitespace-only line between sentences) or JSONL rows with `tokens` and `tags`
lists. Words are split into word pieces; as in BERT's NER experiments (Devlin et al. 2019, 5.3)
the label sits on the first piece of each word and the other pieces get -100, which the loss
ignores. The head is dropout + linear(C, K) on every piece, read at first pieces only; with
`--crf` a linear-chain CRF (tasks/crf.py) scores whole tag sequences over those first pieces, with
`--bio-constraints` forbidding invalid BIO transitions.

Decoding repairs invalid BIO (I-X not continuing an X entity becomes B-X, train/tasks/seqeval.py).
Scoring: tag sets that are BIO get strict entity precision/recall/F1 (`f1` is the default
metric); other tag sets (POS) get token accuracy, reported also as `f1` (micro-F1 over tokens
equals accuracy), so `--metric f1` fits both.

Limits: words beyond --max-length pieces are cut for training and predicted as `O` (or the most
frequent training tag when there is no `O`) at evaluation, where they still count. A word that
the tokenizer turns into no pieces at all (a lone control character) is treated the same way.
For `predict --text`, words are found by BERT's own pre-tokenizer (whitespace and punctuation).
"""

import json
import os
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F

from train.tasks.classification import new_linear
from train.tasks.crf import CRF, bio_penalties
from train.data.examples import Batched, DataError, read_lines
from train.tasks.seqeval import entity_scores, is_bio, repair_bio, spans, token_scores
from train.tasks.task import batching, run_batches, split_files


def read_tagged(path, need_tags=True):
    """[(tokens, tags or None, 'file:line')] from a .jsonl or CoNLL-style (.conll/.txt) file."""
    ext = os.path.splitext(path)[1].lower()
    out = []
    lines = []
    for n, line in read_lines(path):
        if isinstance(line, DataError):
            raise line
        lines.append(line)
    if ext == ".jsonl":
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: not a JSON object")
            toks, tags = row.get("tokens"), row.get("tags")
            if not isinstance(toks, list) or not toks:
                raise DataError(f"{path}:{n}: 'tokens' must be a non-empty list")
            if need_tags and (not isinstance(tags, list) or len(tags) != len(toks)):
                raise DataError(f"{path}:{n}: 'tags' must be a list as long as 'tokens' "
                                f"({len(toks)})")
            if need_tags and not all(isinstance(t, str) for t in tags):
                # integer tags (Hugging Face's ner_tags) index a label list this file lacks
                raise DataError(f"{path}:{n}: 'tags' must be tag names such as 'B-PER', not "
                                f"{next(t for t in tags if not isinstance(t, str))!r}; map "
                                "integer ids to their names first")
            out.append(([str(t) for t in toks], tags if need_tags else None, f"{path}:{n}"))
    elif ext in (".conll", ".txt"):
        toks, tags, start = [], [], 1
        for n, line in enumerate(lines + [""], 1):
            cols = line.split()
            if not cols or cols[0] == "-DOCSTART-":  # sentence break (or CoNLL's doc marker)
                if toks:
                    out.append((toks, tags if need_tags else None, f"{path}:{start}"))
                toks, tags, start = [], [], n + 1
                continue
            if need_tags and len(cols) < 2:
                raise DataError(f"{path}:{n}: expected 'token tag', got {line!r}")
            toks.append(cols[0])
            tags.append(cols[-1])
    else:
        raise DataError(f"{path}: unknown format {ext!r}; use .jsonl (tokens, tags) or "
                        ".conll/.txt (token and tag per line)")
    if not out:
        raise DataError(f"{path}: no sentences")
    return out


def word_offsets(words):
    """Character (start, end) of each word in ' '.join(words)."""
    offs, pos = [], 0
    for w in words:
        offs.append((pos, pos + len(w)))
        pos += len(w) + 1
    return offs


class TaggedDataset(Batched):
    """Sentences as word pieces, with the position of each word's first piece."""

    def __init__(self, sents, tok, max_length, tag_index, batch_size, seed=0,
                 group_by_length=False, shuffle=False):
        super().__init__(batch_size, seed, group_by_length, shuffle)
        self.sents = sents  # [(words, tags or None, where, text, word char offsets)]
        tok.tok.enable_truncation(max_length=max_length)
        try:
            self.encodings = tok.tok.encode_batch([s[0] for s in sents], is_pretokenized=True)
        finally:
            tok.tok.no_truncation()
        self.tok, self.tag_index = tok, tag_index
        self.lengths = [len(e.ids) for e in self.encodings]
        # first[i]: token position of the first piece of each word that has one, and that word
        self.first = []
        for e in self.encodings:
            seen, pos = set(), []
            for t, w in enumerate(e.word_ids):
                if w is not None and w not in seen:
                    seen.add(w)
                    pos.append((t, w))
            self.first.append(pos)

    def collate(self, idx):
        batch = self.tok.collate([self.encodings[i] for i in idx])
        B, T = batch["input_ids"].shape
        first = torch.zeros(B, T, dtype=torch.bool)
        labels = torch.full((B, T), -100, dtype=torch.long)  # -100: ignored by the loss
        for b, i in enumerate(idx):
            tags = self.sents[i][1]
            for t, w in self.first[i]:
                first[b, t] = True
                if tags is not None:
                    labels[b, t] = self.tag_index[tags[w]]
        batch["first"] = first
        if self.sents[idx[0]][1] is not None:
            batch["labels"] = labels
        return batch

    def count_items(self, batch):
        """What a softmax tagger's loss is a mean over: the tagged words. Accumulated batches are
        weighted by it (train/loop/accumulate.py); a CRF's loss is per sentence, and its task
        sets this to None."""
        return int((batch["labels"] != -100).sum())


class TokenHead(nn.Module):
    def __init__(self, hidden_size, n_tags, dropout, crf=None):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.out = new_linear(hidden_size, n_tags)
        self.crf = crf

    def forward(self, bert, batch):
        h = bert(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])  # (B, T, C)
        logits = self.out(self.drop(h))  # (B, T, K)
        K = logits.shape[-1]
        # Gather the first pieces to the front of each row, in order: a stable sort that puts
        # first pieces (key 0) before the rest (key 1). W = the most words in a row.
        first = batch["first"]  # (B, T) bool
        n_words = first.sum(1)  # (B,)
        W = max(int(n_words.max()), 1)
        pos = torch.argsort((~first).to(torch.int8), dim=1, stable=True)[:, :W]  # (B, W)
        word_logits = logits.gather(1, pos.unsqueeze(2).expand(-1, -1, K))  # (B, W, K)
        word_mask = torch.arange(W, device=first.device) < n_words.unsqueeze(1)  # (B, W)
        out = {"word_logits": word_logits, "word_mask": word_mask}
        if "labels" in batch:
            tags = batch["labels"].gather(1, pos)  # (B, W), -100 at padding
            if self.crf is None:  # the same as cross-entropy over (B, T) with ignore_index=-100
                out["loss"] = F.cross_entropy(word_logits.reshape(-1, K).float(),
                                              tags.reshape(-1), ignore_index=-100)
            else:
                out["loss"] = self.crf.nll(word_logits, tags.clamp(min=0), word_mask)
        return out

    def decode(self, out):
        """Tag ids per row, one per word that has a first piece."""
        if self.crf is not None:
            return self.crf.viterbi(out["word_logits"], out["word_mask"])
        best = out["word_logits"].argmax(-1).tolist()  # (B, W)
        return [b[:n] for b, n in zip(best, out["word_mask"].sum(1).tolist())]


class TokenTask:
    name = "tokens"
    default_metric = "f1"
    # what --metric may choose: the scores BIO and other tag sets both report
    metrics = ("f1", "precision", "recall", "accuracy", "loss")
    uses_pooler = False  # every token's vector is tagged; there is no sentence vector

    def __init__(self, meta):
        self.meta = meta
        self.tags = meta["labels"]  # the tag set, in head output order
        self.index = {t: i for i, t in enumerate(self.tags)}
        self.bio = meta["scheme"] == "bio"
        self.fallback = meta["fallback_tag"]  # for words that got no piece (see the docstring)

    @classmethod
    def from_data(cls, cfg, tok):
        sents = {s: read_tagged(path) for s, path in split_files(cfg)}
        counts = Counter(t for _, tags, _ in sents["train"] for t in tags)
        tags = sorted(counts, key=lambda t: (t != "O", t[2:], t))  # O first, B-X next to I-X
        for split, rows in sents.items():
            for words, ts, where in rows:
                unseen = [t for t in ts if t not in counts]
                if unseen:
                    raise DataError(f"{where}: tag {unseen[0]!r} does not occur in the training "
                                    f"data {cfg.train}")
        bio = is_bio(tags)
        if cfg.bio_constraints and not bio:
            raise ValueError("--bio-constraints needs BIO tags (O, B-X, I-X); the training data "
                             f"has e.g. {[t for t in tags if not is_bio([t])][:3]}")
        task = cls({"task": cls.name, "labels": tags, "scheme": "bio" if bio else "tags",
                    "crf": cfg.crf, "bio_constraints": cfg.bio_constraints,
                    "fallback_tag": "O" if "O" in counts else counts.most_common(1)[0][0],
                    "max_length": cfg.max_length})
        return task, {s: task._dataset(rows, tok, *batching(cfg, s)) for s, rows in sents.items()}

    def _dataset(self, rows, tok, batch_size, seed=0, group=False, shuffle=False):
        sents = [(w, t, where, " ".join(w), word_offsets(w)) for w, t, where in rows]
        ds = TaggedDataset(sents, tok, self.meta["max_length"], self.index, batch_size, seed,
                           group, shuffle)
        if self.meta["crf"]:
            ds.count_items = None  # a CRF's loss is a mean over sentences: the examples
        return ds

    def build_head(self, hidden_size, dropout):
        crf = None
        if self.meta["crf"]:
            crf = CRF(len(self.tags), bio_penalties(self.tags) if self.meta["bio_constraints"]
                      else None)
        return TokenHead(hidden_size, len(self.tags), dropout, crf)

    def _decode_all(self, model, ds, device):
        """(tag strings per sentence, one per word; mean loss or None)."""
        head = model.head

        per_word = not self.meta["crf"]  # a softmax loss is a mean over words, a CRF's over rows

        def fn(out, idx):
            loss = out["loss"].item() if "loss" in out else None
            # each sentence's share of its batch's weight in the mean: the batch's words or 1
            w = sum(len(ds.first[i]) for i in idx) / len(idx) if per_word else 1.0
            return [(ids, loss, w) for ids in head.decode(out)]
        res = run_batches(model, ds, device, fn)
        seqs = []
        for (words, *_), (ids, *_), first in zip(ds.sents, res, ds.first):
            tags = [self.fallback] * len(words)
            for (_, w), i in zip(first, ids):
                tags[w] = self.tags[i]
            seqs.append(repair_bio(tags) if self.bio else tags)
        # the mean over the whole set, whatever the batch size: batch means weighted by their items
        loss = None if res[0][1] is None else \
            sum(r[1] * r[2] for r in res) / max(sum(r[2] for r in res), 1e-12)
        return seqs, loss

    def evaluate(self, model, ds, device):
        pred, loss = self._decode_all(model, ds, device)
        gold = [s[1] for s in ds.sents]
        m = entity_scores(gold, pred) if self.bio else token_scores(gold, pred)
        m["loss"] = loss
        return m

    def read_inputs(self, texts, path, tok, batch_size, where="--text {}"):
        if texts:
            sents = []  # a text without words (a blank line) is answered with no tokens
            for i, text in enumerate(texts):
                words = tok.tok.pre_tokenizer.pre_tokenize_str(text)  # [(word, (start, end))]
                sents.append(([w for w, _ in words], None, where.format(i + 1), text,
                              [o for _, o in words]))
            return TaggedDataset(sents, tok, self.meta["max_length"], self.index, batch_size)
        return self._dataset(read_tagged(path, need_tags=False), tok, batch_size)

    def predict(self, model, ds, device):
        pred, _ = self._decode_all(model, ds, device)
        rows = []
        for (words, _, _, text, offs), tags in zip(ds.sents, pred):
            row = {"text": text, "tokens": [{"text": w, "tag": t, "start": o[0], "end": o[1]}
                                            for w, t, o in zip(words, tags, offs)]}
            if self.bio:  # entities with their type and character span in `text`
                row["entities"] = [{"type": typ, "start": offs[a][0], "end": offs[b][1],
                                    "text": text[offs[a][0]:offs[b][1]]}
                                   for typ, a, b in spans(tags)]
            rows.append(row)
        return rows
