"""Sequence classification: single texts or text pairs -> one label each.

The head is BERT's (Devlin et al. 2019, section 4.1): the pooler (dense + tanh on the [CLS]
vector), dropout, then a linear layer to the labels. `pooling="mean"` instead averages the real
tokens' vectors, which suits checkpoints trained for sentence embeddings (MiniLM from
sentence-transformers was trained with mean pooling; its pooler was never trained).

This file holds the head, the tokenized dataset, evaluation and prediction for the task.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minibert.model import mean_pool
from train.data import batch_order, label_key
from train.metrics import classification_metrics


class ClassificationHead(nn.Module):
    def __init__(self, hidden_size, n_labels, pooling, dropout):
        super().__init__()
        self.pooling = pooling
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, n_labels)
        nn.init.normal_(self.out.weight, std=0.02)  # BERT's initialisation
        nn.init.zeros_(self.out.bias)

    def forward(self, bert, hidden, attention_mask):  # (B, T, C) -> (B, n_labels)
        x = bert.pool(hidden) if self.pooling == "cls" else mean_pool(hidden, attention_mask)
        return self.out(self.drop(x))


class TaskModel(nn.Module):
    """A backbone (`bert`) and a task head; `model(batch)` returns the loss and the logits."""

    def __init__(self, bert, head):
        super().__init__()
        self.bert, self.head = bert, head

    def logits(self, batch):
        h = self.bert(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        return self.head(self.bert, h, batch["attention_mask"])  # (B, n_labels)

    def forward(self, batch):
        logits = self.logits(batch)
        return {"loss": F.cross_entropy(logits, batch["labels"]), "logits": logits}


class EncodedDataset:
    """Examples tokenized once; batches padded to their own longest sequence."""

    def __init__(self, examples, tokenizer, max_length, label_map, batch_size, seed,
                 group_by_length=False, shuffle=True):
        texts = [e.text for e in examples]
        pairs = [e.pair for e in examples] if examples[0].pair is not None else None
        self.encodings = tokenizer.encodings(texts, pairs, max_length)
        self.labels = [label_map[label_key(e.target)] for e in examples] if label_map else None
        self.tokenizer = tokenizer
        self.batch_size, self.seed = batch_size, seed
        self.group_by_length, self.shuffle = group_by_length, shuffle
        self.lengths = [len(e.ids) for e in self.encodings]

    def __len__(self):
        return len(self.encodings)

    def batches(self, epoch):
        return batch_order(self.lengths, self.batch_size, self.seed, epoch,
                           self.group_by_length, self.shuffle)

    def collate(self, idx):
        batch = self.tokenizer.collate([self.encodings[i] for i in idx])
        if self.labels is not None:
            batch["labels"] = torch.tensor([self.labels[i] for i in idx])
        return batch


@torch.no_grad()
def predict_logits(model, dataset, device):
    """Logits for every example, in dataset order (batches sorted by length for speed)."""
    model.eval()
    order = sorted(range(len(dataset)), key=lambda i: dataset.lengths[i])
    out = [None] * len(dataset)
    for s in range(0, len(order), dataset.batch_size):
        idx = order[s:s + dataset.batch_size]
        batch = {k: v.to(device) for k, v in dataset.collate(idx).items()}
        logits = model.logits(batch).float().cpu()
        for i, row in zip(idx, logits):
            out[i] = row
    return torch.stack(out)  # (N, n_labels)


def evaluate(model, dataset, device):
    logits = predict_logits(model, dataset, device)
    gold = torch.tensor(dataset.labels)
    loss = F.cross_entropy(logits, gold).item()
    m = classification_metrics(gold.tolist(), logits.argmax(-1).tolist(), logits.size(1))
    m["loss"] = loss
    if not math.isfinite(loss):
        m["loss"] = float("inf")
    return m
