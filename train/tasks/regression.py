"""Sentence regression: one real number per text (or text pair), e.g. a sentiment score in [-4, 4].

The head is the classification head with one output (Devlin et al. 2019 fine-tune STS-B the same
way: pooled vector -> linear -> a score, trained with mean squared error). `--standardize-targets`
trains on z = (y - mean) / std with mean and std from the training split; they are saved in
best/task.json and the prediction is mapped back, y = z * std + mean, so every metric and every
prediction is in the data's own units. Standardising makes the MSE of the untrained head about 1
whatever the scale of the targets, so one learning rate suits scores in [0, 1] and in [-4, 4].

Metrics: mse, rmse, Pearson's r and Spearman's rho (Pearson on average ranks, so ties are
handled as in scipy.stats.spearmanr; tests/test_regression.py checks both against scipy).

Limits: one target per example; no loss other than MSE; no clipping of predictions to the
target range.
"""

import math

import torch.nn.functional as F

from train.tasks.classification import (ClassificationHead, ClassificationTask, encode_splits,
                                        sentence_vector, with_pair)
from train.data.examples import read_examples
from train.tasks.task import run_batches


class RegressionHead(ClassificationHead):
    """The classification head with one output, read as a number and trained with MSE."""

    def __init__(self, hidden_size, pooling, dropout):
        super().__init__(hidden_size, 1, pooling, dropout)

    def forward(self, bert, batch):
        x = sentence_vector(bert, batch, self.pooling)  # (B, C)
        pred = self.out(self.drop(x)).squeeze(-1)  # (B,) in standardised units
        out = {"predictions": pred}
        if "labels" in batch:
            out["loss"] = F.mse_loss(pred.float(), batch["labels"])
        return out


# ---------------------------------------------------------------- metrics

def ranks(xs):
    """1-based ranks; tied values share the average of the ranks they span."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1  # the mean of ranks i+1 .. j+1
        i = j + 1
    return r


def pearson(x, y):
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    # A constant prediction has no correlation with anything: report 0, not NaN, so that an
    # untrained model is simply the worst checkpoint instead of breaking "best" comparisons.
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else 0.0


def regression_metrics(gold, pred):
    mse = sum((g - p) ** 2 for g, p in zip(gold, pred)) / max(len(gold), 1)
    return {"mse": mse, "rmse": math.sqrt(mse), "pearson": pearson(gold, pred),
            "spearman": pearson(ranks(gold), ranks(pred))}


# ---------------------------------------------------------------- the task

def to_number(value):
    """The target as a float, or None when it is not a finite number."""
    try:
        y = float(value)
    except (TypeError, ValueError):
        return None
    return y if math.isfinite(y) else None


class RegressionTask:
    name = "regression"
    default_metric = "pearson"
    metrics = ("pearson", "spearman", "mse", "rmse", "loss")  # what --metric may choose

    def __init__(self, meta):
        self.meta = meta
        # (0, 1) when the targets were not standardised
        self.mean, self.std = meta["target_mean"], meta["target_std"]

    @classmethod
    def from_data(cls, cfg, tok):
        fields = (cfg.text_field, cfg.pair_field, cfg.target_field)

        def number(v):
            return None if to_number(v) is not None else \
                f"target {cfg.target_field!r} is {v!r}, not a finite number"

        def read(path, split):
            return read_examples(path, *fields, cfg.skip_bad_rows, check_target=number)[0]

        train_ex = read(cfg.train, "train")
        ys = [to_number(e.target) for e in train_ex]
        mean, std = 0.0, 1.0
        if cfg.standardize_targets:
            mean = sum(ys) / len(ys)
            std = math.sqrt(sum((y - mean) ** 2 for y in ys) / len(ys))
            if std == 0:
                raise ValueError(f"{cfg.train}: every target is {mean}; nothing to regress")
        task = cls({"task": cls.name, "pooling": cfg.pooling, "max_length": cfg.max_length,
                    "text_field": cfg.text_field, "pair_field": cfg.pair_field,
                    "target_field": cfg.target_field, "target_mean": mean, "target_std": std})
        cache = {"train": train_ex}
        return task, encode_splits(cfg, tok, lambda p, s: cache.get(s) or read(p, s),
                                   lambda t: (to_number(t) - mean) / std)

    uses_pooler = ClassificationTask.uses_pooler  # with --pooling cls

    def build_head(self, hidden_size, dropout):
        return RegressionHead(hidden_size, self.meta["pooling"], dropout)

    def _predict_all(self, model, ds, device):
        """Predictions in the data's units, in dataset order."""
        z = run_batches(model, ds, device, lambda out, idx: out["predictions"].float().cpu())
        return [float(v) * self.std + self.mean for v in z]

    def evaluate(self, model, ds, device):
        pred = self._predict_all(model, ds, device)
        gold = [t * self.std + self.mean for t in ds.targets]
        m = regression_metrics(gold, pred)
        m["loss"] = m["mse"] / self.std ** 2  # the training loss: MSE in standardised units
        return m

    # the inputs of classification: texts or text pairs, read with the run's fields
    read_inputs = ClassificationTask.read_inputs
    _text_input = ClassificationTask._text_input

    def predict(self, model, ds, device):
        return [with_pair(ex, {"text": ex.text, self.meta["target_field"]: round(y, 5)})
                for ex, y in zip(ds.examples, self._predict_all(model, ds, device))]
