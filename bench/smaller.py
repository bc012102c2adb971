"""Smaller models on this CPU: distilled students and pruned models against their teacher, with
test accuracy, speed and size measured in one run, and the guides' claims beside them.

    python bench/smaller.py --teacher runs/rt --data data/rt-snippets --out runs/smaller \
        [--seeds 42,43,44 [--all-seeds-for layers=0,2,4]] [--tiny DIR] [--prune-steps 200]
        [--tiny-flags "--lr 1e-3"] [--jobs 2] [--threads 2] [--plot docs/smaller.png]

The teacher is the quick start's run (MiniLM-L6 fine-tuned on rt-snippets). Its forms:
- distilled students: the teacher's own layers (every 2nd, every 3rd, the first: 3, 2 and 1
  layers; DistilBERT's initialisation), each trained twice with the teacher's recipe: with
  distillation (`minibert distill`, default alpha and temperature) and on the hard labels
  alone (`--alpha 1`, the same command and initialisation), so the difference is what the
  teacher's soft targets add; with --tiny DIR, that checkpoint as a student too;
- pruned models: 20, 40 and 60% of the heads, 25 and 50% of the FFN neurons (`minibert prune`,
  importance on 2,048 training examples), each scored as cut and after --prune-steps of
  fine-tuning with the teacher's recipe.
Every model is timed the same way, with minibert's fp32 torch path (SDPA attention), as
bench/latency.py times its rows (`timed`): latency per example at batch 1 (p50) and examples per
second at batch 32 over the test set, the best of 3 timings, once per model shape. Size is the safetensors files a server loads. Ratios are
to the teacher in the same run. Runs already finished in --out are reused, so an interrupted
bench continues where it stopped.
"""

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.finetune_vs_transformers import machine  # noqa: E402
from bench.latency import cpu_flags, size_mb, timed  # noqa: E402
from bench.runs import results, run_missing  # noqa: E402
from minibert.tokenizer import Tokenizer  # noqa: E402
from train.data.examples import read_examples  # noqa: E402
from train.finetune.finetune import load_task_model  # noqa: E402
from train.tasks.classification import EncodedDataset  # noqa: E402

STUDENTS = [("3 layers (0,2,4)", "0,2,4"), ("2 layers (0,3)", "0,3"), ("1 layer (0)", "0")]
PRUNE = [(0.2, 0.0), (0.4, 0.0), (0.6, 0.0), (0.0, 0.25), (0.0, 0.5)]
REPEATS = 3  # timings per model shape; the best is kept


def model_dirs(a):
    """{row name: [best dirs, one per seed]} for every model of the bench, training what is
    missing (bench/runs.py: --jobs at a time)."""
    data = [f"--{s}={os.path.join(a.data, s + '.jsonl')}" for s in ("train", "dev", "test")]
    rows, todo = {"teacher (MiniLM-L6)": [os.path.join(a.teacher, "best")]}, []
    students = [(name, f"layers={layers}", "L" + layers.replace(",", ""), [])
                for name, layers in STUDENTS]
    if a.tiny:
        label = checkpoint_label(a.tiny)
        students.append((f"{label} checkpoint", a.tiny, label, a.tiny_flags.split()))
    for name, spec, short, own in students:
        for mode, flags in (("distilled", []), ("hard labels", ["--alpha", "1"])):
            key = f"{name}, {mode}"
            rows[key] = []
            for seed in seeds_for(a, spec):
                out = os.path.join(a.out, "distill", f"{short}-{mode.split()[0]}-s{seed}")
                todo.append((out, ["distill", "--teacher", a.teacher, "--student", spec, *data,
                                   "--seed", seed, *own, *flags]))
                rows[key].append(os.path.join(out, "best"))
    for heads, ffn in PRUNE:
        what = f"{heads:.0%} of heads" if heads else f"{ffn:.0%} of FFN neurons"
        name = os.path.join(a.out, "prune", f"heads{heads:g}-ffn{ffn:g}")
        # The cut takes no seed (its scores come from the same 2,048 training examples), so it
        # is one row; the seed is the fine-tune's. The first seed keeps the unsuffixed name.
        rows[f"pruned {what}"] = [os.path.join(name, "pruned")]
        tuned = rows[f"pruned {what} + {a.prune_steps} steps"] = []
        for seed in seeds_for(a, f"heads={heads:g}" if heads else f"ffn={ffn:g}"):
            out = name + ("" if seed == a.seeds[0] else f"-s{seed}")
            todo.append((out, ["prune", a.teacher, "--heads", heads, "--ffn", ffn,
                               "--finetune-steps", a.prune_steps, "--seed", seed]))
            tuned.append(os.path.join(out, "finetune", "best"))
    run_missing(todo, a.jobs, 1 if a.jobs > 1 else None)
    return rows


