"""`minibert sweep`: fine-tune once per point of a grid of hyper-parameters, and rank them.

    minibert sweep --grid lr=2e-5,3e-5,5e-5 --grid batch_size=16,32 [--random N] \\
        --out runs/sweep -- --model weights/minilm-l6 --train ... --dev ...

Every `--grid NAME=V1,V2,...` names a field of the fine-tuning config (train/finetune/config.py);
a boolean field takes true,false (passed as --name / --no-name). The trials are the cartesian
product, or `--random N` of them drawn with `--seed`. Each trial is its own run directory under
`--out`, named by its values (`lr=2e-5_batch_size=16`), made by `minibert finetune` in a
subprocess: a trial that crashes, diverges or runs out of memory is recorded with its error, and
the sweep goes on.

A sweep is resumable: run the same command again. A trial with results.json is done and is only
read; one with state/ but no results.json was interrupted and continues with `finetune --resume`;
the others start. Trials are named by their grid values alone, so OUT/sweep.json records the
arguments after `--` before the first trial, and a rerun with other ones is refused rather than
mixing trials of two setups. OUT/sweep.json (rewritten after every trial) holds every trial's
values, status, metrics and command; at the end the table, sorted by the dev metric, is printed on
stdout and saved as OUT/sweep.md, with the best configuration and the command that reproduces it.
`--metric` defaults to the trials' own --metric, else their task's (DEFAULT_METRIC); one their
task cannot report is refused before the first trial, and the first finished trial must report
it (a trial without --dev reports none); the sweep stops there if not.

Limits: trials run one after another (one machine, one process at a time); the grid is over
config fields only, with values given as text exactly as on the command line.
"""

import argparse
import dataclasses
import itertools
import os
import random
import shlex
import subprocess
import sys
import time
import typing

from minibert.commands import int_at_least
from minibert.io import atomic_write_json, atomic_write_text, load_json
from train.command import die_with_parent, minibert_argv
from train.finetune.config import DEFAULT_METRIC, FinetuneConfig
from train.finetune.config import check_metric as check_task_metric
from train.loop.best import is_missing, metric_mode, rank_key
from train.loop.rundir import RunDir
from train.runs.curves import dev_metrics
from train.tasks.registry import SINGLE_TASKS


def parse_grid(specs):
    """['lr=1e-5,2e-5', ...] -> {'lr': ['1e-5', '2e-5'], ...}, names checked against the config."""
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    flags = bool_fields()
    grid = {}
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or not values:
            raise SystemExit(f"minibert sweep: --grid {spec!r}: expected NAME=V1,V2,...")
        if name not in fields:
            raise SystemExit(f"minibert sweep: --grid {name}: not a finetune option")
        if name == "out":
            raise SystemExit("minibert sweep: --grid out: the sweep names the run directories")
        if name in grid:
            raise SystemExit(f"minibert sweep: --grid {name} given twice; list its values in one")
        grid[name] = [v for v in values.split(",") if v != ""]
        if not grid[name] or len(set(grid[name])) < len(grid[name]):
            raise SystemExit(f"minibert sweep: --grid {spec!r}: give distinct values, "
                             "NAME=V1,V2,...")
        wrong = [v for v in grid[name] if name in flags and v not in ("true", "false")]
        if wrong:
            raise SystemExit(f"minibert sweep: --grid {name}={wrong[0]}: {name} is a boolean "
                             "option, give its values as true,false")
    if not grid:
        raise SystemExit("minibert sweep: give at least one --grid NAME=V1,V2,...")
    return grid


def bool_fields():
    """The config's boolean fields: finetune spells them --x / --no-x, without a value."""
    hints = typing.get_type_hints(FinetuneConfig)
    return {f.name for f in dataclasses.fields(FinetuneConfig) if hints[f.name] is bool}


def trials(grid, n_random=None, seed=0):
    """The list of trials, each a dict name -> value (text), in grid order or sampled."""
    names = list(grid)
    every = [dict(zip(names, combo)) for combo in itertools.product(*grid.values())]
    if n_random is not None and n_random < len(every):
        # sample indices, then keep grid order: the same seed gives the same trials, and the
        # table's ties stay in a readable order
        keep = sorted(random.Random(seed).sample(range(len(every)), n_random))
        every = [every[i] for i in keep]
    return every


def trial_name(values):
    return "_".join(f"{k}={v}" for k, v in values.items())


def finetune_command(base_args, values, out):
    cmd = ["minibert", "finetune", *base_args]
    flags = bool_fields()
    for k, v in values.items():
        flag = k.replace("_", "-")
        if k in flags:
            cmd += ["--" + flag if v == "true" else "--no-" + flag]
        else:
            cmd += ["--" + flag, v]
    return cmd + ["--out", out]


