"""The teacher's soft targets for the whole training set, computed once, before training.

When only the soft-target loss is on, the teacher's output for a training example never changes:
the teacher is frozen and runs in eval mode (no dropout), so its outputs are exact. They are
computed in one pass, saved in RUN/teacher_logits.safetensors, and every training batch takes
its rows by example index; `--resume` reads the file back. This is faster than running the
teacher beside the student: that repeats the teacher's forward over the training set in every
epoch (E epochs, E passes), the cache runs it once, and each training step then runs the student
alone, with no teacher activations in memory beside it.

Examples are aligned by index, not by token: the teacher reads the student's examples, in their
order, with its own tokenizer (the student may have another), so row i is example i for both.
For tagging the teacher's scores are kept per word (by the word's index in the sentence), so a
student that splits words into other pieces still finds each word's row; a word the teacher's
truncation cut has no scores (`valid` False) and is left out of the soft loss.

The file holds `targets` (R, K) float32, `offsets` (N + 1,) int64 (example i owns rows
offsets[i]:offsets[i + 1]: one row for a sentence, one per word for tagging) and `valid` (R,)
bool. Limit: in a data-parallel job every process makes the pass itself (rank 0 writes the file).
"""

import torch

from minibert.checkpoint import read_safetensors
from minibert.errors import UserError
from minibert.io import atomic_save_safetensors
from train.distill.loss import soft_outputs
from train.tasks.classification import EncodedDataset
from train.tasks.tagging import TaggedDataset
from train.tasks.task import run_batches

CACHE = "teacher_logits.safetensors"


def word_ids(ds, i):
    """The words of tagging example i that have a first piece, in order: row j of its word
    scores (B, W, K) is word word_ids(ds, i)[j] (train/tasks/tagging.py)."""
    return [w for _, w in ds.first[i]]


def retokenized(ds, tok, max_length, batch_size):
    """The same examples in the same order, tokenized by `tok`: the teacher's view of them."""
    if isinstance(ds, TaggedDataset):
        return TaggedDataset(ds.sents, tok, max_length, ds.tag_index, batch_size)
    return EncodedDataset(ds.examples, tok, max_length, ds.targets, batch_size)


def teacher_pass(teacher, kind, ds, device):
    """{targets, offsets, valid} (see the docstring) of the teacher's outputs on every example
    of `ds`, in eval mode and fp32."""
    def rows(out, idx):
        scores, _ = soft_outputs(kind, out)
        scores = scores.float().cpu()
        if kind != "tokens":  # one row per example: logits (K,) or a prediction
            return [s.view(1, -1) for s in scores]
        per_word = []
        for b, i in enumerate(idx):  # (n_words, K), zero rows where the teacher has no piece
            table = torch.zeros(len(ds.sents[i][0]), scores.size(-1))
            ws = word_ids(ds, i)
            table[ws] = scores[b, :len(ws)]
            per_word.append(table)
        return per_word
    tables = run_batches(teacher, ds, device, rows)
    valid = [torch.ones(len(t), dtype=torch.bool) for t in tables]
    if kind == "tokens":
        for i, v in enumerate(valid):
            v[:] = False
            v[word_ids(ds, i)] = True
    counts = torch.tensor([0] + [len(t) for t in tables])
    return {"targets": torch.cat(tables), "offsets": torch.cumsum(counts, 0),
            "valid": torch.cat(valid)}


def save_targets(path, cache, teacher):
    atomic_save_safetensors(path, cache, metadata={"teacher": teacher})


def load_targets(path, n_examples):
    cache = read_safetensors(path)
    if set(cache) != {"targets", "offsets", "valid"} or len(cache["offsets"]) != n_examples + 1:
        raise UserError(f"{path}: not the teacher's outputs on these {n_examples} training "
                        "examples; delete it to have them computed again")
    return cache


class CachedTargets:
    """The training data with the teacher's cached soft targets added to each batch:
    `teacher_targets`, (B, K) logits, (B,) predictions or (B, W, K) word scores, and for tagging
    `teacher_mask` (B, W), True where the teacher scored the word."""

    def __init__(self, ds, kind, cache):
        self.ds, self.kind = ds, kind
        self.targets, self.offsets, self.valid = cache["targets"], cache["offsets"], cache["valid"]
        self.lengths = ds.lengths
        # what the loss averages over, as the wrapped data counts it (a tagger's words), so that
        # accumulated micro-batches weigh as without the cache (train/loop/accumulate.py)
        self.count_items = getattr(ds, "count_items", None)

    @property
    def batch_size(self):  # the trainer's planning sets it, for the dataset's batches()
        return self.ds.batch_size

    @batch_size.setter
    def batch_size(self, n):
        self.ds.batch_size = n

    def batches(self, epoch):
        return self.ds.batches(epoch)

    def rows(self, i):
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.targets[a:b], self.valid[a:b]

    def collate(self, idx):
        batch = self.ds.collate(idx)
        if self.kind == "classification":
            batch["teacher_targets"] = torch.stack([self.rows(i)[0][0] for i in idx])  # (B, K)
        elif self.kind == "regression":
            batch["teacher_targets"] = torch.stack([self.rows(i)[0][0, 0] for i in idx])  # (B,)
        else:  # padded to W, the most words in a row, as the student's head pads its words
            words = [word_ids(self.ds, i) for i in idx]
            W = max(max(len(ws) for ws in words), 1)
            K = self.targets.size(-1)
            t = torch.zeros(len(idx), W, K)  # (B, W, K)
            m = torch.zeros(len(idx), W, dtype=torch.bool)  # (B, W)
            for b, (i, ws) in enumerate(zip(idx, words)):
                table, valid = self.rows(i)
                t[b, :len(ws)], m[b, :len(ws)] = table[ws], valid[ws]
            batch["teacher_targets"], batch["teacher_mask"] = t, m
        return batch
