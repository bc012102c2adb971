"""Extractive question answering, SQuAD v1.1 style: the answer is a span of the context.

Following BERT (Devlin et al. 2019, section 4.2): the input is `[CLS] question [SEP] context
[SEP]`, and a linear layer gives each token a start and an end score. A context longer than
--max-length is cut into overlapping windows; `--doc-stride` is the number of context tokens
consecutive windows share (what the `tokenizers` library calls stride, and what transformers'
QA example passes as `doc_stride`). In BERT's original code the name meant the step between
window starts instead; with max length 384 and stride 128 both give 2-3 windows for a 600-token
passage. A training window whose context does not hold the whole answer is taught to point at
[CLS] (index 0) for both start and end, so the model learns to score "not here" low.

At evaluation every window of a question is searched: the 20 best starts and the 20 best ends
inside the context part, start <= end, at most --max-answer-len tokens; the span with the highest
start + end score over all windows wins, and its characters come from the token offsets, so the
answer is a verbatim slice of the context. Scores are SQuAD's EM and F1 (train/tasks/squad_eval.py).

Input: SQuAD-format JSON ({"data": [{"paragraphs": [{"context", "qas": [{"id", "question",
"answers": [{"text", "answer_start"}]}]}]}]}). `predict --text "QUESTION ||| CONTEXT"` also works.

Limits: no unanswerable questions (SQuAD 2.0); the question is never truncated (a question too
long for --max-length is an error naming it); training uses the first gold answer.
"""

import json
import unicodedata
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minibert.io import load_json
from train.tasks.classification import new_linear
from train.data.examples import Batched, DataError
from train.tasks.squad_eval import squad_scores
from train.tasks.task import batching, run_batches, split_files

N_BEST = 20  # candidates per window for start and for end (BERT's reference code uses 20)


@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list  # [(text, char start)], empty for unlabelled inputs
    where: str


KINDS = {str: "a string", int: "an integer", list: "a list"}  # for error messages


def _field(obj, key, kind, where):
    """obj[key], which must be a `kind` (or one of a tuple of kinds); a DataError naming `where`
    and the key otherwise."""
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{where}: missing {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):  # True is an int to Python
        kinds = kind if isinstance(kind, tuple) else (kind,)
        raise DataError(f"{where}: {key!r} is {value!r}, not "
                        f"{' or '.join(KINDS[k] for k in kinds)}")
    return value


