"""Sequence classification: single texts or text pairs -> one label each.

The head is BERT's (Devlin et al. 2019, section 4.1): the pooler (dense + tanh on the [CLS]
vector), dropout, then a linear layer to the labels. `pooling="mean"` instead averages the real
tokens' vectors, which suits checkpoints trained for sentence embeddings (MiniLM from
sentence-transformers was trained with mean pooling; its pooler was never trained).

The label map comes from the training data (sorted, numeric labels numerically) and is saved in
best/task.json, so predictions name the same labels. `predict --text` on a model of text pairs
takes 'TEXT ||| PAIR', as QA takes 'QUESTION ||| CONTEXT'.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from minibert.model import mean_pool
from train.data.examples import (Batched, DataError, Example, build_label_map, label_key,
                                 read_examples)
from train.tasks.metrics import classification_metrics
from train.tasks.task import batching, run_batches, split_files


def sentence_vector(bert, batch, pooling):
    """One vector per input, (B, C): BERT's pooler on [CLS], or the mean of the real tokens."""
    mask = batch["attention_mask"]
    h = bert(batch["input_ids"], mask, batch["token_type_ids"])  # (B, T, C)
    return bert.pool(h) if pooling == "cls" else mean_pool(h, mask)


def new_linear(n_in, n_out):
    """A fresh output layer with BERT's initialisation: N(0, 0.02) weights, zero bias."""
    layer = nn.Linear(n_in, n_out)
    nn.init.normal_(layer.weight, std=0.02)
    nn.init.zeros_(layer.bias)
    return layer


class ClassificationHead(nn.Module):
    def __init__(self, hidden_size, n_labels, pooling, dropout):
        super().__init__()
        self.pooling = pooling
        self.drop = nn.Dropout(dropout)
        self.out = new_linear(hidden_size, n_labels)

    def forward(self, bert, batch):
        x = sentence_vector(bert, batch, self.pooling)  # (B, C)
        logits = self.out(self.drop(x))  # (B, n_labels)
        out = {"logits": logits}
        if "labels" in batch:
            out["loss"] = F.cross_entropy(logits, batch["labels"])
        return out


class EncodedDataset(Batched):
    """Examples tokenized once; batches padded to their own longest sequence."""

    def __init__(self, examples, tokenizer, max_length, targets, batch_size, seed=0,
                 group_by_length=False, shuffle=False):
        super().__init__(batch_size, seed, group_by_length, shuffle)
        texts = [e.text for e in examples]
        pairs = [e.pair for e in examples] if examples[0].pair is not None else None
        self.examples = examples
        self.encodings = tokenizer.encodings(texts, pairs, max_length)
        self.targets = targets  # one number per example, or None for unlabelled inputs
        self.tokenizer = tokenizer
        self.lengths = [len(e.ids) for e in self.encodings]

    def collate(self, idx):
        batch = self.tokenizer.collate([self.encodings[i] for i in idx])
        if self.targets is not None:
            batch["labels"] = torch.tensor([self.targets[i] for i in idx])
        return batch


def encode_splits(cfg, tok, read, to_target):
    """Read train/dev/test with `read(path, split)`, encode targets with `to_target`."""
    data = {}
    for split, path in split_files(cfg):
        ex = read(path, split)
        data[split] = EncodedDataset(ex, tok, cfg.max_length, [to_target(e.target) for e in ex],
                                     *batching(cfg, split))
    return data


def with_pair(ex, row):
    """A prediction row of example `ex`, with its second text last when it has one."""
    return row if ex.pair is None else {**row, "pair": ex.pair}


class ClassificationTask:
    name = "classification"
    default_metric = "accuracy"
    # what evaluate() reports that --metric may choose (the confusion matrix is no score)
    metrics = ("accuracy", "f1", "precision", "recall", "macro_f1", "macro_precision",
               "macro_recall", "loss")

    def __init__(self, meta):
        self.meta = meta
        self.labels = meta["labels"]
        self.index = {lab: i for i, lab in enumerate(self.labels)}

    @classmethod
    def from_data(cls, cfg, tok):
        fields = (cfg.text_field, cfg.pair_field, cfg.label_field)

        def present(label):  # '' or ' ' would become a class of its own
            return "empty label" if not str(label).strip() else None
        train_ex, _ = read_examples(cfg.train, *fields, cfg.skip_bad_rows, check_target=present)
        label_map = build_label_map(train_ex)

        def known(label):
            return present(label) or (None if label_key(label) in label_map else
                                      f"label {label!r} does not occur in the training data "
                                      f"{cfg.train}")

        def read(path, split):
            if split == "train":
                return train_ex
            return read_examples(path, *fields, cfg.skip_bad_rows, check_target=known)[0]

        task = cls({"task": cls.name, "labels": list(label_map), "pooling": cfg.pooling,
                    "max_length": cfg.max_length, "text_field": cfg.text_field,
                    "pair_field": cfg.pair_field})
        return task, encode_splits(cfg, tok, read, lambda t: task.index[label_key(t)])

    @property
    def uses_pooler(self):
        return self.meta["pooling"] == "cls"

    def build_head(self, hidden_size, dropout):
        return ClassificationHead(hidden_size, len(self.labels), self.meta["pooling"], dropout)

    def evaluate(self, model, ds, device):
        logits = torch.stack(run_batches(model, ds, device,
                                         lambda out, idx: out["logits"].float().cpu()))
        gold = torch.tensor(ds.targets)
        m = classification_metrics(gold.tolist(), logits.argmax(-1).tolist(), len(self.labels))
        m["loss"] = F.cross_entropy(logits, gold).item()
        return m

    def read_inputs(self, texts, path, tok, batch_size, where="--text {}"):
        if texts:
            examples = [self._text_input(t, where.format(i + 1)) for i, t in enumerate(texts)]
        else:
            examples, _ = read_examples(path, self.meta["text_field"], self.meta["pair_field"], None)
        return EncodedDataset(examples, tok, self.meta["max_length"], None, batch_size)

    def _text_input(self, text, where):
        """An Example from a --text (or stdin line): 'TEXT ||| PAIR' for a model of text pairs,
        as QA reads 'QUESTION ||| CONTEXT'; the second text is never dropped silently."""
        if self.meta["pair_field"] is None:
            return Example(text, None, None, where)
        first, sep, pair = (x.strip() for x in text.partition("|||"))
        if not (sep and first and pair):
            raise DataError(f"{where}: this model reads text pairs ({self.meta['pair_field']!r}); "
                            "write 'TEXT ||| PAIR'")
        return Example(first, pair, None, where)

    def predict(self, model, ds, device):
        probs = run_batches(model, ds, device,
                            lambda out, idx: out["logits"].float().softmax(-1).cpu())
        return [with_pair(ex, {"text": ex.text, "label": self.labels[int(p.argmax())],
                               "probabilities": {lab: round(float(q), 5)
                                                 for lab, q in zip(self.labels, p)}})
                for ex, p in zip(ds.examples, probs)]