def run_trial(cmd, run_dir, resume):
    """Run one `minibert finetune` in a subprocess; its stderr goes to RUN/finetune.log."""
    argv = minibert_argv() + (
        ["finetune", "--resume", run_dir] if resume else cmd[1:])
    os.makedirs(run_dir, exist_ok=True)
    t0 = time.time()
    with open(os.path.join(run_dir, "finetune.log"), "a", encoding="utf-8") as log:
        # the trial dies with the sweep: a rerun would find it still writing into its RUN
        rc = subprocess.run(argv, stdout=log, stderr=log, preexec_fn=die_with_parent).returncode
    return rc, time.time() - t0


def last_error(run_dir):
    """The last line a failed trial printed: finetune's one-line message, or the exception."""
    with open(os.path.join(run_dir, "finetune.log"), encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip()]
    return lines[-1] if lines else "no output"


def sweep_metric(metric, base, grid):
    """The metric that ranks the trials: --metric, else the trials' own --metric, else their
    task's default (DEFAULT_METRIC). One their task cannot report is refused before the first
    trial runs; a multi-task's NAME/METRIC is checked by its suffix (the heads are the trials')."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--task", default=FinetuneConfig.task)
    p.add_argument("--metric", default=None)
    known, _ = p.parse_known_args(base)
    tasks = [t for t in dict.fromkeys(grid.get("task", [known.task])) if t in DEFAULT_METRIC]
    if metric is None:  # an unknown --task fails in its trial, which names it
        defaults = set(known.metric or DEFAULT_METRIC[t] for t in tasks) or {"loss"}
        if len(defaults) > 1:
            raise SystemExit(f"minibert sweep: --grid task: its tasks rank by different metrics "
                             f"({', '.join(sorted(defaults))}); give --metric")
        return defaults.pop()
    of_heads = {m for task in SINGLE_TASKS.values() for m in task.metrics}
    for t in tasks:
        if t in SINGLE_TASKS:
            names = list(SINGLE_TASKS[t].metrics)
        else:  # multitask
            head = "/" in metric and metric.split("/")[-1] in of_heads
            names = ["combined", "loss"] + ([metric] if head else ["NAME/METRIC"])
        try:
            check_task_metric(metric, names, t)
        except ValueError as e:
            raise SystemExit(f"minibert sweep: {e}") from None
    return metric


def check_finetune_args(out, base):
    """Refuse to reuse OUT's trials when they were run with other arguments after `--`."""
    path = os.path.join(out, "sweep.json")
    old = load_json(path).get("finetune_args") if os.path.exists(path) else None
    if old is not None and old != base:
        raise SystemExit(f"minibert sweep: --out {out} holds trials run with other finetune "
                         f"arguments ({shlex.join(old)}); give a new --out, or delete it")


def check_metric(r, metric, name):
    """The ranking metric must be one the trials report (a regression reports no accuracy)."""
    dev = r.get("dev") or {}
    if metric not in dev:
        have = dev_metrics(dev) or "none (pass --dev after --)"
        raise SystemExit(f"minibert sweep: --metric {metric}: trial {name} reports no dev "
                         f"{metric}; its dev metrics: {have}")


def read_results(r, metric):
    dev, test = r.get("dev", {}), r.get("test", {})
    return {"dev_" + metric: dev.get(metric), "dev_loss": dev.get("loss"),
            "test_" + metric: test.get(metric), "best_step": r.get("best_step"),
            "train_seconds": r.get("train_seconds")}


def fmt(v):
    return "n/a" if is_missing(v) else f"{v:.4f}"


def sort_key(metric):
    """Finished trials first, best dev value first (in the metric's own direction)."""
    mode = metric_mode(metric)

    def key(t):
        return (t["status"] != "done", rank_key(t.get("dev_" + metric), mode))
    return key


def table(records, names, metric):
    cols = names + ["status", "dev_" + metric, *(["dev_loss"] if metric != "loss" else []),
                    "test_" + metric, "best_step", "train_seconds"]

    def cell(c, v):
        if isinstance(v, float):
            return f"{v:.0f}" if c == "train_seconds" else f"{v:.4f}"
        return "" if v is None else str(v)
    rows = [[cell(c, r["values"].get(c, r.get(c))) for c in cols] for r in records]
    keep = [i for i in range(len(cols)) if any(row[i] for row in rows)]  # e.g. no --test
    cols, rows = [cols[i] for i in keep], [[row[i] for i in keep] for row in rows]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join([line, rule] + body)


