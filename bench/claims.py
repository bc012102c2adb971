"""The fine-tuning guides' claims, tested on real data: one row of the README's table per claim.

    python bench/claims.py ROW [ROW ...] [--model weights/minilm-l6] [--data data/rt-snippets]
        [--out runs/claims] [--seeds 42,43,44] [--jobs 2] [--plot-dir docs]

Every row is `minibert finetune` on rt-snippets with the defaults (the quick start's recipe) and
the row's flags, once per seed, against the default run of the same seed; a row prints one line
of the table: the claim, what was measured (test accuracy of the best-on-dev checkpoint, mean
+- sd over the seeds), the verdict and the command. The rows:

  transfer   claim 1: pretrained against random init on 100, 300, 1,000, 3,000 and all 8,470
             training examples (stratified samples, one per seed); --plot-dir gets transfer.png
  lr         claims 2 and 3: the top learning rate from 1e-5 to 1e-3 *
  epochs     claim 4: 1, 2, 3 and 5 epochs *
  freeze     claim 5: the bottom 4 of 6 blocks frozen: accuracy and seconds
  layerwise  claim 7: embeddings 1e-3, blocks 5e-3, head 1e-2, as the guide writes them
  batch      claim 8: batch 8, 32 and 128 (32 x 4 accumulated), each at its best lr on dev *
  overfit    claim 9: 100 examples for 20 epochs, alone, with early stopping, with dropout
  plateau    claim 10: ReduceLROnPlateau against linear decay
  precision  not a guide's claim but the runs' own speed: the default recipe in fp32 against
             bf16 autocast, accuracy and seconds (the first seed's runs timed alone)
  compile    the same for bf16 with --compile against bf16
  domain     claim 12: the tiny model pretrained on news against the same pretrained as long on
             movie-review text (`minibert data get rt-reviews`), random init as the floor
  dapt       claim 12 for MiniLM: its pretraining continued on that text (`minibert pretrain
             --model weights/minilm-l6`) against MiniLM as it is

* A sweep: every value on the first seed, then on every seed only the values that the claim
  compares (chosen on the first seed's dev accuracy where the claim says "tuned" or "best").

A run already finished under --out is read back, so a row continues where it stopped, and runs
shared by rows (the default recipe, seed by seed) are made once; the rows that need no timing
queue their runs together before any is made. --jobs N runs N fine-tunes side by side with one
thread each: the accuracies do not depend on it, the seconds do, so the rows that compare time
(freeze, precision, compile) make their first seed's runs one at a time, time those, and refuse
a first-seed run that was made beside others. Every run names its --precision: bf16 autocast
unless the row says otherwise.
"""

import argparse
import contextlib
import io
import json
import math
import os
import random
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.finetune_vs_transformers import machine  # noqa: E402
from minibert.io import load_json  # noqa: E402
from bench.runs import finished, results, run_missing  # noqa: E402

SIZES = [100, 300, 1000, 3000, None]  # None: all of train.jsonl
MIN_STEPS = 60  # small samples train for more epochs, so that every run takes >= 60 steps
BATCH = 32  # the default --batch-size
# Every run names its precision, so that a row's command makes the same runs on any CPU: bf16
# autocast (what `--precision auto` picks on a CPU with bf16 instructions; the precision row
# shows it trains as well as fp32, faster), but fp32 for the rows measured before that (overfit,
# domain).


# ---- the data -----------------------------------------------------------------------------

def stratified(path, n, seed, out):
    """n rows of the JSONL file `path`, each label in its share, drawn with `seed`; written to
    `out` (atomically) unless it is there. Returns `out`."""
    if os.path.exists(out):
        return out
    with open(path, encoding="utf-8") as f:
        rows = [line for line in f if line.strip()]
    by_label = {}
    for line in rows:
        by_label.setdefault(json.loads(line)["label"], []).append(line)
    if n >= len(rows):
        raise SystemExit(f"{path}: {len(rows)} rows, fewer than the sample of {n} asked for")
    rng = random.Random(seed)
    picked = []
    for label in sorted(by_label, key=str):
        share = round(n * len(by_label[label]) / len(rows))
        picked += rng.sample(by_label[label], share)
    rng.shuffle(picked)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(picked)
    os.replace(out + ".tmp", out)
    return out


