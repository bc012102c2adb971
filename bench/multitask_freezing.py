"""Two heads on one backbone, trained alone, together, and with parts frozen: rt-snippets
polarity (classification) and intensity (regression on `score`, standardised), MiniLM.

Runs `minibert finetune --task multitask` five times and prints dev and test metrics per head:

    1 polarity alone                    the classification head and the backbone
    2 intensity alone                   the regression head and the backbone
    3 together                          both heads and the backbone, batches sampled in proportion
    4 together, backbone frozen         both heads only: linear probes on MiniLM's features
    5 from 1, polarity head frozen      run 1's backbone and polarity head; the polarity head
                                        keeps its weights, its loss stays on, intensity learns

    python bench/multitask_freezing.py [--max-train N] [--epochs E] [--threads 1]
                                       [--seeds 42,43,44]

With several seeds (each run's --seed: head init, dropout, batch order) every cell is the mean
+- sd over them. A run already finished under --out is read back, not made again: seed 42's
runs are in --out, another seed's in OUT-sSEED.

Every run uses minibert's defaults (lr 1e-4 at the top block with layer-wise decay 0.9, head lr
1e-3, mean pooling) except the flags named here. --max-train takes N evenly spaced train rows
(the file is ordered by label); dev and test are whole.
"""

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.claims import stats  # noqa: E402
from bench.finetune_vs_transformers import machine  # noqa: E402
from bench.tasks_vs_transformers import subset  # noqa: E402

SRC = "data/rt-snippets"


def mean_sd(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    m, sd = stats(xs)
    return f"{m:.4f}" + (f" +- {sd:.4f}" if sd is not None else "")


def runs_for(a, out):
    """[(label, run dir, model, tasks, flags)] of one seed's five runs under `out`."""
    data = f"{out}/data"
    subset(SRC, data, "train", a.max_train)
    for split in ("dev", "test"):
        subset(SRC, data, split, 10 ** 9)
    pol = f"polarity:classification:{data}/{{split}}.jsonl:label_field=label"
    inten = f"intensity:regression:{data}/{{split}}.jsonl:target_field=score:" \
            "standardize_targets=true"
    first = f"{out}/1-polarity/best"
    return [("1 polarity alone", f"{out}/1-polarity", a.model, [pol], []),
            ("2 intensity alone", f"{out}/2-intensity", a.model, [inten], []),
            ("3 together", f"{out}/3-together", a.model, [pol, inten], []),
            ("4 together, backbone frozen", f"{out}/4-frozen-backbone", a.model, [pol, inten],
             ["--freeze-backbone"]),
            ("5 from 1, polarity head frozen", f"{out}/5-frozen-polarity", first, [pol, inten],
             ["--init-heads", f"polarity={first}", "--freeze-head", "polarity"])]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="weights/minilm-l6")
    p.add_argument("--max-train", type=int, default=100000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", default="42", help="comma-separated; each run's --seed")
    p.add_argument("--out", default="runs/bench-multitask")
    a = p.parse_args()
    seeds = [int(x) for x in a.seeds.split(",")]
    print(f"machine: {machine()} (here; runs made now: --threads {a.threads}; finished runs are "
          f"read back as they were made; seeds {seeds})", flush=True)
    found = {}  # label -> [results.json per seed]
    for seed in seeds:
        out = a.out if seed == 42 else f"{a.out}-s{seed}"
        for label, run, model, tasks, extra in runs_for(a, out):
            if not os.path.exists(f"{run}/results.json"):
                cmd = [sys.executable, "-P", "-m", "train.cli", "finetune", "--task", "multitask",
                       "--model", model, "--tasks", ",".join(tasks), "--out", run,
                       "--epochs", str(a.epochs), "--max-length", str(a.max_length),
                       "--eval-every", "none", "--log-every", "50", "--threads", str(a.threads),
                       "--seed", str(seed), *extra]
                print(" ".join(cmd), file=sys.stderr)
                subprocess.run(cmd, check=True)
            else:
                print(f"{run}: finished, read back", file=sys.stderr)
            with open(f"{run}/results.json") as f:
                res = json.load(f)
            found.setdefault(label, []).append(res)
            print(json.dumps({"run": label, "seed": seed, "dev": res["dev"],
                              "test": res.get("test")}), flush=True)

    def cell(label, split, key):
        return mean_sd([(r.get(split) or {}).get(key) for r in found[label]])
    print("\n| run | polarity acc dev | test | intensity Pearson dev | test | train seconds |")
    print("|---|---|---|---|---|---|")
    for label, rs in found.items():
        secs = stats([r["train_seconds"] for r in rs])[0]
        print(f"| {label} | {cell(label, 'dev', 'polarity/accuracy')} | "
              f"{cell(label, 'test', 'polarity/accuracy')} | "
              f"{cell(label, 'dev', 'intensity/pearson')} | "
              f"{cell(label, 'test', 'intensity/pearson')} | {secs:.0f} |")


if __name__ == "__main__":
    main()