def checkpoint_label(path):
    """runs/tiny-news/best -> tiny-news: the run a best/ comes from, else the folder's name."""
    path = os.path.normpath(path)
    name = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) or name if name == "best" else name


def seeds_for(a, spec):
    """Every seed for the specs named by --all-seeds-for (all of them when it is not given),
    else the first."""
    return a.seeds if not a.all_seeds_for or spec in a.all_seeds_for else a.seeds[:1]


def measure(best, test_path, n_latency, speeds):
    """Test accuracy, size and speed of best/. Models of one shape (a student trained two ways,
    a pruned model before and after its fine-tune) run the same arithmetic, so they are timed
    once, as the best of `REPEATS` timings: on a shared machine the slowest runs measure the
    neighbours, the fastest the model."""
    model, task = load_task_model(best, "cpu")
    tok = Tokenizer.from_dir(best)
    examples, _ = read_examples(test_path, "text", None, "label")
    ds = EncodedDataset(examples, tok, task.meta["max_length"],
                        [task.index[str(e.target)] for e in examples], 32)
    acc = task.evaluate(model, ds, "cpu")["accuracy"]
    c = model.bert.config
    shape = (f"{c.num_hidden_layers} L, {sum(b.attn.nh for b in model.bert.blocks)} heads, "
             f"{sum(c.ffn_size(i) for i in range(c.num_hidden_layers))} FFN")
    key = (shape, json.dumps(c.pruned_heads))
    if key not in speeds:
        runs = [timed(model, ds, n_latency) for _ in range(REPEATS)]
        speeds[key] = (min(r[0] for r in runs), max(r[2] for r in runs))
    p50, eps = speeds[key]
    return {"accuracy": acc, "p50_ms": p50, "examples_per_s": eps, "shape": shape,
            "size_mb": size_mb(*(os.path.join(best, f)
                                 for f in ("model.safetensors", "head.safetensors"))),
            "parameters": sum(p.numel() for p in model.parameters())}


def summarise(rows, test_path, n_latency):
    """One entry per row: the first seed's model timed, every seed's accuracy."""
    out, speeds = [], {}
    for name, dirs in rows.items():
        print(f"measuring {name}", file=sys.stderr)
        m = measure(dirs[0], test_path, n_latency, speeds)
        # the other seeds' test accuracy as their runs logged it (best/ lies in the run dir)
        accs = [m["accuracy"]] + [results(os.path.dirname(d))["test"]["accuracy"]
                                  for d in dirs[1:]]
        m.update(name=name, accuracies=accs, mean=statistics.mean(accs),
                 sd=statistics.stdev(accs) if len(accs) > 1 else None)
        out.append(m)
    return out


def claims(results):
    """The guides' deployment claims beside the measurements that answer each: the fastest row
    that keeps the claimed accuracy, and the most accurate row that reaches the claimed speed
    and size; the claim holds when one row does both."""
    t = results[0]

    def ratio(r):
        return (r["mean"] / t["mean"], r["examples_per_s"] / t["examples_per_s"],
                t["size_mb"] / r["size_mb"])

    def said(r):
        keep, speed, small = ratio(r)
        return (f"{r['name']}: {keep:.1%} of the teacher, {speed:.2f}x faster (batch 32), "
                f"{small:.2f}x smaller")

    def line(claim, rows, want_keep, want_speed, want_small):
        keeps = [r for r in rows if ratio(r)[0] >= want_keep]
        fast = [r for r in rows if ratio(r)[1] >= want_speed and ratio(r)[2] >= want_small]
        a = f"keeps {want_keep:.0%}: " + (said(max(keeps, key=lambda r: ratio(r)[1])) if keeps
                                          else "none")
        b = f"{want_speed:g}x faster and {want_small:.2g}x smaller: " + (
            said(max(fast, key=lambda r: r["mean"])) if fast else "none")
        holds = any(r in fast for r in keeps)
        return f"| {claim} | {a} | {b} | {'holds' if holds else 'does not hold'} |"

    distilled = [r for r in results if r["name"].endswith("distilled")]
    half = [r for r in distilled if r["name"].startswith("3 layers")]
    pruned = [r for r in results if r["name"].startswith("pruned")]
    return ["| claim | the fastest row that keeps the accuracy | the most accurate row as fast "
            "and as small as claimed | verdict |",
            "|---|---|---|---|",
            line("distillation: 10x smaller and faster at 98%", distilled, 0.98, 10, 10),
            line("DistilBERT (half the layers): 3x faster at 97%", half, 0.97, 3, 1),
            line("pruning: 30-50% smaller, 2-3x faster at 98%", pruned, 0.98, 2, 1 / 0.7)]


