"""Serving a fine-tuned run on this CPU: latency, throughput, size and test accuracy of every form
minibert ships it in, against transformers fp32 (what users run today), in one run.

    python bench/latency.py --run runs/rt --data data/rt-snippets [--threads 2]

The run is the quick start's default (MiniLM-L6, mean pooling, rt-snippets). Its forms:

| row                        | what runs                                                          |
|----------------------------|--------------------------------------------------------------------|
| transformers fp32          | `BertModel.from_pretrained(best/)`, mean pooling, the run's head   |
| minibert fp32              | the run's best/ as `minibert predict` loads it (SDPA attention)    |
| minibert bf16 autocast     | the same under torch.autocast(cpu, bfloat16)                       |
| minibert int8 reference    | train/deploy/int8.py's Int8Linear as the math (per-token, int32)   |
| onnxruntime fp32           | `minibert export RUN --to onnx`                                    |
| onnxruntime optimized      | `minibert export RUN --to onnx --optimize`                         |
| onnxruntime int8           | `minibert quantize RUN`: minibert's int8 fast path                 |

`--profile` prints, instead of the table, where onnxruntime spends its time at batch 32 in the
fp32 and int8 graphs (its own profiler, summed by operator type over the first 10 batches).

Every row is scored by the task's own evaluate (test accuracy) and timed on the same inputs:
latency per example at batch 1 (p50, p95 over --n-latency test sentences, after warm-up) and
throughput at batch 32 (the whole test set in file order, each batch padded to its longest).
Speeds are ratios to the transformers row of the same run. Size is the file(s) a server loads.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.finetune_vs_transformers import machine  # noqa: E402
from minibert.checkpoint import read_safetensors  # noqa: E402
from minibert.tokenizer import Tokenizer  # noqa: E402
from train.data.examples import read_examples  # noqa: E402
from train.deploy.int8 import quantize_encoder, weight_qmax  # noqa: E402
from train.deploy.onnx_run import load_onnx_task_model  # noqa: E402
from train.finetune.finetune import load_task_model  # noqa: E402
from train.tasks.classification import EncodedDataset  # noqa: E402

FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx_vnni")


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            have = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "flags unknown"
    return ", ".join(f for f in FLAGS if f in have) or "none of " + ", ".join(FLAGS)


class TransformersModel(torch.nn.Module):
    """transformers' BertModel with the run's mean pooling and head: model(batch) -> logits."""

    def __init__(self, best):
        super().__init__()
        from transformers import BertModel
        self.bert = BertModel.from_pretrained(best).eval()
        head = read_safetensors(os.path.join(best, "head.safetensors"))
        self.out = torch.nn.Linear(*head["out.weight"].shape[::-1])
        self.out.load_state_dict({"weight": head["out.weight"], "bias": head["out.bias"]})

    def forward(self, batch):
        mask = batch["attention_mask"]
        h = self.bert(input_ids=batch["input_ids"], attention_mask=mask,
                      token_type_ids=batch["token_type_ids"]).last_hidden_state  # (B, T, C)
        m = mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        return {"logits": self.out((h * m).sum(1) / m.sum(1).clamp(min=1))}


class Autocast(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.model(batch)
        return {k: v.float() for k, v in out.items()}


def size_mb(*paths):
    return sum(os.path.getsize(p) for p in paths) / 2 ** 20


def timed(model, ds, n_latency, warmup=10):
    """(p50 ms, p95 ms) at batch 1 and examples/s at batch 32."""
    with torch.inference_mode():
        for i in range(warmup):
            model(ds.collate([i]))
        times = []
        for i in range(n_latency):
            batch = ds.collate([i])
            t = time.perf_counter()
            model(batch)
            times.append(1000 * (time.perf_counter() - t))
        batches = [ds.collate(list(range(s, min(s + 32, len(ds.lengths)))))
                   for s in range(0, len(ds.lengths), 32)]
        model(batches[0])
        t = time.perf_counter()
        for b in batches:
            model(b)
        eps = len(ds.lengths) / (time.perf_counter() - t)
    q = statistics.quantiles(times, n=20)
    return statistics.median(times), q[18], eps


def profile(export_dir, ds, threads, n_batches=10):
    """{operator type: share of kernel time} of onnxruntime on batches of 32."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.enable_profiling, opts.intra_op_num_threads = True, threads
    opts.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    session = ort.InferenceSession(os.path.join(export_dir, "model.onnx"), opts,
                                   providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for s in range(0, 32 * n_batches, 32):
        batch = ds.collate(list(range(s, s + 32)))
        session.run(None, {n: batch[n].numpy() for n in names})
    with open(session.end_profiling()) as f:
        events = json.load(f)
    by_op = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] = by_op.get(e["args"]["op_name"], 0) + e["dur"]
    total = sum(by_op.values())
    return {op: t / total for op, t in sorted(by_op.items(), key=lambda kv: -kv[1])}


