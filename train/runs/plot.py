"""`minibert plot RUN [RUN ...] --out curves.png`: the learning curves of one or more runs.

Three panels, all against the optimizer step, every run in its own colour:
- loss: train (solid line, the average over each log interval) and dev (dashed, one marker per
  evaluation); a run that diverged gets an x at the step where the loss stopped being finite;
- the dev metric (`--metric`, default: the run's config metric, else accuracy); a --metric that
  some run does not report is refused, naming the run and the metrics it does report;
- the learning rate of every parameter group, on a log scale. Groups whose lr curves are
  identical (a decayed group and its `.no_decay` twin, all blocks without layer-wise decay) are
  drawn once and labelled with the first name and how many share it.

Everything comes from RUN/metrics.jsonl (train/loop/trainer.py's events), so pretraining runs
plot the same way. matplotlib is an optional dependency (`pip install 'minibert[plot]'`). The
figure is a `matplotlib.figure.Figure` drawn straight to a file: no pyplot, no display, and the
process's matplotlib backend is left as the caller set it. The image format is the one that
--out's extension names, checked before any run is read.
"""

import os
import sys

from minibert.io import atomic_open
from train.loop.rundir import read_jsonl
from train.runs.curves import dev_metrics, group_lrs, read_json, run_metric

# What a task's loss is; every other task (classification, tagging, QA, masked LM) is trained
# with cross-entropy. Regression's MSE is in standardised units under --standardize-targets.
LOSS_NAMES = {"regression": "mean squared error", "multitask": "weighted sum of the heads' losses"}


def _figure():
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        raise SystemExit("minibert plot needs matplotlib, an optional dependency: "
                         "pip install 'minibert[plot]'") from None
    return Figure(figsize=(16, 4.8)), matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]


def lr_curves(train):
    """[(label, steps, lrs)] with groups of identical curves merged; a group that unfreezing
    adds mid-run starts where it first trains."""
    by_curve = {}
    for name, (steps, lrs) in group_lrs(train).items():
        by_curve.setdefault((tuple(steps), tuple(lrs)), []).append(name)
    out = []
    for (steps, lrs), names in by_curve.items():
        label = names[0] + (f" (+{len(names) - 1} groups)" if len(names) > 1 else "")
        out.append((label, list(steps), list(lrs)))
    return out


def loss_name(run, config):
    """The loss of RUN's task, from its task meta (best/task.json), else its config."""
    if "teacher" in config:  # alpha x cross-entropy + (1 - alpha) x T^2 KL, + any feature terms
        return "distillation loss"
    meta = read_json(os.path.join(run, "best", "task.json")) or config
    return LOSS_NAMES.get(meta.get("task"), "cross-entropy (nats)")


def image_format(fig, out):
    """The format --out's extension names; the file is written under a temporary name, so
    matplotlib cannot be left to guess it from the name."""
    ext = os.path.splitext(out)[1][1:].lower()
    # not pgf: matplotlib writes it by running LaTeX, which would fail with a traceback here
    known = set(fig.canvas.get_supported_filetypes()) - {"pgf"}
    if ext not in known:
        raise SystemExit(f"minibert plot: --out {out}: not an image format minibert plot writes; "
                         f"end it in one of {', '.join('.' + k for k in sorted(known))}")
    return ext


def plot_runs(runs, out, metric=None, labels=None):
    fig, colors = _figure()
    fmt = image_format(fig, out)
    ax_loss, ax_metric, ax_lr = fig.subplots(1, 3)
    losses = []  # each run's loss name: the axis says them all, once each
    any_evals = False
    for i, run in enumerate(runs):
        events = read_jsonl(os.path.join(run, "metrics.jsonl"))
        if not events:
            raise SystemExit(f"minibert plot: {run}: no metrics.jsonl events")
        name = labels[i] if labels else os.path.basename(os.path.normpath(run))
        c = colors[i % len(colors)]
        train = [e for e in events if e["event"] == "train"]
        evals = [e for e in events if e["event"] == "eval"]
        any_evals = any_evals or bool(evals)
        config = read_json(os.path.join(run, "config.json")) or {}
        m = run_metric(config, evals, metric)
        # a typo, or another task's; a run without evaluations (no --dev) has only its loss
        if metric and evals and not any(metric in e["dev"] for e in evals):
            have = dev_metrics(evals[-1]["dev"]) or "none"
            raise SystemExit(f"minibert plot: --metric {metric}: {run} reports no dev {metric}; "
                             f"its dev metrics: {have}")
        losses.append(loss_name(run, config))
        ax_loss.plot([e["step"] for e in train], [e["train_loss"] for e in train], color=c,
                     label=f"{name} train")
        if evals:
            ax_loss.plot([e["step"] for e in evals], [e["dev"]["loss"] for e in evals], "--o",
                         color=c, markersize=3, label=f"{name} dev")
            ax_metric.plot([e["step"] for e in evals], [e["dev"].get(m) for e in evals], "-o",
                           color=c, markersize=3, label=f"{name} dev {m}")
        for e in events:
            if e["event"] == "diverged":
                ax_loss.plot([e["step"]], [train[-1]["train_loss"] if train else 0], "x",
                             color=c, markersize=10, label=f"{name} diverged")
        styles = ["-", "--", ":", "-."]
        for j, (label, steps, lrs) in enumerate(lr_curves(train)):
            ax_lr.plot(steps, lrs, styles[j % len(styles)], color=c, label=f"{name} {label}")
    if metric and not any_evals:
        raise SystemExit(f"minibert plot: --metric {metric}: no run has dev evaluations (they "
                         "come with --dev)")
    ax_loss.set(title="loss", xlabel="step", ylabel=" / ".join(dict.fromkeys(losses)))
    ax_metric.set(title="dev metric", xlabel="step")
    ax_lr.set(title="learning rate per parameter group", xlabel="step", yscale="log")
    for ax in (ax_loss, ax_metric, ax_lr):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # an empty panel (no evaluations) has none
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format=fmt, dpi=110)


def cmd_plot(args):
    if args.labels and len(args.labels.split(",")) != len(args.runs):
        raise SystemExit("minibert plot: --labels needs one name per run")
    plot_runs(args.runs, args.out, args.metric, args.labels.split(",") if args.labels else None)
    print(f"plot: {args.out}", file=sys.stderr)


def register(sub):
    p = sub.add_parser("plot", help="plot the learning curves of one or more runs")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (metrics.jsonl)")
    p.add_argument("--out", default="curves.png", help="image file to write (.png, .svg, .pdf)")
    p.add_argument("--metric", default=None, help="dev metric to plot, one that every run reports "
                                                  "(default: each run's own)")
    p.add_argument("--labels", default=None, help="comma-separated names for the runs "
                                                  "(default: the directory names)")
    p.set_defaults(func=cmd_plot)
