"""A run's learning curves, read once from its directory, and the small measures the diagnosis
rules take of them (the end of a curve, its smoothed shape, warm-up, noise of a dev metric).

Everything comes from RUN/metrics.jsonl (the events loop/trainer.py writes), RUN/config.json and
RUN/best/task.json; a run without best/ or config.json still loads, with those parts empty. The
train loss of a distillation run is its hard term (the task's loss on gold labels), the part
comparable with chance and with the dev loss.
"""

import math
import os
from dataclasses import dataclass

from minibert.io import load_json
from train.loop.best import better, metric_mode
from train.loop.rundir import read_jsonl

# The end of a curve is its last 20% of train logs (at least one). Single logs are averages over
# `log_every` steps and still jump by +-30% on small batches; a fifth of the run smooths that out
# while still describing "the end".
LATE_FRACTION = 0.2
# Noise of an accuracy-like dev metric: one standard error sqrt(p(1-p)/n) of n dev examples,
# at least 0.002 so that a tiny dev set with p = 1 still has some tolerance.
MIN_METRIC_NOISE = 0.002


@dataclass
class Curves:
    """What the rules look at, read once from a run directory."""
    train_steps: list
    train_loss: list
    lr: dict  # group name -> list of lr at each train log
    eval_steps: list
    dev_loss: list
    dev_metric: list
    metric: str
    mode: str  # "max" or "min"
    diverged: dict | None
    n_labels: int | None
    majority: float | None  # accuracy of always answering the most frequent dev label
    n_dev: int | None
    config: dict
    crf: bool = False  # a CRF tagger: its loss is per sentence, not per label

    @property
    def chance_loss(self):
        """ln K: the per-example loss of guessing uniformly among K labels. A CRF's loss is the
        NLL of a whole sentence (about words * ln K at chance), and the logs do not say how many
        words a sentence has, so a CRF run has no chance level."""
        return math.log(self.n_labels) if self.n_labels and not self.crf else None

    def better(self, a, b):
        return better(a, b, self.mode)


def read_json(path):
    """The JSON file at `path`, or None when there is none (a run may lack best/ or config)."""
    return load_json(path) if os.path.exists(path) else None


def dev_metrics(dev):
    """The scores of a dev dict that --metric may name, comma-separated ('' when none): not a
    confusion matrix or per-class lists."""
    return ", ".join(k for k, v in dev.items() if isinstance(v, (int, float)))


def run_metric(config, evals, wanted=None):
    """The dev metric a run is judged by: `wanted`, else the run's --metric if its evaluations
    report it, else accuracy (fine-tuning) or masked-token accuracy (pretraining), else loss."""
    dev_keys = evals[0]["dev"] if evals else {}
    if wanted:
        return wanted
    if config.get("metric") in dev_keys:
        return config["metric"]
    return next((k for k in ("accuracy", "mlm_accuracy", "loss") if k in dev_keys), "loss")


def group_lrs(train):
    """{group: (steps, lrs)} of every parameter group the train events log, in order of first
    appearance, each from the first log that has it: gradual unfreezing adds groups mid-run, so
    the first event's lr dict does not name them all."""
    out = {}
    for e in train:
        for g, lr in e["lr"].items():
            steps, lrs = out.setdefault(g, ([], []))
            steps.append(e["step"])
            lrs.append(lr)
    return out


def load_curves(run, n_labels=None):
    events = read_jsonl(os.path.join(run, "metrics.jsonl"))
    if not events:
        raise FileNotFoundError(f"{run}: no metrics.jsonl events to diagnose")
    config = read_json(os.path.join(run, "config.json")) or {}
    train = [e for e in events if e["event"] == "train"]
    evals = [e for e in events if e["event"] == "eval"]
    metric = run_metric(config, evals)
    cm = next((e["dev"]["confusion_matrix"] for e in evals if "confusion_matrix" in e["dev"]), None)
    task = read_json(os.path.join(run, "best", "task.json"))
    if n_labels is None:  # the labels the head was built for, else the confusion matrix size
        n_labels = len(task["labels"]) if task and "labels" in task else (len(cm) if cm else None)
    rows = [sum(r) for r in cm] if cm else None
    # Distillation logs alpha * hard + (1 - alpha) * soft (+ feature terms) as its train loss;
    # only the hard term, the task's own loss on gold labels, compares with chance and dev loss.
    hard = all("hard" in e.get("train_terms", {}) for e in train) and bool(train)

    def num(x):  # a non-finite value is logged as null (strict JSON): read it back as NaN
        return float("nan") if x is None else x
    return Curves(
        train_steps=[e["step"] for e in train],
        train_loss=[num(e["train_terms"]["hard"] if hard else e["train_loss"]) for e in train],
        # a group's lr is 0 at the logs before it trains (unfreezing adds it later)
        lr={g: [e["lr"].get(g, 0.0) for e in train] for g in group_lrs(train)},
        eval_steps=[e["step"] for e in evals],
        dev_loss=[num(e["dev"].get("loss")) for e in evals],
        dev_metric=[num(e["dev"].get(metric)) for e in evals],
        metric=metric, mode=metric_mode(metric),
        diverged=next((e for e in events if e["event"] == "diverged"), None),
        n_labels=n_labels, majority=max(rows) / sum(rows) if rows and sum(rows) else None,
        n_dev=sum(rows) if rows else None, config=config,
        crf=bool(config.get("crf") or (task or {}).get("crf")))


