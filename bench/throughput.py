"""Training throughput on one GPU, minibert against transformers, in one run: the same hardware,
the same weights, the same batches and the same precision (bf16 autocast over fp32 master weights
and optimizer state, for both).

Two workloads, each timed for minibert and then for transformers:

1. MLM pretraining, BERT-base (12 layers, hidden 768), T = 128 packed sequences (no padding),
   15% of positions predicted. minibert runs its training path, `mlm_loss_sparse` (the decoder
   only at masked positions); transformers runs `BertForMaskedLM(labels=...)` (decoder at every
   position). Reported: tokens/s, model FLOPs utilisation, peak memory.
2. Fine-tuning MiniLM-L6 (6 layers, hidden 384) for sentence classification on batches whose
   lengths follow the rt-snippets movie reviews (about 19 words, 1 to 51), padded per batch.
   minibert: BertEncoder + BERT's pooler head; transformers: BertForSequenceClassification.
   Reported: examples/s, peak memory.

Method. Both models start from one checkpoint (minibert's weights saved in Hugging Face layout
and read by `from_pretrained`), both use SDPA attention, gradient clipping at 1.0, and a
multi-tensor AdamW (minibert's foreach one; for transformers torch's fused AdamW, its fastest).
The batches are made once, on the GPU, before timing: data loading is not measured. Each
measurement runs `--warmup` steps first (CUDA and cuBLAS warm-up, torch.compile when asked),
then one pass over the batches it will time (each padded length once: the work done once per
shape, timed apart and printed as the first pass), then `--steps` timed steps between two
synchronisations. With --compile, each library's loss function is compiled (model forward and
loss together). Peak memory is
`torch.cuda.max_memory_allocated` of that measurement alone.

Model FLOPs utilisation counts the useful FLOPs of the step, 6 N per token (N: matmul weights;
the decoder counted at masked positions only, as `flops_per_token` in train/pretrain/pretrain.py),
over the GPU's dense bf16 peak. The same count is used for both libraries, so transformers' dense
decoder does more work than it is credited for: the MFU ratio is the throughput ratio.

    python bench/throughput.py [--batch 64] [--ft-batch 32] [--steps 30] [--model DIR] [--compile]
                               [--attention sdpa,triton,triton-varlen] [--tiles TILES.json]
    python bench/throughput.py --device cpu   # a seconds-long smoke test of this script's logic

--attention lists minibert's attention implementations to time, each against the same
transformers run (which always uses SDPA); --tiles loads a Triton tile table written by
bench/flash_tiles.py.

Limits: one GPU (no data parallelism here); the fine-tuning lengths come from the rt-snippets
words (tokens ~ 1.25 x words + 2) unless `--model` has a tokenizer and `--data` is present.
"""

import argparse
import dataclasses
import gc
import json
import os
import random
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

from minibert.checkpoint import load_model, save_model
from minibert.config import BertConfig
from minibert.model import BertEncoder, BertForMLM
from train.tasks.classification import ClassificationHead
from train.pretrain.masking import IGNORE, mlm_loss_sparse
from train.loop.optim import AdamW
from train.pretrain.pretrain import PEAK_BF16_TFLOPS, flops_per_token
from train.tasks.task import TaskModel

BASE = BertConfig()  # BERT-base: 12 layers, 768 wide, 12 heads, vocab 30522
MINILM = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                    intermediate_size=1536)  # all-MiniLM-L6-v2's architecture
# --device cpu: small enough that both libraries run a few steps in seconds
TINY = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=128)
MASK_PROB = 0.15
MASK_ID = 103  # [MASK] in BERT's uncased vocabulary; any id works for timing