def read_squad(path, need_answers=True):
    try:
        data = load_json(path)["data"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not SQuAD JSON with a top-level 'data' list ({e})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: not SQuAD JSON with a top-level 'data' list")
    out, seen = [], {}
    for a, article in enumerate(data):
        for p, para in enumerate(_field(article, "paragraphs", list, f"{path}: data[{a}]")):
            at = f"{path}: data[{a}].paragraphs[{p}]"
            ctx = _field(para, "context", str, at)
            for q, qa in enumerate(_field(para, "qas", list, at)):
                where = f"{at}.qas[{q}]"
                qid = str(_field(qa, "id", (str, int), where))
                where += f" (id {qid!r})"
                if qid in seen:
                    raise DataError(f"{where}: id already used at {seen[qid]}; "
                                    "every question needs its own id")
                seen[qid] = where.split(": ", 1)[1]
                question = _field(qa, "question", str, where)
                given = _field(qa, "answers", list, where) if "answers" in qa else []
                answers = [(_field(x, "text", str, f"{where} answers[{k}]"),
                            _field(x, "answer_start", int, f"{where} answers[{k}]"))
                           for k, x in enumerate(given)]
                for text, start in answers:
                    if not text.strip():
                        raise DataError(f"{where}: an empty answer text; give the answer span "
                                        "or leave the question out")
                    if start < 0 or ctx[start:start + len(text)] != text:
                        raise DataError(f"{where}: answer {text!r} is not at character {start} "
                                        "of the context")
                if need_answers and not answers:
                    raise DataError(f"{where}: no answers")
                out.append(QAExample(qid, question, ctx, answers, where))
    if not out:
        raise DataError(f"{path}: no questions")
    return out


def is_mark(c):
    """A combining mark (an accent in NFD text): it belongs to the letter before it."""
    return unicodedata.category(c).startswith("M")


def covered_chars(encodings):
    """The character positions of the context that the context tokens of these windows span."""
    return {c for enc in encodings for (s, e), seq in zip(enc.offsets, enc.sequence_ids)
            if seq == 1 for c in range(s, e)}


def answer_positions(enc, char_start, char_end):
    """Token (start, end) of the answer [char_start, char_end) in this window; (0, 0), i.e.
    [CLS], when the window's context does not hold all of it."""
    ctx = [t for t, s in enumerate(enc.sequence_ids) if s == 1]
    offs = enc.offsets
    if offs[ctx[0]][0] > char_start or offs[ctx[-1]][1] < char_end:
        return 0, 0
    start = max(t for t in ctx if offs[t][0] <= char_start)
    end = min(t for t in ctx if offs[t][1] >= char_end)
    return start, end


class QADataset(Batched):
    """Questions cut into windows; one window is one row of a batch."""

    def __init__(self, examples, tok, max_length, doc_stride, batch_size, seed=0,
                 group_by_length=False, shuffle=False, labelled=True):
        super().__init__(batch_size, seed, group_by_length, shuffle)
        self.examples, self.tok = examples, tok
        # a window is [CLS] question [SEP] context [SEP]; tokenizers panics (an exception no
        # `except Exception` catches) when the context's room is not above the stride
        questions = tok.tok.encode_batch([ex.question for ex in examples],
                                         add_special_tokens=False)
        for ex, q in zip(examples, questions):
            if max_length - 3 - len(q.ids) <= doc_stride:
                raise DataError(f"{ex.where}: the question is {len(q.ids)} tokens, which leaves "
                                f"{max_length - 3 - len(q.ids)} of --max-length {max_length} for "
                                f"the context, not more than --doc-stride {doc_stride}: " + (
                                    "raise --max-length or lower --doc-stride" if labelled else
                                    f"this model reads questions of at most "
                                    f"{max_length - 4 - doc_stride} tokens; shorten it"))
        tok.tok.enable_truncation(max_length=max_length, stride=doc_stride,
                                  strategy="only_second")
        self.windows = []  # (example index, Encoding)
        try:
            for i, ex in enumerate(examples):
                enc = tok.tok.encode(ex.question, ex.context)
                self.windows += [(i, w) for w in [enc] + enc.overflowing]
        finally:
            tok.tok.no_truncation()
        self.positions = None
        if labelled:
            self.positions, covered = [], {}  # covered: made only for an answer ending in a mark
            for i, w in self.windows:
                text, start = examples[i].answers[0]
                # the answer up to its last letter that a token reaches: an accent after it that
                # the normalizer dropped (NFD text) is in no token's offsets
                end = start + len(text)
                while end > start + 1 and is_mark(text[end - start - 1]):
                    if i not in covered:
                        covered[i] = covered_chars(e for j, e in self.windows if j == i)
                    if end - 1 in covered[i]:
                        break  # a mark the tokenizer keeps, as a piece of its own
                    end -= 1
                self.positions.append(answer_positions(w, start, end))
        self.lengths = [len(w.ids) for _, w in self.windows]

    def collate(self, idx):
        batch = self.tok.collate([self.windows[i][1] for i in idx])
        if self.positions is not None:
            batch["start_positions"] = torch.tensor([self.positions[i][0] for i in idx])
            batch["end_positions"] = torch.tensor([self.positions[i][1] for i in idx])
        return batch


class QAHead(nn.Module):
    def __init__(self, hidden_size, dropout):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.out = new_linear(hidden_size, 2)  # start and end score of every token

    def forward(self, bert, batch):
        mask = batch["attention_mask"]
        h = bert(batch["input_ids"], mask, batch["token_type_ids"])  # (B, T, C)
        logits = self.out(self.drop(h)).float()  # (B, T, 2)
        logits = logits.masked_fill(~mask.bool().unsqueeze(-1), -1e4)  # padding is no answer
        start, end = logits.unbind(-1)  # (B, T) each
        out = {"start_logits": start, "end_logits": end}
        if "start_positions" in batch:
            out["loss"] = (F.cross_entropy(start, batch["start_positions"])
                           + F.cross_entropy(end, batch["end_positions"])) / 2
        return out


def best_span(windows, max_answer_len):
    """The best (score, window, start token, end token) over [(Encoding, start (T,), end (T,))]."""
    best = None
    for w, (enc, s, e) in enumerate(windows):
        ctx = torch.tensor([sid == 1 for sid in enc.sequence_ids])
        s = s[:len(ctx)].masked_fill(~ctx, float("-inf"))
        e = e[:len(ctx)].masked_fill(~ctx, float("-inf"))
        k = min(N_BEST, int(ctx.sum()))
        for i in s.topk(k).indices.tolist():
            for j in e.topk(k).indices.tolist():
                if i <= j < i + max_answer_len:
                    score = float(s[i] + e[j])
                    if best is None or score > best[0]:
                        best = (score, w, i, j)
    return best


class QATask:
    name = "qa"
    default_metric = "f1"
    metrics = ("f1", "exact_match", "loss")  # what --metric may choose
    uses_pooler = False  # spans are scored on the token vectors

    def __init__(self, meta):
        self.meta = meta

    @classmethod
    def from_data(cls, cfg, tok):
        task = cls({"task": cls.name, "max_length": cfg.max_length, "doc_stride": cfg.doc_stride,
                    "max_answer_len": cfg.max_answer_len})
        return task, {split: QADataset(read_squad(path), tok, cfg.max_length, cfg.doc_stride,
                                       *batching(cfg, split))
                      for split, path in split_files(cfg)}

    def build_head(self, hidden_size, dropout):
        return QAHead(hidden_size, dropout)

    def _answers(self, model, ds, device):
        """{example index: (text, char start, char end, score)}, and the mean window loss."""
        def fn(out, idx):
            loss = out["loss"].item() if "loss" in out else None
            return [(s.cpu(), e.cpu(), loss) for s, e in zip(out["start_logits"],
                                                              out["end_logits"])]
        res = run_batches(model, ds, device, fn)
        per_example = {}
        for (i, enc), (s, e, _) in zip(ds.windows, res):
            per_example.setdefault(i, []).append((enc, s, e))
        answers = {}
        for i, windows in per_example.items():
            best = best_span(windows, self.meta["max_answer_len"])
            if best is None:  # no context token in any window: nothing to answer from
                answers[i] = ("", 0, 0, float("-inf"))
                continue
            score, w, a, b = best
            offs, ctx = windows[w][0].offsets, ds.examples[i].context
            start, end = offs[a][0], offs[b][1]
            if end < len(ctx) and is_mark(ctx[end]):  # an accent that may belong to its letter
                covered = covered_chars([windows[w][0]])
                while end < len(ctx) and is_mark(ctx[end]) and end not in covered:
                    end += 1  # one the normalizer dropped (NFD text): no token reaches it
            answers[i] = (ctx[start:end], start, end, score)
        loss = None if res[0][2] is None else sum(r[2] for r in res) / len(res)
        return answers, loss

    def evaluate(self, model, ds, device):
        answers, loss = self._answers(model, ds, device)
        preds = {ds.examples[i].id: a[0] for i, a in answers.items()}
        golds = {ex.id: [t for t, _ in ex.answers] for ex in ds.examples}
        m = squad_scores(preds, golds)
        m["loss"] = loss
        return m

    def read_inputs(self, texts, path, tok, batch_size, where="--text {}"):
        if texts:
            examples = []
            for i, t in enumerate(texts):
                if "|||" not in t:
                    raise DataError(f"{where.format(i + 1)}: write 'QUESTION ||| CONTEXT'")
                # start/end index the context without the spaces around it (predict --help)
                q, c = (x.strip() for x in t.split("|||", 1))
                examples.append(QAExample(f"text-{i + 1}", q, c, [], where.format(i + 1)))
        else:
            examples = read_squad(path, need_answers=False)
        return QADataset(examples, tok, self.meta["max_length"], self.meta["doc_stride"],
                         batch_size, labelled=False)

    def predict(self, model, ds, device):
        answers, _ = self._answers(model, ds, device)
        return [{"id": ex.id, "question": ex.question, "answer": answers[i][0],
                 "start": answers[i][1], "end": answers[i][2],
                 "score": round(answers[i][3], 4)} for i, ex in enumerate(ds.examples)]
