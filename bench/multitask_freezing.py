"""Two heads on one backbone, trained alone, together, and with parts frozen: rt-snippets
polarity (classification) and intensity (regression on `score`, standardised), MiniLM.

Runs `minibert finetune --task multitask` five times and prints dev and test metrics per head:

    1 polarity alone                    the classification head and the backbone
    2 intensity alone                   the regression head and the backbone
    3 together                          both heads and the backbone, batches sampled in proportion
    4 together, backbone frozen         both heads only: linear probes on MiniLM's features
    5 from 1, polarity head frozen      run 1's backbone and polarity head; the polarity head
                                        keeps its weights, its loss stays on, intensity learns

    python bench/multitask_freezing.py [--max-train N] [--epochs E] [--threads 1] [--seed S]

Every run uses minibert's defaults (lr 1e-4 at the top block with layer-wise decay 0.9, head lr
1e-3, mean pooling) except the flags named here. --max-train takes N evenly spaced train rows
(the file is ordered by label); dev and test are whole.
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.finetune_vs_transformers import machine  # noqa: E402
from bench.tasks_vs_transformers import subset  # noqa: E402

SRC = "data/rt-snippets"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="weights/minilm-l6")
    p.add_argument("--max-train", type=int, default=100000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=42, help="every run's --seed (head init, dropout, "
                   "batch order); seed 42's runs go in --out, another seed's in OUT-sSEED")
    p.add_argument("--out", default="runs/bench-multitask")
    a = p.parse_args()
    if a.seed != 42:
        a.out = f"{a.out}-s{a.seed}"
    data = f"{a.out}/data"
    subset(SRC, data, "train", a.max_train)
    for split in ("dev", "test"):
        subset(SRC, data, split, 10 ** 9)
    pol = f"polarity:classification:{data}/{{split}}.jsonl:label_field=label"
    inten = f"intensity:regression:{data}/{{split}}.jsonl:target_field=score:" \
            "standardize_targets=true"
    first = f"{a.out}/1-polarity/best"
    runs = [("1 polarity alone", "1-polarity", a.model, [pol], []),
            ("2 intensity alone", "2-intensity", a.model, [inten], []),
            ("3 together", "3-together", a.model, [pol, inten], []),
            ("4 together, backbone frozen", "4-frozen-backbone", a.model, [pol, inten],
             ["--freeze-backbone"]),
            ("5 from 1, polarity head frozen", "5-frozen-polarity", first, [pol, inten],
             ["--init-heads", f"polarity={first}", "--freeze-head", "polarity"])]
    print(f"machine: {machine()} (here; each run: --threads {a.threads}, --seed {a.seed})",
          flush=True)
    rows = []
    for label, name, model, tasks, extra in runs:
        cmd = [sys.executable, "-P", "-m", "train.cli", "finetune", "--task", "multitask",
               "--model", model, "--tasks", ",".join(tasks), "--out", f"{a.out}/{name}",
               "--epochs", str(a.epochs), "--max-length", str(a.max_length),
               "--eval-every", "none", "--log-every", "50", "--threads", str(a.threads),
               "--seed", str(a.seed), *extra]
        print(" ".join(cmd), file=sys.stderr)
        t0 = time.time()
        subprocess.run(cmd, check=True)
        with open(f"{a.out}/{name}/results.json") as f:
            res = json.load(f)
        rows.append((label, res, time.time() - t0))
        print(json.dumps({"run": label, "dev": res["dev"], "test": res.get("test")}), flush=True)

    def cell(res, split, key):
        v = (res.get(split) or {}).get(key)
        return f"{v:.4f}" if v is not None else "-"
    print("\n| run | polarity acc dev | test | intensity Pearson dev | test | seconds |")
    print("|---|---|---|---|---|---|")
    for label, res, secs in rows:
        print(f"| {label} | {cell(res, 'dev', 'polarity/accuracy')} | "
              f"{cell(res, 'test', 'polarity/accuracy')} | "
              f"{cell(res, 'dev', 'intensity/pearson')} | "
              f"{cell(res, 'test', 'intensity/pearson')} | {secs:.0f} |")


if __name__ == "__main__":
    main()