def cmd_sweep(args):
    base = list(args.finetune_args)
    if base and base[0] == "--":
        base = base[1:]
    # finetune's argparse reads a unique prefix (--ou DIR, --res=RUN) as the flag itself
    names = {a.split("=")[0] for a in base if a.startswith("--")}
    if any(len(n) > 3 and o.startswith(n) for n in names for o in ("--out", "--resume")):
        raise SystemExit("minibert sweep: --out/--resume are set by the sweep; drop them")
    grid = parse_grid(args.grid)
    args.metric = sweep_metric(args.metric, base, grid)
    todo = trials(grid, args.random, args.seed)
    check_finetune_args(args.out, base)
    os.makedirs(args.out, exist_ok=True)
    print(f"sweep: {len(todo)} trials into {args.out}", file=sys.stderr)
    records = []
    summary = {"grid": grid, "random": args.random, "seed": args.seed, "metric": args.metric,
               "finetune_args": base, "trials": records}
    # recorded before the first trial starts: a trial is never on disk without its arguments
    atomic_write_json(os.path.join(args.out, "sweep.json"), summary)
    checked = False
    for i, values in enumerate(todo):
        run_dir = os.path.join(args.out, trial_name(values))
        cmd = finetune_command(base, values, run_dir)
        rec = {"name": trial_name(values), "values": values, "run": run_dir,
               "command": shlex.join(cmd)}
        if os.path.exists(os.path.join(run_dir, "results.json")):
            how = "already done"
        else:
            # state.old alone (killed between the renames of a save) is resumed too
            resume = RunDir(run_dir, writer=False).find_dir("state") is not None
            how = "resumed" if resume else "ran"
            print(f"[{i + 1}/{len(todo)}] {rec['name']}: "
                  f"{'resuming' if resume else 'starting'}", file=sys.stderr)
            rc, secs = run_trial(cmd, run_dir, resume)
            if rc != 0:
                rec.update(status="failed", error=last_error(run_dir), exit_code=rc)
                print(f"[{i + 1}/{len(todo)}] {rec['name']}: FAILED ({rec['error']})",
                      file=sys.stderr)
        if "status" not in rec:
            r = load_json(os.path.join(run_dir, "results.json"))
            if not checked:  # once, before the other trials run: they all share the task
                check_metric(r, args.metric, rec["name"])
                checked = True
            rec.update(status="done", how=how, **read_results(r, args.metric))
            print(f"[{i + 1}/{len(todo)}] {rec['name']}: {how}, dev {args.metric} "
                  f"{fmt(rec['dev_' + args.metric])}", file=sys.stderr)
        records.append(rec)
        atomic_write_json(os.path.join(args.out, "sweep.json"), summary)  # progress survives

    records.sort(key=sort_key(args.metric))
    text = table(records, list(grid), args.metric)
    best = records[0] if records and records[0]["status"] == "done" and \
        not is_missing(records[0]["dev_" + args.metric]) else None
    if best:
        reproduce = finetune_command(base, best["values"], os.path.join(args.out, "best-rerun"))
        summary["best"] = {"name": best["name"], "values": best["values"],
                           "dev_" + args.metric: best["dev_" + args.metric],
                           "command": shlex.join(reproduce)}
        text += (f"\n\nbest: {best['name']} (dev {args.metric} "
                 f"{best['dev_' + args.metric]:.4f}, run {best['run']})\n"
                 f"reproduce: {shlex.join(reproduce)}")
    else:
        text += f"\n\nno trial finished with a dev {args.metric}"
    atomic_write_json(os.path.join(args.out, "sweep.json"), summary)
    atomic_write_text(os.path.join(args.out, "sweep.md"), text + "\n")
    print(text)
    return 0 if best else 1


def register(sub):
    p = sub.add_parser("sweep", help="fine-tune over a grid of hyper-parameters and rank them",
                       description="Everything after -- is passed to `minibert finetune`.")
    p.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2,...",
                   help="a finetune option and its values; repeat for a product")
    p.add_argument("--random", type=int_at_least(1), default=None, metavar="N",
                   help="run N trials drawn from the grid instead of all of it")
    p.add_argument("--seed", type=int, default=0, help="seed of --random's draw")
    p.add_argument("--metric", default=None,
                   help="dev metric that ranks the trials (default: the trials' --metric, else "
                        "their task's: " + ", ".join(f"{m} for {t}" for t, m in
                                                     DEFAULT_METRIC.items()) + ")")
    p.add_argument("--out", default="runs/sweep", help="sweep directory (one run per trial)")
    p.add_argument("finetune_args", nargs=argparse.REMAINDER,
                   help="-- then the arguments every trial passes to `minibert finetune`")
    p.set_defaults(func=cmd_sweep)