# ---------------------------------------------------------------------------- batches
def mlm_batches(n, B, T, vocab, device, seed=0):
    """n packed MLM batches: random ids, MASK_PROB of positions masked and labelled."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1000 if vocab > 2000 else 5, vocab, (B, T), generator=g)  # (B, T)
        masked = torch.rand(B, T, generator=g) < MASK_PROB  # (B, T)
        labels = torch.where(masked, ids, torch.full_like(ids, IGNORE))  # (B, T)
        ids = torch.where(masked, torch.full_like(ids, MASK_ID % vocab), ids)
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                    "labels": labels.to(device)})
    return out


def snippet_lengths(data, model_dir, max_len):
    """Token lengths of the rt-snippets training texts (with [CLS] and [SEP])."""
    path = os.path.join(data, "train.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"{path} not found: `minibert data get rt-snippets` makes it, or pass "
                         "--data DIR with a train.jsonl")
    with open(path) as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    if model_dir and os.path.exists(os.path.join(model_dir, "tokenizer.json")):
        from minibert.tokenizer import Tokenizer
        tok = Tokenizer.from_dir(model_dir)
        lengths = [len(e.ids) for e in tok.encodings(texts, None, max_len)]
        print(f"lengths: {len(texts)} texts of {path}, tokenized by {model_dir}", file=sys.stderr)
    else:  # no tokenizer at hand: WordPiece makes ~1.25 pieces per English word
        lengths = [min(max_len, round(1.25 * len(t.split())) + 2) for t in texts]
        print(f"lengths: {len(texts)} texts of {path}, 1.25 tokens per word + 2 (no tokenizer)",
              file=sys.stderr)
    return lengths


def classification_batches(n, B, lengths, vocab, device, seed=0):
    """n batches of B examples with lengths drawn from `lengths`, each padded to its longest."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ls = [rng.choice(lengths) for _ in range(B)]
        T = max(ls)
        ids = torch.randint(1000 if vocab > 2000 else 5, vocab, (B, T), generator=g)  # (B, T)
        mask = (torch.arange(T)[None, :] < torch.tensor(ls)[:, None]).long()  # (B, T)
        out.append({"input_ids": (ids * mask).to(device), "attention_mask": mask.to(device),
                    "token_type_ids": torch.zeros_like(ids).to(device),
                    "labels": torch.randint(0, 2, (B,), generator=g).to(device)})
    return out


