"""Benchmark: minibert's FlashAttention-2 (Triton) against every SDPA backend, on a CUDA GPU.

Part 1, attention alone, bf16, two head shapes: BERT-base (nh = 12, hs = 64) and MiniLM
(nh = 12, hs = 32); T = 128 and 512; B = 32768 / T (32k tokens a batch, enough programs to fill
the GPU); no padding, or lengths uniform in [T/4, T] (right padding, ~37% of the batch). For the
forward, the backward alone and the two together, it times
  triton         flash_attention on the padded (B, nh, T, hs) batch with its key padding mask
  triton-varlen  flash_attention_varlen on the same tokens packed to (total, nh, hs)
  sdpa           torch's scaled_dot_product_attention, left to choose its backend
  sdpa-<name>    the same pinned to one backend (flash, efficient, cudnn, math); a backend that
                 refuses the case (flash takes no mask) is listed as n/a, with its reason
  eager          minibert.model.attention_eager, the (T, T) matrix materialised: the reference
TFLOP/s count real tokens only: 4 nh hs sum_b L_b^2 for the forward (two matmuls), 2.5x that for
the backward (five; its recomputation of q k^T is not counted), 3.5x for both, so that work spent
on padding earns nothing. "x" is (fastest SDPA choice, pinned or not) / (this method's time):
above 1 is faster than the best SDPA. Every method's output is compared with eager's before it
is timed ("err": max |out - eager| over real rows).

Part 2, a whole fine-tuning step (forward, backward, AdamW) of a MiniLM-L12-H384-shaped encoder
(random weights) with a linear head, B = 32, T = 128, lengths uniform in [T/4, T], bf16 autocast,
attention dropout 0.1, for each `attention=` of the model, as time and ratio to sdpa.

    python bench/attention.py [--tiles TILES.json] [--part 1|2]
    python bench/attention.py --smoke   # CPU, Triton's interpreter, tiny shapes: the logic only

--tiles loads a tile table written by bench/flash_tiles.py instead of the one in
minibert/kernels/flash.py. Times are medians of triton.testing.do_bench (warm-up first, L2
flushed before each run).
"""

import argparse
import os
import platform
import sys
import time
import warnings

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported, or it is ignored

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

if not SMOKE and not torch.cuda.is_available():
    sys.exit("bench/attention.py needs a CUDA GPU: it times Triton kernels and SDPA's fused CUDA "
             "backends. `--smoke` runs its logic on the CPU under Triton's interpreter; the "
             "correctness tests are tests/test_kernels.py.")

import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.flash_tiles import load_tiles  # noqa: E402
from minibert.config import BertConfig  # noqa: E402
from minibert.kernels import flash_attention, flash_attention_varlen  # noqa: E402
from minibert.model import BertEncoder, attention_eager  # noqa: E402

DEVICE = "cpu" if SMOKE else "cuda"
DTYPE = torch.float32 if SMOKE else torch.bfloat16
SHAPES = {"BERT-base": (12, 64), "MiniLM": (12, 32)}  # name -> (nh, hs)
TOKENS = 256 if SMOKE else 32768  # per batch
LENGTHS = (32, 64) if SMOKE else (128, 512)
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def time_ms(fn, grads=()):
    """Median milliseconds of fn(): triton's do_bench on the GPU, one wall-clock run in --smoke."""
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(grads),
                                   return_mode="median")


def machine():
    if SMOKE:
        return f"CPU {platform.processor() or platform.machine()} (smoke test: numbers mean nothing)"
    return f"GPU {torch.cuda.get_device_name()}"


