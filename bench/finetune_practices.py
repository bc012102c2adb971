"""The fine-tuning practices, measured: one run per recipe on the same data, printed as a table.

Each row is `minibert finetune` with the defaults plus the flags shown, on rt-snippets (test
accuracy of the best-on-dev checkpoint, training seconds, trainable parameters). Runs that
already have a results.json under --out are not run again, so the script can be resumed.

    python bench/finetune_practices.py [--model weights/minilm-l6] [--only NAME ...]
"""

import argparse
import json
import os
import platform
import subprocess
import sys

RECIPES = {
    "default (layer-wise lr decay 0.9, top lr 1e-4)": [],
    "flat lr 5e-5, no layer-wise decay": ["--lr", "5e-5", "--layer-lr-decay", "1.0"],
    "BERT's [CLS] pooler, one lr 5e-5 for all": ["--pooling", "cls", "--lr-head", "none",
                                                 "--lr", "5e-5", "--layer-lr-decay", "1.0"],
    "frozen backbone (head only)": ["--freeze-backbone"],
    "gradual unfreezing": ["--unfreeze-every", "100", "--unfreeze-unit", "step",
                           "--stage-lrs", "1e-3,1e-4", "--lr-head", "none"],
    "random init (no pretraining)": ["--init", "random"],
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="weights/minilm-l6")
    ap.add_argument("--data", default="data/rt-snippets")
    ap.add_argument("--out", default="runs/practices")
    ap.add_argument("--only", nargs="*", default=None, help="recipe names to run")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="flags added to every run, e.g. --extra --threads 1")
    args = ap.parse_args()
    base = ["--model", args.model, "--task", "classification",
            "--train", f"{args.data}/train.jsonl", "--dev", f"{args.data}/dev.jsonl",
            "--test", f"{args.data}/test.jsonl"]
    rows = []
    for name, flags in RECIPES.items():
        if args.only and name not in args.only:
            continue
        out = os.path.join(args.out, name.split(" (")[0].split(",")[0].replace(" ", "-")
                           .replace("'", "").replace("[", "").replace("]", ""))
        res = os.path.join(out, "results.json")
        cmd = ["minibert", "finetune", *base, "--out", out, *flags, *args.extra]
        if not os.path.exists(res):
            print("running: " + " ".join(cmd), file=sys.stderr, flush=True)
            subprocess.run([sys.executable, "-P", "-m", "train.cli", *cmd[1:]], check=True)
        with open(res) as f:
            r = json.load(f)
        rows.append((name, r["test"]["accuracy"], r["dev"]["accuracy"], r["train_seconds"],
                     " ".join(flags) or "(defaults)"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; data: {args.data}")
    print("| recipe | test acc | dev acc | train s | flags |")
    print("|---|---|---|---|---|")
    for name, test, dev, sec, flags in rows:
        print(f"| {name} | {test:.4f} | {dev:.4f} | {sec:.0f} | `{flags}` |")


if __name__ == "__main__":
    main()