def epochs_for(n):
    """The default 3 epochs, or more for a small sample: at least MIN_STEPS steps."""
    return max(3, math.ceil(MIN_STEPS / math.ceil(n / BATCH)))


# ---- the runs -----------------------------------------------------------------------------

class Planned(Exception):
    """Raised by Bench.make while main() collects the runs of every row before making any."""


class Bench:
    """Names the runs of every row, makes the missing ones and reads their results."""

    def __init__(self, a):
        self.a = a
        self.todo = {}
        self.planning = False
        self.planned = {}  # the runs that planning collected, for main() to make first

    def data(self, train=None):
        d = self.a.data
        return ["--task", "classification", "--train", train or f"{d}/train.jsonl",
                "--dev", f"{d}/dev.jsonl", "--test", f"{d}/test.jsonl"]

    def run(self, name, seed, flags, train=None, model=None, precision="bf16"):
        """The run `name` of `seed`: its directory, queued for `make`. The flags define it."""
        out = os.path.join(self.a.out, f"{name}-s{seed}")
        args = ["finetune", "--model", model or self.a.model, *self.data(train), "--seed", seed,
                "--precision", precision, *flags]
        self.todo[out] = args
        return out

    def default(self, seed):
        return self.run("default", seed, [])

    def make(self, jobs):
        if self.planning:  # collecting: stop the row at its first runs still to make
            todo, self.todo = self.todo, {}
            if not all(finished(out) for out in todo):
                self.planned.update(todo)
                raise Planned
            return
        run_missing(list(self.todo.items()), jobs, 1 if jobs > 1 else None)
        self.todo = {}


def name(path):
    return os.path.basename(os.path.normpath(path))


def test_acc(out):
    return results(out)["test"]["accuracy"]


def dev_acc(out):
    return results(out)["dev"]["accuracy"]


