"""What pretraining is worth: fine-tune rt-snippets from a pretrained checkpoint and from the same
architecture with random weights, with the learning rate chosen on dev for each.

Runs `minibert sweep` twice (the two arms side by side, one CPU thread each) over the grid
lr x seed, then prints, per arm and lr, dev and test accuracy as mean +- sd over the seeds, and
the lr each arm would pick by mean dev accuracy. Seeds average out the +-1.3 points that one
run's test accuracy moves on 1,061 test sentences.

    python bench/pretrained_vs_random.py --model runs/tiny-news/best \\
        [--lrs 2e-4,1e-3,2e-3] [--seeds 1,2,3] [--out runs/pretrained-vs-random]

The sweeps are resumable: the same command again reads the trials that are done.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.finetune_vs_transformers import machine  # noqa: E402

DATA = "data/rt-snippets"


def sweep_command(a, arm):
    init = ["--init", "random"] if arm == "random" else []
    return [sys.executable, "-P", "-m", "train.cli", "sweep", "--grid", f"lr={a.lrs}",
            "--grid", f"seed={a.seeds}", "--out", f"{a.out}/{arm}", "--",
            "--model", a.model, *init, "--task", "classification",
            "--train", f"{DATA}/train.jsonl", "--dev", f"{DATA}/dev.jsonl",
            "--test", f"{DATA}/test.jsonl", "--layer-lr-decay", "1.0", "--threads", "1"]


def summarise(path):
    """{lr: (dev accuracies, test accuracies)} over the seeds of one sweep."""
    with open(path) as f:
        trials = json.load(f)["trials"]
    out = {}
    for t in trials:
        if t["status"] == "done":
            dev, test = out.setdefault(t["values"]["lr"], ([], []))
            dev.append(t["dev_accuracy"])
            test.append(t["test_accuracy"])
    return out


def mean_sd(xs):
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * statistics.mean(xs):.2f} +- {100 * sd:.2f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the pretrained checkpoint (its best/)")
    p.add_argument("--lrs", default="2e-4,1e-3,2e-3")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--out", default="runs/pretrained-vs-random")
    a = p.parse_args()
    procs = []
    for arm in ("pretrained", "random"):
        cmd = sweep_command(a, arm)
        print(" ".join(cmd), file=sys.stderr)
        os.makedirs(f"{a.out}/{arm}", exist_ok=True)
        with open(f"{a.out}/{arm}.log", "w") as log:  # the child keeps its own copy of the fd
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
    if any(pr.wait() for pr in procs):
        raise SystemExit(f"a sweep failed; see {a.out}/pretrained.log and random.log")

    n = len(a.seeds.split(","))
    print(f"machine: {machine()} (here; each fine-tuning run: 1 thread, the arms side by side)")
    print(f"\n| init | lr | dev accuracy (mean +- sd, {n} seeds) | test accuracy |")
    print("|---|---|---|---|")
    picked = {}
    for arm in ("pretrained", "random"):
        s = summarise(f"{a.out}/{arm}/sweep.json")
        for lr, (dev, test) in s.items():
            print(f"| {arm} | {lr} | {mean_sd(dev)} | {mean_sd(test)} |")
        best = max(s, key=lambda lr: statistics.mean(s[lr][0]))
        picked[arm] = (best, statistics.mean(s[best][1]))
    print()
    for arm, (lr, test) in picked.items():
        print(f"{arm}: lr {lr} chosen on dev, test accuracy {100 * test:.2f}")
    gap = 100 * (picked["pretrained"][1] - picked["random"][1])
    print(f"pretrained - random: {gap:+.2f} points of test accuracy")


if __name__ == "__main__":
    main()
