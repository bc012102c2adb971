"""Fine-tuning, minibert against transformers, in one run on the same machine.

The reference is transformers' BertForSequenceClassification on the same checkpoint and split,
trained as the fine-tuning issue specifies: torch.optim.AdamW (lr 5e-5, weight decay 0.01),
3 epochs, batch 32, 10% linear warm-up then linear decay, gradient clipping at 1.0, max length 128,
dynamic padding. minibert runs `minibert finetune` with its defaults. Prints test accuracy, wall
seconds of training, and the ratios.

    python bench/finetune_vs_transformers.py [--model weights/minilm-l6] [--data data/rt-snippets]
"""

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time

import torch


def machine():
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def precision_said():
    """What `minibert finetune --precision auto` (its default) runs in on this machine."""
    from train.loop.device import describe_precision, resolve_precision
    cpu = torch.device("cpu")
    return describe_precision(*resolve_precision("auto", cpu), "auto", cpu)


def read(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def run_transformers(model_dir, data_dir, seed=42):
    from transformers import (AutoTokenizer, BertForSequenceClassification,
                              get_linear_schedule_with_warmup)
    torch.manual_seed(seed)
    random.seed(seed)
    train, test = read(f"{data_dir}/train.jsonl"), read(f"{data_dir}/test.jsonl")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    steps = 3 * -(-len(train) // 32)
    sched = get_linear_schedule_with_warmup(opt, int(0.1 * steps), steps)
    t0 = time.time()
    for epoch in range(3):
        model.train()
        order = list(range(len(train)))
        random.shuffle(order)
        for s in range(0, len(order), 32):
            rows = [train[i] for i in order[s:s + 32]]
            b = tok([r["text"] for r in rows], truncation=True, max_length=128, padding=True,
                    return_tensors="pt")
            loss = model(**b, labels=torch.tensor([r["label"] for r in rows])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
        print(f"transformers: epoch {epoch + 1} done at {time.time() - t0:.0f}s", file=sys.stderr)
    seconds = time.time() - t0
    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(test), 128):
            rows = test[s:s + 128]
            b = tok([r["text"] for r in rows], truncation=True, max_length=128, padding=True,
                    return_tensors="pt")
            pred = model(**b).logits.argmax(-1)
            correct += (pred == torch.tensor([r["label"] for r in rows])).sum().item()
    return correct / len(test), seconds


def run_minibert(model_dir, data_dir, out):
    cmd = [sys.executable, "-P", "-m", "train.cli", "finetune", "--model", model_dir,
           "--task", "classification", "--train", f"{data_dir}/train.jsonl",
           "--dev", f"{data_dir}/dev.jsonl", "--test", f"{data_dir}/test.jsonl", "--out", out]
    print("minibert: " + " ".join(cmd[2:]), file=sys.stderr)
    subprocess.run(cmd, check=True)
    with open(os.path.join(out, "results.json")) as f:
        r = json.load(f)
    return r["test"]["accuracy"], r["train_seconds"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="weights/minilm-l6")
    ap.add_argument("--data", default="data/rt-snippets")
    ap.add_argument("--out", default="runs/bench-minibert")
    ap.add_argument("--only", choices=("minibert", "transformers"), default=None)
    args = ap.parse_args()
    rows = {}
    if args.only != "transformers":
        rows["minibert"] = run_minibert(args.model, args.data, args.out)
    if args.only != "minibert":
        rows["transformers"] = run_transformers(args.model, args.data)
    print(f"machine: {machine()}")
    print(f"minibert: {precision_said()}; transformers: fp32, as it trains by default")
    print(f"{'':14s} {'test accuracy':>14s} {'train seconds':>14s}")
    for name, (acc, sec) in rows.items():
        print(f"{name:14s} {acc:14.4f} {sec:14.1f}")
    if len(rows) == 2:
        (a1, s1), (a2, s2) = rows["minibert"], rows["transformers"]
        print(f"{'ratio':14s} {a1 - a2:+14.4f} {s2 / s1:13.2f}x  "
              "(accuracy difference; transformers seconds / minibert seconds)")


if __name__ == "__main__":
    main()
