"""`minibert report RUN`: one screen about a finished (or stopped) run.

It gathers what is spread over the run directory (train/loop/rundir.py): the config options that
differ from the defaults (RUN/config.json against those of the run's own command: finetune,
distill or pretrain; a --metric saved as the task's own is a default), the parameter groups and
their peak learning rates (from the train events' lr dicts, see curves.peak_lrs), the best step,
dev and test metrics (pretraining's: valid) from RUN/results.json, the diagnosis
(RUN/diagnosis.json, or computed now), time, throughput and peak memory (the events' memory
records). The report goes to stdout: it is the command's data.
"""

import dataclasses
import os

from train.runs.curves import load_curves, peak_lrs, read_json
from train.runs.diagnose import diagnose, format_diagnosis
from train.distill.config import DistillConfig
from train.finetune.config import DEFAULT_METRIC, FinetuneConfig
from train.loop.rundir import read_jsonl
from train.pretrain.config import PretrainConfig

# the metrics worth a line, for every task; a confusion matrix or per-class lists would not fit on
# one screen. A multi-task run's heads ("polarity/accuracy") show their main scores only.
SHOWN = ("combined", "accuracy", "exact_match", "f1", "macro_f1", "precision", "recall",
         "pearson", "spearman", "rmse", "loss", "mlm_loss", "perplexity", "mlm_accuracy")
HEAD_SHOWN = ("accuracy", "exact_match", "f1", "pearson", "spearman")


def changed_options(config):
    """(name, value) of the options that differ from the defaults of the first command whose
    config has them all (a distill config holds finetune's options, and more)."""
    for cls in (FinetuneConfig, DistillConfig, PretrainConfig):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if set(config) <= set(fields):
            # --metric left out is saved as the task's own: that is its default too
            task = config.get("task", getattr(fields.get("task"), "default", None))
            resolved = {"metric": DEFAULT_METRIC.get(task)}
            return [(k, v) for k, v in config.items()
                    if not is_default(v, fields[k]) and not (k in resolved and v == resolved[k])]
    return sorted(config.items())  # no command's config: show it all


def is_default(value, field):
    """A path saved absolute (train/loop/launch.py) is still its relative default, runs/..."""
    d = field.default
    return value == d or ("path" in field.metadata and isinstance(value, str)
                          and isinstance(d, str) and value.endswith(os.sep + d))


def group_lines(peaks):
    """Groups with the same peak lr on one line: 'head, head.no_decay: peak lr 1.00e-03'."""
    by_peak = {}
    for name, peak in peaks.items():
        by_peak.setdefault(peak, []).append(name)
    return [f"  {', '.join(names)}: " + (f"peak lr {peak:.2e}" if peak is not None else
                                         "peak lr not logged (its train logs fall where the "
                                         "schedule is at 0)") for peak, names in by_peak.items()]


def metrics_line(m, metric=None):
    """The run's own metric first (--metric), then the others that apply, in SHOWN's order."""
    heads = [k for k in m if "/" in k and k.rsplit("/", 1)[1] in HEAD_SHOWN]
    keys = dict.fromkeys([metric, *SHOWN, *heads])  # ordered, without repeats
    return ", ".join(f"{k} {m[k]:.4f}" for k in keys if isinstance(m.get(k), (int, float)))


def report(run):
    events = read_jsonl(os.path.join(run, "metrics.jsonl"))
    if not events:
        raise SystemExit(f"minibert report: {run}: no metrics.jsonl events")
    config = read_json(os.path.join(run, "config.json")) or {}
    results = read_json(os.path.join(run, "results.json"))
    train = [e for e in events if e["event"] == "train"]
    evals = [e for e in events if e["event"] == "eval"]
    lines = [f"run: {run}"]
    opts = changed_options(config)
    lines.append("config (non-default): " + (", ".join(f"{k}={v}" for k, v in opts) or "none"))
    peaks = peak_lrs(load_curves(run))  # every group, also those gradual unfreezing added
    lines.append(f"parameter groups ({len(peaks)}):")
    lines += group_lines(peaks)
    last = train[-1] if train else {}
    lines.append(f"steps: {last.get('step', 0)} (epoch {last.get('epoch', 0):.2f}), "
                 f"{len(evals)} evaluations")
    if results:
        lines.append(f"best step: {results.get('best_step')}")
        for split in ("dev", "valid", "test"):  # pretraining scores its "valid" split
            if split in results:
                lines.append(f"{split} (best checkpoint): "
                             f"{metrics_line(results[split], config.get('metric'))}")
    else:
        lines.append("no results.json: the run did not finish")
        if evals:
            lines.append(f"last dev: {metrics_line(evals[-1]['dev'], config.get('metric'))} "
                         f"(step {evals[-1]['step']})")
    d = read_json(os.path.join(run, "diagnosis.json")) or diagnose(run)
    lines += format_diagnosis(d).splitlines()
    secs = (results or {}).get("train_seconds", last.get("time", 0.0))
    eps = (results or {}).get("examples_per_second")
    toks = [e["tokens_per_second"] for e in train if "tokens_per_second" in e]
    lines.append(f"time: {secs / 60:.1f} min training" +
                 (f", {eps} examples/s" if eps is not None else "") +
                 (f", {sum(toks) / len(toks):,.0f} tokens/s" if toks else ""))
    mem = [e["memory"] for e in events if "memory" in e]
    if mem:
        peak = {k: max(m.get(k, 0.0) for m in mem) for k in mem[-1]}
        lines.append("peak memory: " + ", ".join(f"{k} {v:,.0f}" for k, v in peak.items()))
    return "\n".join(lines)


def cmd_report(args):
    print(report(args.run))


def register(sub):
    p = sub.add_parser("report", help="a one-screen summary of a run")
    p.add_argument("run", help="run directory")
    p.set_defaults(func=cmd_report)