def minibert_cli(*args):
    subprocess.run([sys.executable, "-P", "-m", "train.cli", *map(str, args)], check=True,
                   stdout=subprocess.DEVNULL)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/rt")
    p.add_argument("--data", default="data/rt-snippets")
    p.add_argument("--threads", type=int, default=None, help="default: torch's choice")
    p.add_argument("--n-latency", type=int, default=300)
    p.add_argument("--out", default=None, help="where the exports go (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--profile", action="store_true",
                   help="print onnxruntime's time per operator type instead of the table")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    best = os.path.join(a.run, "best")
    model, task = load_task_model(best, "cpu")
    meta = task.meta
    if (meta["task"], meta.get("pooling"), meta.get("pair_field")) != ("classification", "mean",
                                                                       None):
        # the transformers row rebuilds exactly that head (mean pooling, one text)
        raise SystemExit(f"bench/latency.py: {a.run} is a {meta['task']} run with pooling "
                         f"{meta.get('pooling')} and pair field {meta.get('pair_field')}; "
                         "this bench serves a single-text classification run with mean pooling")
    out = a.out or tempfile.mkdtemp(prefix="latency-")
    dirs = {k: os.path.join(out, k) for k in ("onnx", "onnx-opt", "onnx-int8")}
    print(f"exporting {best} into {out}", file=sys.stderr)
    minibert_cli("export", a.run, "--to", "onnx", "--out", dirs["onnx"])
    minibert_cli("export", a.run, "--to", "onnx", "--optimize", "--out", dirs["onnx-opt"])
    minibert_cli("quantize", a.run, "--out", dirs["onnx-int8"])

    tok = Tokenizer.from_dir(best)
    examples, _ = read_examples(os.path.join(a.data, "test.jsonl"), meta["text_field"], None,
                                "label")
    targets = [task.index[str(e.target)] for e in examples]
    ds = EncodedDataset(examples, tok, task.meta["max_length"], targets, 32)
    if a.profile:
        print(f"machine: {machine()}; {cpu_flags()}; onnxruntime threads {threads}")
        for name in ("onnx", "onnx-int8"):
            shares = profile(dirs[name], ds, threads)
            print(f"{name} at batch 32: " + ", ".join(
                f"{op} {100 * v:.1f}%" for op, v in list(shares.items())[:10]))
        return
    weights = [os.path.join(best, f) for f in ("model.safetensors", "head.safetensors")]
    rows = [
        ("transformers fp32", TransformersModel(best), size_mb(*weights)),
        ("minibert fp32", model, size_mb(*weights)),
        ("minibert bf16 autocast", Autocast(model), size_mb(*weights)),
        ("minibert int8 reference", quantize_encoder(model, weight_qmax())[0], None),
        ("onnxruntime fp32", load_onnx_task_model(dirs["onnx"], threads)[0],
         size_mb(os.path.join(dirs["onnx"], "model.onnx"))),
        ("onnxruntime optimized", load_onnx_task_model(dirs["onnx-opt"], threads)[0],
         size_mb(os.path.join(dirs["onnx-opt"], "model.onnx"))),
        ("onnxruntime int8 (minibert's fast path)",
         load_onnx_task_model(dirs["onnx-int8"], threads)[0],
         size_mb(os.path.join(dirs["onnx-int8"], "model.onnx"))),
    ]
    results = []
    for name, m, mb in rows:
        print(f"measuring {name}", file=sys.stderr)
        acc = task.evaluate(m, ds, "cpu")["accuracy"]
        p50, p95, eps = timed(m, ds, a.n_latency)
        results.append({"row": name, "p50_ms": p50, "p95_ms": p95, "examples_per_s": eps,
                        "size_mb": mb, "test_accuracy": acc})
    base = results[0]
    print(f"machine: {machine()}; {cpu_flags()}; onnxruntime threads {threads}")
    print(f"run: {a.run} ({task.meta.get('pooling')} pooling), test set {len(examples)} "
          f"sentences; batch 1 over the first {a.n_latency}, batch 32 over all\n")
    print("| form | batch 1 p50 ms | p95 ms | batch 1 x | batch 32 ex/s | batch 32 x | "
          "size MB | size x | test acc |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        size = f"{r['size_mb']:.1f} | {r['size_mb'] / base['size_mb']:.2f}" \
            if r["size_mb"] else "(no file) | -"
        print(f"| {r['row']} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | "
              f"{base['p50_ms'] / r['p50_ms']:.2f} | {r['examples_per_s']:.0f} | "
              f"{r['examples_per_s'] / base['examples_per_s']:.2f} | {size} | "
              f"{r['test_accuracy']:.4f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine(), "flags": cpu_flags(), "rows": results}, f, indent=2)


if __name__ == "__main__":
    main()