def uniform_lengths(B, T, g):
    """(B,) lengths uniform in [T/4, T]."""
    return torch.randint(T // 4, T + 1, (B,), generator=g)


def methods(q, k, v, mask, packed, cu_seqlens, max_seqlen):
    """name -> (function giving the output, the inputs needing gradients). The output is
    (B, nh, T, hs), or (total, nh, hs) for triton-varlen."""
    attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, T) for SDPA
    out = {"triton": (lambda: flash_attention(q, k, v, key_padding_mask=mask), (q, k, v)),
           "triton-varlen": (lambda: flash_attention_varlen(*packed, cu_seqlens, max_seqlen),
                             packed),
           "sdpa": (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask),
                    (q, k, v))}
    for name, backend in SDPA_BACKENDS.items():
        def pinned(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out[f"sdpa-{name}"] = (pinned, (q, k, v))
    out["eager"] = (lambda: attention_eager(q, k, v, mask), (q, k, v))
    return out


def bench_case(name, nh, hs, T, padded, g):
    B = TOKENS // T
    lengths = uniform_lengths(B, T, g) if padded else torch.full((B,), T)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(DEVICE) if padded else None
    q, k, v = (torch.randn(B, nh, T, hs, generator=g).to(DEVICE, DTYPE).requires_grad_()
               for _ in range(3))
    real = torch.ones(B, T, dtype=torch.bool, device=DEVICE) if mask is None else mask  # (B, T)
    # Packed once, outside the timing, as the model's varlen mode packs once per forward.
    packed = tuple(x.detach().transpose(1, 2)[real].contiguous().requires_grad_()
                   for x in (q, k, v))  # 3 x (total, nh, hs)
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).to(DEVICE)  # (B+1,)
    flops = 4 * nh * hs * (lengths.double() ** 2).sum().item()  # forward, real tokens only
    with torch.no_grad():  # the reference in fp32, real query rows only: (total, nh, hs)
        ref = attention_eager(q.float(), k.float(), v.float(), mask).transpose(1, 2)[real]

    results = {}
    for method, (fn, inputs) in methods(q, k, v, mask, packed, cu_seqlens, T).items():
        try:
            with warnings.catch_warnings():  # a refusing backend also warns why, at length
                warnings.simplefilter("ignore")
                with torch.no_grad():
                    y = fn()  # compiles the forward kernels; raises if a backend refuses
        except Exception as e:  # RuntimeError when a backend refuses; anything else is reported
            results[method] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:60]}"
            continue
        y = y if method == "triton-varlen" else y.transpose(1, 2)[real]  # (total, nh, hs)
        err = (y.float() - ref).abs().max().item()
        do = torch.randn_like(fn())
        fn().backward(do)  # compiles the backward kernels, outside the timing
        out = fn()

        def fwd():
            with torch.no_grad():
                fn()

        def bwd():
            out.backward(do, retain_graph=True)

        def fwd_bwd():
            fn().backward(do)
        results[method] = (err, time_ms(fwd), time_ms(bwd, inputs), time_ms(fwd_bwd, inputs))
        for x in inputs:
            x.grad = None

    sdpa = [r for m, r in results.items() if m.startswith("sdpa") and not isinstance(r, str)]
    best = [min(r[i] for r in sdpa) for i in (1, 2, 3)]
    pad = 1 - lengths.sum().item() / (B * T)
    rows = []
    for method, r in results.items():
        head = f"| {name} | {T} | {B} | {pad:.0%} | {method} |"
        if isinstance(r, str):
            rows.append(f"{head} n/a ({r}) | | | | | | | | | |")
            continue
        cells = [f" {t:.3f} | {w * flops * 1e-9 / t:.0f} | {b / t:.2f}x |"
                 for t, b, w in zip(r[1:], best, (1.0, 2.5, 3.5))]
        rows.append(f"{head} {r[0]:.1e} |" + "".join(cells))
    return rows


def finetune_step_ms(attention, ids, am, labels):
    """One fine-tuning step of a MiniLM-L12-H384-shaped encoder + linear head, in ms."""
    cfg = BertConfig(hidden_size=384, num_hidden_layers=1 if SMOKE else 12,
                     num_attention_heads=12, intermediate_size=1536, attention=attention)
    torch.manual_seed(0)  # the same random weights for every implementation
    encoder = BertEncoder(cfg).to(DEVICE).train()
    head = nn.Linear(cfg.hidden_size, int(labels.max()) + 1).to(DEVICE)
    opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=2e-5)

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=not SMOKE):
            logits = head(encoder.pool(encoder(ids, am)))  # (B, n_labels)
        F.cross_entropy(logits.float(), labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()  # compiles the kernels outside the timing
    return time_ms(step)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiles", help="a tile table from bench/flash_tiles.py (JSON)")
    p.add_argument("--part", type=int, choices=(1, 2), help="run only part 1 or part 2")
    p.add_argument("--smoke", action="store_true", help="CPU, interpreter, tiny shapes")
    a = p.parse_args()
    if a.tiles:
        load_tiles(a.tiles)
    g = torch.Generator().manual_seed(0)
    print(f"{machine()}; torch {torch.__version__}, triton {triton.__version__}; {DTYPE}")
    if a.part in (None, 1):
        print(f"\nattention alone, {TOKENS} tokens a batch (B = {TOKENS} / T); ms are medians; "
              "TF/s over real tokens; x = fastest SDPA choice's time / this time")
        print("| shape | T | B | padding | method | err vs eager | fwd ms | TF/s | x | "
              "bwd ms | TF/s | x | fwd+bwd ms | TF/s | x |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, (nh, hs) in SHAPES.items():
            for T in LENGTHS:
                for padded in (False, True):
                    for row in bench_case(name, nh, hs, T, padded, g):
                        print(row, flush=True)
    if a.part in (None, 2):
        B, T = (4 if SMOKE else 32), LENGTHS[0]
        lengths = uniform_lengths(B, T, g)
        ids = torch.randint(1000, 30000, (B, T), generator=g).to(DEVICE)
        am = (torch.arange(T)[None, :] < lengths[:, None]).long().to(DEVICE)  # (B, T)
        labels = torch.randint(0, 2, (B,), generator=g).to(DEVICE)
        print(f"\nfine-tuning step, MiniLM-L12-H384 shape, B={B} T={T} padding "
              f"{1 - lengths.sum().item() / (B * T):.0%}, {'fp32' if SMOKE else 'bf16 autocast'}, "
              "attention dropout 0.1, "
              "AdamW")
        times = {}
        for attention in ("sdpa", "eager", "triton", "triton-varlen"):
            times[attention] = t = finetune_step_ms(attention, ids, am, labels)
            print(f"| {attention} | {t:.2f} ms | {times['sdpa'] / t:.2f}x vs sdpa |", flush=True)


if __name__ == "__main__":
    main()