def mean(xs):
    return sum(xs) / len(xs)


def late_mean(xs):
    """Mean of the end of a curve: its last LATE_FRACTION (at least one point)."""
    return mean(xs[-max(1, round(LATE_FRACTION * len(xs))):])


def smooth(xs):
    """Moving average over a window of LATE_FRACTION of the curve: [(end index, mean)]."""
    w = max(1, round(LATE_FRACTION * len(xs)))
    return [(i + w - 1, mean(xs[i:i + w])) for i in range(len(xs) - w + 1)]


def warmup_end(c):
    """Index of the first train log at the peak lr: the end of warm-up."""
    peak_group = max(c.lr, key=lambda g: max(c.lr[g]))
    lrs = c.lr[peak_group]
    return next(i for i, v in enumerate(lrs) if v >= 0.999 * max(lrs))


def backbone_peak_lr(c):
    """The largest lr any non-head group reached (the pretrained weights' lr). Logs come every
    N steps and can miss the peak (no warm-up: it is step 0), so the configured rate counts too:
    the top block's --lr, or --lr-encoder, and --lr-embeddings; --stage-lrs replaces them all."""
    logged = max((max(v) for g, v in c.lr.items() if not g.startswith("head")), default=0.0)
    cfg = c.config
    configured = 0.0 if cfg.get("stage_lrs") else max(
        cfg.get("lr_encoder") or cfg.get("lr") or 0.0, cfg.get("lr_embeddings") or 0.0)
    if logged > 0:
        return max(logged, configured)
    # nothing above 0 in the logs: a backbone frozen throughout, or logs only where the schedule
    # is at 0 (one log, at a decay's last step), whose peak is then the configured rate
    frozen = cfg.get("freeze_backbone") or cfg.get("unfreeze_every")
    return configured if c.lr and not frozen else 0.0


def peak_lrs(c):
    """{group: peak lr, or None where no log shows it}. Every group follows the one schedule, so
    when the backbone trained from the first log on, each group's logs missed its peak by as much
    as backbone_peak_lr says the backbone's did; groups that unfreezing adds mid-run start below
    their peak, where logged."""
    logged = {g: max(v) for g, v in c.lr.items()}
    backbone = [g for g in c.lr if not g.startswith("head")]
    top = max((logged[g] for g in backbone), default=0.0)
    if top == 0 and backbone_peak_lr(c) > 0:  # a trained backbone, logged only at lr 0
        return dict.fromkeys(logged)  # None: not in the logs
    if top > 0 and all(c.lr[g][0] > 0 for g in backbone):  # 0: not trained yet at the first log
        return {g: v * backbone_peak_lr(c) / top for g, v in logged.items()}
    return logged


def metric_noise(c, value):
    if c.n_dev and 0.0 <= value <= 1.0:
        return max(MIN_METRIC_NOISE, math.sqrt(value * (1 - value) / c.n_dev))
    return MIN_METRIC_NOISE


def best_eval(c):
    best = 0
    for i, v in enumerate(c.dev_metric):
        if c.better(v, c.dev_metric[best]):
            best = i
    return best


def dev_vs_chance(c):
    # the majority label's score is an accuracy: beside any other metric it would mislead
    return f"last dev {c.metric} {c.dev_metric[-1]:.4f}" + (
        f" vs always-the-majority-label {c.majority:.4f}"
        if c.majority and c.metric == "accuracy" else "")


def at_chance_on_dev(c):
    if c.majority is None or c.metric != "accuracy" or not c.dev_metric:
        return None
    last = c.dev_metric[-1]
    return last <= c.majority + metric_noise(c, last)