def stats(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def fmt(xs):
    m, sd = stats(xs)
    return f"{100 * m:.2f}" + (f" +- {100 * sd:.2f}" if sd is not None else "") + \
        f" (n={len(xs)})"


def command(row, a):
    """The command that prints this row again: the row, and every flag not at its default."""
    flags = {"--model": (a.model, "weights/minilm-l6"), "--data": (a.data, "data/rt-snippets"),
             "--seeds": (a.seeds_arg, "42,43,44")}
    if row == "domain":
        flags.update({"--tiny-news": (a.tiny_news, "runs/tiny-news/best"),
                      "--tiny-reviews": (a.tiny_reviews, "runs/tiny-reviews/best")})
    if row == "dapt":
        flags["--minilm-reviews"] = (a.minilm_reviews, "runs/minilm-reviews/best")
    given = "".join(f" {k} {v}" for k, (v, default) in flags.items() if v != default)
    return f"`python bench/claims.py {row}{given}`"


def line(claim, measured, verdict, row, a):
    return f"| {claim} | {measured} | {verdict} | {command(row, a)} |"


def compare(arms):
    """{name: [test accuracies]} of finished runs {name: [dirs]}."""
    return {name: [test_acc(d) for d in dirs] for name, dirs in arms.items()}


def noise(sds):
    """What a difference (in points) must exceed to count: twice the larger sd over the seeds,
    or 1 point with one seed."""
    sds = [100 * s for s in sds if s is not None]
    return 2 * max(sds) if sds else 1.0


def verdict(diff_points, sds, claimed_sign=+1):
    """'holds' when the difference (in points) has the claimed sign and is beyond the noise;
    'does not hold' when it is as large the other way; else no difference."""
    noise_points = noise(sds)
    if diff_points * claimed_sign > noise_points:
        return "holds"
    if diff_points * claimed_sign < -noise_points:
        return "does not hold: the other way"
    return "does not hold: no difference beyond noise"


# ---- the rows -----------------------------------------------------------------------------

def row_transfer(b, a):
    runs = {}
    for arm, flags in (("pretrained", []), ("random", ["--init", "random"])):
        for n in reversed(SIZES):  # the longest runs first: the parallel jobs end together
            for seed in a.seeds:
                if n is None:
                    out = b.default(seed) if arm == "pretrained" else b.run("random", seed, flags)
                else:
                    train = stratified(f"{a.data}/train.jsonl", n, seed,
                                       os.path.join(a.out, "data", f"train-n{n}-s{seed}.jsonl"))
                    out = b.run(f"transfer-{arm}-n{n}", seed,
                                [*flags, "--epochs", epochs_for(n)], train)
                runs.setdefault((arm, n), []).append(out)
    b.make(a.jobs)
    full = sum(1 for _ in open(f"{a.data}/train.jsonl", encoding="utf-8") if _.strip())
    table = {k: [test_acc(d) for d in v] for k, v in runs.items()}
    print("| examples | epochs | pretrained test acc | random init test acc | gap |")
    print("|---|---|---|---|---|")
    for n in SIZES:
        p, r = table[("pretrained", n)], table[("random", n)]
        print(f"| {n or full} | {epochs_for(n) if n else 3} | {fmt(p)} | {fmt(r)} | "
              f"{100 * (stats(p)[0] - stats(r)[0]):+.2f} |")
    if a.plot_dir:
        plot_transfer(table, full, os.path.join(a.plot_dir, "transfer.png"), a)
    scratch_full = stats(table[("random", None)])[0]
    enough = next((n for n in SIZES if n and stats(table[("pretrained", n)])[0] >= scratch_full),
                  None)
    p_full = stats(table[("pretrained", None)])[0]
    measured = (f"pretrained {100 * p_full:.1f} against random {100 * scratch_full:.1f} on all "
                f"{full:,}; pretrained on "
                + (f"{enough:,} examples already beats random on all" if enough else
                   "no sample beats random on all")
                + f"; at 100 examples {100 * stats(table[('pretrained', 100)])[0]:.1f} against "
                f"{100 * stats(table[('random', 100)])[0]:.1f}")
    holds = p_full - scratch_full > 0.05 and enough is not None and enough <= 1000
    return line("1. pretrained 94% against 78% from scratch; transfer needs 100-1,000 examples",
                measured, "holds" if holds else "partly", "transfer", a)


def plot_transfer(table, full, path, a):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    xs = [n or full for n in SIZES]
    for arm, color in (("pretrained", "tab:blue"), ("random", "tab:orange")):
        means = [100 * stats(table[(arm, n)])[0] for n in SIZES]
        sds = [100 * (stats(table[(arm, n)])[1] or 0) for n in SIZES]
        label = f"{name(a.model)}, pretrained" if arm == "pretrained" else \
            "the same model, random init"
        ax.plot(xs, means, "o-", color=color, label=label)
        ax.fill_between(xs, [m - s for m, s in zip(means, sds)],
                        [m + s for m, s in zip(means, sds)], color=color, alpha=0.2)
    ax.axhline(50, color="grey", lw=0.8, ls=":", label="chance")
    ax.set_xscale("log")
    ax.set_xlabel(f"training examples (stratified samples of {name(a.data)} train)")
    ax.set_ylabel(f"test accuracy, % (mean +- sd, {len(a.seeds)} seeds)")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3, which="both")
    ax.set_title(f"transfer learning on {name(a.data)}\n{machine()}, "
                 f"{a.jobs} run(s) at a time", fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    print(f"plot: {path}", file=sys.stderr)


def sweep(b, a, run, values, confirm):
    """A sweep on the first seed, then the values that a claim compares on every seed.

    run(value, seed) -> run dir; confirm({value: dev accuracy of the first seed}) -> the values
    to repeat with the other seeds (chosen on dev, never on test). Returns {value: [run dirs]}:
    one for most values, one per seed for the confirmed ones."""
    runs = {v: [run(v, a.seeds[0])] for v in values}
    b.make(a.jobs)
    devs = {v: dev_acc(ds[0]) for v, ds in runs.items()}
    for v in confirm(devs):
        runs[v] = [run(v, s) for s in a.seeds]
    b.make(a.jobs)
    return runs


def print_sweep(title, runs, default_value):
    """The sweep's table on stdout: each value's dev and test accuracy over its seeds."""
    print(f"| {title} | dev acc | test acc |")
    print("|---|---|---|")
    for v, ds in runs.items():
        print(f"| {v}{' (default)' if v == default_value else ''} | "
              f"{fmt([dev_acc(d) for d in ds])} | {fmt([test_acc(d) for d in ds])} |")


def flag_run(b, name, flags_of, default_value):
    """run(value, seed) for one flag: the shared default run at the default value."""
    return lambda v, s: (b.default(s) if v == default_value else
                         b.run(f"{name}-{v}", s, flags_of(v)))


def versus(x, y, claimed_sign=+1):
    """The verdict on mean(x) - mean(y), test accuracies of two arms, in points."""
    (mx, sx), (my, sy) = stats(x), stats(y)
    return verdict(100 * (mx - my), [sx, sy], claimed_sign)


def row_lr(b, a):
    """Six top learning rates on the first seed; the default and the better of 2e-5 and 5e-5 on
    dev (the guide's range) on every seed."""
    lrs = ["1e-5", "2e-5", "5e-5", "1e-4", "3e-4", "1e-3"]
    tuned = None

    def confirm(dev):
        nonlocal tuned
        tuned = max(["2e-5", "5e-5"], key=dev.get)
        return ["1e-4", tuned]

    runs = sweep(b, a, flag_run(b, "lr", lambda v: ["--lr", v], "1e-4"), lrs, confirm)
    print_sweep("lr", runs, "1e-4")
    acc = {v: [test_acc(d) for d in ds] for v, ds in runs.items()}
    claim2 = line("2. lr 1e-3 destroys pretrained knowledge; stay below 1e-4",
                  f"1e-3: {fmt(acc['1e-3'])}; 3e-4: {fmt(acc['3e-4'])}; 1e-4: "
                  f"{fmt(acc['1e-4'])}", versus(acc["1e-4"], acc["1e-3"]), "lr", a)
    claim3 = line("3. a tuned lr (2e-5..5e-5) beats the default 1e-4: 95% against 92%",
                  f"{tuned} (the better on dev of 2e-5 and 5e-5): {fmt(acc[tuned])}; 1e-4: "
                  f"{fmt(acc['1e-4'])}; 1e-5: {fmt(acc['1e-5'])}",
                  versus(acc[tuned], acc["1e-4"]), "lr", a)
    return [claim2, claim3]


def row_epochs(b, a):
    """1, 2, 3 and 5 epochs on the first seed; 1 and 3, the claim's, on every seed."""
    runs = sweep(b, a, flag_run(b, "epochs", lambda v: ["--epochs", v], "3"),
                 ["1", "2", "3", "5"], lambda dev: ["1", "3"])
    print_sweep("epochs", runs, "3")
    acc = {v: [test_acc(d) for d in ds] for v, ds in runs.items()}
    return line("4. 3 epochs beat 1: 94% against 88%",
                ", ".join(f"{v}: {fmt(x)}" for v, x in acc.items()),
                versus(acc["3"], acc["1"]), "epochs", a)


def row_freeze(b, a):
    measured, said = timed_arms(
        b, a, {"full": b.default,
               "bottom 4 frozen": lambda s: b.run("freeze4", s, ["--freeze-layers", "4"])},
        "freeze", "full")
    return line("5. training only the top 2 blocks and the head is fast, with good performance",
                measured, said, "freeze", a)


def row_layerwise(b, a):
    flags = ["--lr-embeddings", "1e-3", "--lr-encoder", "5e-3", "--lr-head", "1e-2"]
    runs = {"guide": [b.run("layerwise-guide", s, flags) for s in a.seeds],
            "default": [b.default(s) for s in a.seeds]}
    b.make(a.jobs)
    accs = compare(runs)
    return line("7. layer-wise rates embeddings 1e-3, blocks 5e-3, head 1e-2",
                f"{fmt(accs['guide'])} against the default decay 0.9 from 1e-4: "
                f"{fmt(accs['default'])}", versus(accs["guide"], accs["default"]), "layerwise", a)


def row_batch(b, a):
    """Batch 8, 32 and 128 (32 x 4 accumulated), each at the best lr of its grid on the first
    seed's dev accuracy; each batch size's best on every seed."""
    grid = {"8": ["5e-5", "1e-4"], "32": ["5e-5", "1e-4", "2e-4"], "128": ["1e-4", "2e-4", "4e-4"]}
    lr_run = flag_run(b, "lr", lambda v: ["--lr", v], "1e-4")

    def run(v, seed):
        bs, lr = v
        if bs == "32":  # the default batch size: the lr row's runs
            return lr_run(lr, seed)
        size = ["--batch-size", "32", "--grad-accum", "4"] if bs == "128" else \
            ["--batch-size", bs]
        return b.run(f"batch{bs}-lr{lr}", seed, [*size, "--lr", lr])

    best = {}

    def confirm(dev):
        for bs, lrs in grid.items():
            best[bs] = (bs, max(lrs, key=lambda lr: dev[(bs, lr)]))
        return list(best.values())

    runs = sweep(b, a, run, [(bs, lr) for bs, lrs in grid.items() for lr in lrs], confirm)
    print_sweep("batch, lr", {f"{bs}, {lr}": ds for (bs, lr), ds in runs.items()}, "32, 1e-4")
    acc = {bs: [test_acc(d) for d in runs[v]] for bs, v in best.items()}
    return line("8. small batches (8-16) generalise better; large ones need a higher lr",
                "; ".join(f"batch {bs} (lr {v[1]} chosen on dev): {fmt(acc[bs])}"
                          for bs, v in best.items()),
                versus(acc["8"], acc["32"]), "batch", a)


def row_plateau(b, a):
    runs = {"plateau": [b.run("plateau", s, ["--schedule", "plateau"]) for s in a.seeds],
            "linear": [b.default(s) for s in a.seeds]}
    b.make(a.jobs)
    accs = compare(runs)
    return line("10. ReduceLROnPlateau helps when the dev metric stalls",
                f"plateau {fmt(accs['plateau'])} against linear decay {fmt(accs['linear'])}",
                versus(accs["plateau"], accs["linear"]), "plateau", a)


def row_overfit(b, a):
    """100 examples for 20 epochs, batch 16 (the README's overfitting run), with each remedy."""
    arms = {"no remedy": [], "early stopping": ["--early-stopping-patience", "2", "--metric",
                                                "loss"],
            "dropout 0.2, weight decay 0.1": ["--hidden-dropout", "0.2", "--weight-decay", "0.1"]}
    runs = {}
    for arm, flags in arms.items():
        for seed in a.seeds:
            train = stratified(f"{a.data}/train.jsonl", 100, seed,
                               os.path.join(a.out, "data", f"train-n100-s{seed}.jsonl"))
            tag = {"no remedy": "none", "early stopping": "early"}.get(arm, "dropout")
            runs.setdefault(arm, []).append(b.run(
                f"overfit-{tag}", seed, ["--epochs", "20", "--batch-size", "16", *flags], train,
                precision="fp32"))
    b.make(a.jobs)
    accs = compare(runs)
    secs = {k: statistics.mean(results(d)["train_seconds"] for d in v) for k, v in runs.items()}
    best = max(["early stopping", "dropout 0.2, weight decay 0.1"],
               key=lambda k: stats(accs[k])[0])
    return line("9. dropout and early stopping fix overfitting on small data (100 examples)",
                "; ".join(f"{k}: {fmt(accs[k])} in {secs[k]:.0f} s" for k in arms) +
                " (every arm keeps its best checkpoint on dev)",
                versus(accs[best], accs["no remedy"]), "overfit", a)


def alone(out):
    """Exits when the finished run `out` was made with one thread beside other runs (--jobs):
    its seconds would not time it. A shared run (the default recipe) that an untimed row made
    first is the usual case; removing it lets the timed row make it again, alone."""
    if finished(out):
        threads = load_json(os.path.join(out, "config.json")).get("threads")
        if threads and threads < (os.cpu_count() or 1):
            raise SystemExit(f"{out}: made with --threads {threads} beside other runs, so its "
                             f"seconds time nothing; remove it (rm -r {out}) to make it alone")
    return out


def timed_arms(b, a, arms, title, base):
    """Arms {name: make(seed) -> run dir} whose seconds are compared: the first seed's runs are
    made one at a time, with the machine to themselves; the other seeds' runs, which give the
    accuracy its spread, --jobs at a time. Prints the table; returns (what each arm measured,
    how each other arm compares with `base`), the row's measured and verdict cells."""
    for make in arms.values():
        alone(make(a.seeds[0]))
    b.make(1)
    runs = {k: [make(s) for s in a.seeds] for k, make in arms.items()}
    b.make(a.jobs)
    accs = compare(runs)
    secs = {k: results(v[0])["train_seconds"] for k, v in runs.items()}
    print(f"| {title} | test acc | train seconds (seed {a.seeds[0]}, alone) | speed-up |")
    print("|---|---|---|---|")
    for k in arms:
        print(f"| {k} | {fmt(accs[k])} | {secs[k]:.0f} | {secs[base] / secs[k]:.2f}x |")
    m = {k: stats(x) for k, x in accs.items()}
    said = []
    for k in arms:
        if k != base:
            diff = 100 * (m[k][0] - m[base][0])
            inside = abs(diff) <= noise([m[k][1], m[base][1]])
            said.append(f"{k} against {base}: {diff:+.2f} points, "
                        + ("inside the noise" if inside else "beyond the noise")
                        + f", {secs[base] / secs[k]:.2f}x as fast")
    return "; ".join(f"{k}: {fmt(accs[k])} in {secs[k]:.0f} s" for k in arms), "; ".join(said)


def row_precision(b, a):
    """fp32 against bf16 autocast, the precision of the claims' default run."""
    measured, said = timed_arms(
        b, a, {"fp32": lambda s: b.run("precision-fp32", s, [], precision="fp32"),
               "bf16": b.default}, "precision", "fp32")
    return line("(the runs themselves) bf16 autocast trains as well as fp32, faster", measured,
                said, "precision", a)


def row_compile(b, a):
    """bf16 with --compile against bf16 eager (the claims' default run)."""
    measured, said = timed_arms(
        b, a, {"bf16": b.default,
               "bf16 --compile": lambda s: b.run("precision-bf16-compile", s, ["--compile"])},
        "compile", "bf16")
    return line("(the runs themselves) torch.compile makes fine-tuning faster", measured, said,
                "compile", a)


def need(a, flag, row):
    """The checkpoint that --flag names, or a one-line exit saying how to make it."""
    path = getattr(a, flag)
    if not os.path.isdir(path):
        raise SystemExit(f"claims.py {row}: --{flag.replace('_', '-')} {path}: no such "
                         "checkpoint; the README's claim 12 commands make it")
    return path


def row_domain(b, a):
    """The tiny model pretrained on news against the same pretrained as long on review text,
    random init as the floor."""
    news, reviews = need(a, "tiny_news", "domain"), need(a, "tiny_reviews", "domain")
    tiny = ["--lr", "1e-3", "--layer-lr-decay", "1.0"]  # bench/pretrained_vs_random.py's choice
    arms = {"tiny, news": (news, tiny), "tiny, reviews": (reviews, tiny),
            "tiny, random init": (news, [*tiny, "--init", "random"])}
    runs = {k: [b.run(f"domain-{k.split(', ')[1].split()[0]}", s, f, model=m, precision="fp32")
                for s in a.seeds] for k, (m, f) in arms.items()}
    b.make(a.jobs)
    accs = compare(runs)
    return line("12. a model pretrained on data close to the target domain matters",
                "; ".join(f"{k}: {fmt(x)}" for k, x in accs.items()),
                versus(accs["tiny, reviews"], accs["tiny, news"]), "domain", a)


def row_dapt(b, a):
    """MiniLM with its pretraining continued on the review text (domain-adaptive pretraining,
    what users run) against MiniLM as it is: the default recipe from each."""
    ckpt = need(a, "minilm_reviews", "dapt")
    # runs named after the checkpoint's run (runs/minilm-reviews/best -> dapt-minilm-reviews), so
    # that a longer continued pretraining gets runs of its own
    path = os.path.abspath(ckpt)
    name = os.path.basename(os.path.dirname(path) if os.path.basename(path) == "best" else path)
    runs = {"MiniLM, continued on reviews": [b.run(f"dapt-{name}", s, [], model=ckpt)
                                             for s in a.seeds],
            "MiniLM": [b.default(s) for s in a.seeds]}
    b.make(a.jobs)
    accs = compare(runs)
    return line("12. (MiniLM) continuing pretraining on in-domain text helps",
                "; ".join(f"{k}: {fmt(x)}" for k, x in accs.items()),
                versus(accs["MiniLM, continued on reviews"], accs["MiniLM"]), "dapt", a)


ROWS = {"transfer": row_transfer, "lr": row_lr, "epochs": row_epochs, "freeze": row_freeze,
        "layerwise": row_layerwise, "batch": row_batch, "overfit": row_overfit,
        "plateau": row_plateau, "domain": row_domain, "dapt": row_dapt, "precision": row_precision,
        "compile": row_compile}
TIMED = {"freeze", "precision", "compile"}  # rows that time their first seed's runs alone


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rows", nargs="+", choices=ROWS)
    p.add_argument("--model", default="weights/minilm-l6")
    p.add_argument("--data", default="data/rt-snippets")
    p.add_argument("--out", default="runs/claims")
    p.add_argument("--seeds", default="42,43,44")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--plot-dir", default=None)
    p.add_argument("--tiny-news", default="runs/tiny-news/best", help="domain: checkpoint")
    p.add_argument("--tiny-reviews", default="runs/tiny-reviews/best", help="domain: checkpoint")
    p.add_argument("--minilm-reviews", default="runs/minilm-reviews/best",
                   help="dapt: MiniLM with its pretraining continued on review text")
    a = p.parse_args()
    a.seeds_arg, a.seeds = a.seeds, [int(s) for s in a.seeds.split(",")]
    print(f"machine: {machine()}; model {a.model}; data {a.data}; seeds {a.seeds}",
          file=sys.stderr)
    b = Bench(a)
    # The untimed rows' runs go in one queue first, so that no job waits idle at a row's end.
    b.planning = True
    for r in a.rows:
        if r not in TIMED:
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # a finished row prints later
                    ROWS[r](b, a)
            except Planned:
                pass
    b.planning = False
    b.todo = b.planned
    b.make(a.jobs)
    lines = []
    for r in a.rows:
        got = ROWS[r](b, a)
        lines += got if isinstance(got, list) else [got]
    runs = "one fine-tune at a time" if a.jobs == 1 else \
        f"{a.jobs} fine-tunes at a time, one thread each"
    print(f"\nmachine: {machine()}; {runs}")
    print(f"| claim | measured on {name(a.data)} (test accuracy %) "
          "| verdict | command |")
    print("|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