# ---------------------------------------------------------------------------- timing
def measure(step, batches, warmup, steps, device):
    """(seconds for `steps` steps, seconds of the first pass, peak memory in MB or None).

    `warmup` untimed steps, then one untimed pass over the batches the timed steps cycle through:
    cuDNN's attention plans, Triton's specializations and torch.compile's graphs are built once
    per shape, and a timed step that met a new padded length would pay for them. That first
    pass is timed on its own and reported beside the steady rate."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for b in batches[:warmup]:
        step(b)
    sync()
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        step(b)
    sync()
    first_pass = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(batches[warmup + i % (len(batches) - warmup)])
    sync()  # the GPU has finished every queued step: the clock stops here
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return seconds, first_pass, peak


def train_step(model, opt, loss_fn, amp, device):
    """One optimizer step as every trainer does it: forward under autocast, backward, clip to
    1.0, AdamW, zero the gradients."""
    params = [p for p in model.parameters() if p.requires_grad]
    ctx = (lambda: torch.autocast(device.type, dtype=amp)) if amp else nullcontext

    def step(batch):
        with ctx():
            loss = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def hf_opt(model, device):
    # fused needs CUDA tensors; on the CPU smoke test the foreach implementation stands in
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, **kw)


def maybe_compile(loss_fn, on):
    # The loss function, not the model: minibert's pretraining loss calls `model.bert` and
    # `model.head` itself, which a compiled wrapper's forward would never see.
    return torch.compile(loss_fn) if on else loss_fn


# ---------------------------------------------------------------------------- workloads
def rate(model, opt, loss_fn, batches, args, amp, device, count, what, unit):
    """Train `model` (its loss compiled with --compile) on `batches`: (count / second, peak MB),
    or (None, None) when it failed. Peak memory is this measurement's alone (measure resets it);
    the caller drops the model."""
    try:  # one failing measurement (a compiler error, say) must not lose the others
        step = train_step(model, opt, maybe_compile(loss_fn, args.compile), amp, device)
        secs, first_pass, peak = measure(step, batches, args.warmup, args.steps, device)
    except Exception as e:
        print(f"  {what}: failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}",
              file=sys.stderr, flush=True)
        free(device)
        return None, None
    print(f"  {what}: {count / secs:,.1f} {unit}, peak {fmt_mb(peak)} (first pass over the "
          f"{len(batches) - args.warmup} timed batches: {first_pass:.2f} s)", file=sys.stderr,
          flush=True)
    del model, opt, step
    free(device)
    return count / secs, peak


def pretraining(args, cfg, amp, device, ckpt_dir):
    """{"minibert <attention>" | "transformers": (tokens/s, peak MB), "flops_per_token": ...}"""
    batches = mlm_batches(args.warmup + min(args.steps, 10), args.batch, args.seq_len,
                          cfg.vocab_size, device)
    tokens = args.steps * args.batch * args.seq_len
    out = {}
    for attention in args.attention:
        torch.manual_seed(0)  # the same weights for every attention, and for transformers
        mlm = BertForMLM(dataclasses.replace(cfg, attention=attention))
        if not out:
            save_model(mlm, ckpt_dir)  # the one checkpoint both libraries start from
            out["flops_per_token"] = flops_per_token(mlm, MASK_PROB)
        mlm = mlm.to(device).train()
        out[f"minibert {attention}"] = rate(
            mlm, AdamW(mlm.parameters(), lr=1e-4, foreach=True),
            lambda m, b: mlm_loss_sparse(m, b["input_ids"], b["attention_mask"], b["labels"])[0],
            batches, args, amp, device, tokens, f"pretraining, minibert {attention}", "tokens/s")
        del mlm

    from transformers import BertForMaskedLM
    hf = BertForMaskedLM.from_pretrained(ckpt_dir, attn_implementation="sdpa").to(device).train()
    out["transformers"] = rate(hf, hf_opt(hf, device), lambda m, b: m(**b).loss, batches, args,
                               amp, device, tokens, "pretraining, transformers", "tokens/s")
    return out


def finetuning(args, cfg, amp, device, ckpt_dir):
    """{"minibert <attention>" | "transformers": (examples/s, peak MB)}"""
    lengths = snippet_lengths(args.data, args.model, args.max_length)
    batches = classification_batches(args.warmup + min(args.steps, 10), args.ft_batch,
                                     lengths, cfg.vocab_size, device)
    n = args.steps * args.ft_batch
    out = {}
    for attention in args.attention:
        if args.model:
            bert = load_model(args.model, attention=attention)
            print(f"fine-tuning: weights of {args.model}", file=sys.stderr)
        else:
            torch.manual_seed(0)
            bert = BertEncoder(dataclasses.replace(cfg, attention=attention))
            if not out:
                print("fine-tuning: MiniLM-L6's architecture with random weights (--model DIR "
                      "for a checkpoint; the speed does not depend on the values)",
                      file=sys.stderr)
        if not out:
            save_model(bert, ckpt_dir)
        torch.manual_seed(1)
        model = TaskModel(bert, ClassificationHead(bert.config.hidden_size, 2, "cls",
                                                   bert.config.hidden_dropout_prob))
        model = model.to(device).train()
        out[f"minibert {attention}"] = rate(
            model, AdamW(model.parameters(), lr=5e-5, foreach=True), lambda m, b: m(b)["loss"],
            batches, args, amp, device, n, f"fine-tuning, minibert {attention}", "examples/s")
        del model, bert

    from transformers import BertForSequenceClassification
    hf = BertForSequenceClassification.from_pretrained(ckpt_dir, num_labels=2,
                                                       attn_implementation="sdpa")
    hf = hf.to(device).train()
    out["transformers"] = rate(hf, hf_opt(hf, device), lambda m, b: m(**b).loss, batches, args,
                               amp, device, n, "fine-tuning, transformers", "examples/s")
    return out


# ---------------------------------------------------------------------------- report
def fmt_mb(x):
    return "-" if x is None else f"{x:,.0f} MB"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda measures; cpu runs a tiny smoke test of the script")
    p.add_argument("--batch", type=int, default=64, help="pretraining sequences per step")
    p.add_argument("--seq-len", type=int, default=128, help="pretraining sequence length")
    p.add_argument("--ft-batch", type=int, default=32, help="fine-tuning examples per step")
    p.add_argument("--max-length", type=int, default=128, help="fine-tuning truncation")
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before each measurement")
    p.add_argument("--model", default=None, help="checkpoint for fine-tuning (default: "
                   "MiniLM-L6's architecture, random weights)")
    p.add_argument("--data", default="data/rt-snippets", help="where the lengths come from")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile both libraries' models")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak of the GPU (default: looked up from its name)")
    p.add_argument("--attention", default="sdpa",
                   help="minibert's attention implementations to time, comma-separated, from "
                        "sdpa, eager, triton, triton-varlen")
    p.add_argument("--tiles", help="a Triton tile table from bench/flash_tiles.py (JSON)")
    args = p.parse_args(argv)
    args.attention = args.attention.split(",")

    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench/throughput.py measures GPU training throughput and needs a "
                             "CUDA device; `--device cpu` runs a tiny smoke test of the script")
        name = torch.cuda.get_device_name(device)
        base, minilm, amp = BASE, MINILM, torch.bfloat16
    else:  # the smoke test: tiny shapes, fp32 (CPU bf16 autocast is slow and beside the point)
        name = "CPU (smoke test: tiny model, numbers mean nothing)"
        base, minilm, amp = TINY, TINY, None
        args.batch, args.seq_len, args.ft_batch = 4, 16, 4
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
        if any(a.startswith("triton") for a in args.attention):
            os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels on the CPU, slowly
    if args.tiles:
        from bench.flash_tiles import load_tiles
        load_tiles(args.tiles)
    import transformers
    precision = "bf16 autocast, fp32 weights and optimizer state" if amp else "fp32"
    print(f"device: {name}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{precision}; compile {args.compile}", file=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        pre = pretraining(args, base, amp, device, os.path.join(tmp, "mlm"))
        ft = finetuning(args, minilm, amp, device, os.path.join(tmp, "cls"))

    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    hf_pre, hf_ft = pre["transformers"][0], ft["transformers"][0]
    head = ("", f"pretrain tokens/s (B={args.batch}, T={args.seq_len})", "MFU", "x hf",
            "peak mem", f"finetune examples/s (B={args.ft_batch})", "x hf", "peak mem")
    table = [head]

    def num(x, fmt):  # a failed measurement reads "failed"
        return "failed" if x is None else format(x, fmt)

    def ratio(x, ref):
        return "-" if x is None or ref is None else f"{x / ref:.2f}x"
    for lib in [f"minibert {a}" for a in args.attention] + ["transformers"]:
        tps, mem = pre[lib]
        mfu = f"{100 * pre['flops_per_token'] * tps / (peak * 1e12):.1f}%" if peak and tps else "-"
        table.append((lib, num(tps, ",.0f"), mfu, ratio(tps, hf_pre), fmt_mb(mem),
                      num(ft[lib][0], ",.1f"), ratio(ft[lib][0], hf_ft), fmt_mb(ft[lib][1])))
    print(f"GPU: {name}" if device.type == "cuda" else f"device: {name}")
    print(f"precision: {precision}; compile: {args.compile}; pretraining: "
          f"{'BERT-base' if device.type == 'cuda' else 'tiny'} config; "
          f"fine-tuning: {args.model or 'MiniLM-L6 architecture'}; transformers with SDPA; "
          f"peak bf16: {f'{peak} TFLOP/s' if peak else 'unknown (--peak-tflops)'}")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in table[1:]:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