def plot(results, path, where):
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    fig = Figure(figsize=(14, 5.2))
    t = results[0]
    colors = colormaps["tab20"].colors
    axes = fig.subplots(1, 2)
    for ax, key, label in zip(axes, ("speed", "size"),
                              ("examples/s at batch 32, x the teacher",
                               "size, x smaller than the teacher")):
        for i, r in enumerate(results):
            x = r["examples_per_s"] / t["examples_per_s"] if key == "speed" else \
                t["size_mb"] / r["size_mb"]
            kind = "o" if "distilled" in r["name"] else "s" if "hard" in r["name"] else \
                "^" if "pruned" in r["name"] else "*"
            ax.errorbar(x, r["mean"], yerr=r["sd"] or 0, fmt=kind, capsize=3, ms=7,
                        color=colors[i % len(colors)], label=r["name"])
        ax.set_xscale("log")  # the pruned models crowd near 1x, the tiny student is at 15-20x
        ax.set_xlabel(label + " (log scale)")
        ax.set_ylabel("test accuracy (mean +- sd over seeds)")
        ax.grid(alpha=0.3, which="both")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="center right", fontsize=7)
    fig.suptitle(f"rt-snippets, {where}", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.78, 1))
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="runs/rt")
    p.add_argument("--data", default="data/rt-snippets")
    p.add_argument("--out", default="runs/smaller")
    p.add_argument("--seeds", default="42", help="comma-separated; the first seed's model is timed")
    p.add_argument("--all-seeds-for", action="append", default=[], metavar="SPEC",
                   help="only these students (e.g. layers=0,2,4) run every seed, the others the "
                        "first (default: all run every seed)")
    p.add_argument("--tiny", default=None, help="a pretrained checkpoint to distil into too")
    p.add_argument("--tiny-flags", default="",
                   help="flags for --tiny's runs only, both arms (its own learning rate)")
    p.add_argument("--jobs", type=int, default=1,
                   help="training runs at a time, one thread each when > 1 (timings stay "
                        "one at a time)")
    p.add_argument("--prune-steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=None, help="default: torch's choice")
    p.add_argument("--n-latency", type=int, default=300)
    p.add_argument("--plot", default=None, help="write accuracy against speed and size here")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--from-json", default=None,
                   help="print the tables (and --plot) again from an earlier run's --json")
    a = p.parse_args()
    a.seeds = [int(s) for s in a.seeds.split(",")]
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.from_json:  # the table again from a run's --json, nothing trained or timed
        with open(a.from_json) as f:
            saved = json.load(f)
        results, where = saved["rows"], f"{saved['machine']}; {saved['flags']}"
    else:
        results = summarise(model_dirs(a), os.path.join(a.data, "test.jsonl"), a.n_latency)
        where = f"{machine()}; {cpu_flags()}"
    t = results[0]
    print(f"machine: {where}")
    if not a.from_json:
        print(f"teacher: {a.teacher}; test set {a.data}/test.jsonl; minibert fp32 (SDPA); "
              f"seeds {a.seeds} (the first seed's model is timed)")
    print()
    print("| model | shape | params M | size MB | smaller x | batch 1 p50 ms | faster x | "
          "batch 32 ex/s | faster x | test acc | % of teacher |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        acc = f"{r['mean']:.4f}" + (f" ± {r['sd']:.4f} (n={len(r['accuracies'])})"
                                    if r["sd"] is not None else "")
        print(f"| {r['name']} | {r['shape']} | {r['parameters'] / 1e6:.1f} | {r['size_mb']:.1f} | "
              f"{t['size_mb'] / r['size_mb']:.2f} | {r['p50_ms']:.2f} | "
              f"{t['p50_ms'] / r['p50_ms']:.2f} | {r['examples_per_s']:.0f} | "
              f"{r['examples_per_s'] / t['examples_per_s']:.2f} | {acc} | "
              f"{r['mean'] / t['mean']:.1%} |")
    print()
    by_name = {r["name"]: r for r in results}
    for r in results:  # what the teacher's soft targets add to the same student
        if r["name"].endswith(", distilled"):
            hard = by_name[r["name"].replace(", distilled", ", hard labels")]
            print(f"distillation adds to {r['name'][:-len(', distilled')]}: "
                  f"{100 * (r['mean'] - hard['mean']):+.2f} points ({r['mean']:.4f} against "
                  f"{hard['mean']:.4f}, {len(r['accuracies'])} seed(s) each)")
    print()
    print("\n".join(claims(results)))
    if a.plot:
        plot(results, a.plot, where)
        print(f"plot: {a.plot}", file=sys.stderr)
    if a.json and not a.from_json:
        with open(a.json + ".tmp", "w") as f:
            json.dump({"machine": machine(), "flags": cpu_flags(), "rows": results}, f, indent=2)
        os.replace(a.json + ".tmp", a.json)


if __name__ == "__main__":
    main()
