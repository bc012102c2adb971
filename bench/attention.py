"""Benchmark: minibert's FlashAttention-2 (Triton) against PyTorch's SDPA backends and eager.

Part 1, attention alone. For B in {32, 64}, nh = 12, T in {128, 512}, hs = 64, bf16, with no
padding or ~30% right padding (lengths uniform in [0.4 T, T]), it times the forward and the
forward + backward of
  triton         flash_attention on the padded (B, nh, T, hs) batch with its key padding mask
  triton-varlen  flash_attention_varlen on the same tokens packed to (total, nh, hs)
  sdpa-<backend> torch's scaled_dot_product_attention pinned to one backend (sdpa_kernel); a
                 backend that refuses the case (flash refuses any mask) is listed as n/a
  eager          minibert.model.attention_eager, the (T, T) matrix materialised
TFLOP/s count real tokens only: 4 nh hs sum_b L_b^2 for the forward (two matmuls), 3.5x that
for forward + backward (seven matmuls; the backward's recomputation of q k^T is not counted), so
work spent on padding earns nothing. "vs sdpa" is (fastest SDPA backend that handles the case) /
(this method's time): above 1 is faster than the best SDPA.

Part 2, a whole fine-tuning step (forward, backward, AdamW) of a MiniLM-L12-H384-shaped encoder
(random weights) with a classification head, B = 32, T = 128, ~30% padding, bf16 autocast,
attention dropout 0.1, for each attention implementation, as time and ratio to sdpa.

Needs a CUDA GPU (the kernels are Triton; SDPA's fused backends are CUDA-only). Run:
    python bench/attention.py
"""

import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

if not torch.cuda.is_available():
    sys.exit("bench/attention.py needs a CUDA GPU: it times Triton kernels and SDPA's fused CUDA "
             "backends, and none of them runs on a CPU. (The correctness tests, "
             "tests/test_kernels.py, do run on a CPU under TRITON_INTERPRET=1.)")

import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from minibert.config import BertConfig  # noqa: E402
from minibert.kernels import flash_attention, flash_attention_varlen  # noqa: E402
from minibert.model import BertEncoder, attention_eager  # noqa: E402

NH, HS, DTYPE = 12, 64, torch.bfloat16
SDPA_BACKENDS = {name.split("_")[0].lower(): getattr(SDPBackend, name)
                 for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
                 if hasattr(SDPBackend, name)}  # cudnn appeared in torch 2.4


def time_ms(fn, grads=()):
    """Median milliseconds of fn() on the GPU (triton's do_bench: warm-up, L2 flushed per run)."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(grads),
                                   return_mode="median")


def random_lengths(B, T, padding, g):
    """(B,) lengths whose mean padding fraction is `padding`: uniform in [T (1 - 2 padding), T]."""
    return T - (torch.rand(B, generator=g) * 2 * padding * T).long()


def attention_methods(q, k, v, mask, packed, cu_seqlens, max_seqlen):
    """name -> (function returning the output, its inputs needing gradients)."""
    attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, T) for SDPA
    methods = {
        "triton": (lambda: flash_attention(q, k, v, key_padding_mask=mask), (q, k, v)),
        "triton-varlen": (lambda: flash_attention_varlen(*packed, cu_seqlens, max_seqlen), packed),
    }
    for name, backend in SDPA_BACKENDS.items():
        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        methods[f"sdpa-{name}"] = (sdpa, (q, k, v))
    methods["eager"] = (lambda: attention_eager(q, k, v, mask), (q, k, v))
    return methods


def bench_case(B, T, padding, g):
    lengths = random_lengths(B, T, padding, g)  # (B,)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).cuda() if padding > 0 else None
    q, k, v = (torch.randn(B, NH, T, HS, generator=g).to("cuda", DTYPE).requires_grad_()
               for _ in range(3))
    real = torch.ones(B, T, dtype=torch.bool, device="cuda") if mask is None else mask
    # Packed once, outside the timing: the varlen model mode also packs once per forward.
    packed = tuple(x.detach().transpose(1, 2)[real].requires_grad_() for x in (q, k, v))
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).cuda()  # (B+1,)
    flops_fwd = 4 * NH * HS * (lengths.double() ** 2).sum().item()

    results = {}
    for name, (fn, inputs) in attention_methods(q, k, v, mask, packed, cu_seqlens, T).items():
        try:
            with warnings.catch_warnings():  # a refusing backend also warns why, at length
                warnings.simplefilter("ignore")
                fn()  # compiles the Triton kernels; raises if an SDPA backend refuses the case
        except RuntimeError:
            results[name] = None
            continue
        do = torch.randn_like(fn())

        def fwd():
            with torch.no_grad():
                fn()

        def fwd_bwd():
            fn().backward(do)
        results[name] = (time_ms(fwd), time_ms(fwd_bwd, inputs))

    sdpa_ok = [r for n, r in results.items() if n.startswith("sdpa") and r is not None]
    best = [min(r[i] for r in sdpa_ok) for i in (0, 1)] if sdpa_ok else [float("nan")] * 2
    pad_real = 1 - lengths.sum().item() / (B * T)
    for name, r in results.items():
        head = f"{B:>3} {T:>4} {pad_real:>5.0%}  {name:<15}"
        if r is None:
            print(f"{head} {'n/a (backend refuses this case)':>40}")
            continue
        cells = [f"{t:8.3f} {flops * 1e-9 / t:7.1f} {b / t:6.2f}x"
                 for t, b, flops in zip(r, best, (flops_fwd, 3.5 * flops_fwd))]
        print(f"{head} {cells[0]}   {cells[1]}")


def finetune_step_ms(attention, ids, am, labels):
    """One fine-tuning step of a MiniLM-L12-H384-shaped encoder + linear head, in ms."""
    cfg = BertConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=1536, attention=attention)  # hs = 32; dropout 0.1
    torch.manual_seed(0)  # the same random weights for every implementation
    encoder = BertEncoder(cfg).cuda().train()
    head = nn.Linear(cfg.hidden_size, int(labels.max()) + 1).cuda()
    opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=2e-5)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = head(encoder.pool(encoder(ids, am)))  # (B, n_labels)
        F.cross_entropy(logits.float(), labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time_ms(step)


def main():
    g = torch.Generator().manual_seed(0)
    print(f"GPU: {torch.cuda.get_device_name()}   torch {torch.__version__}   "
          f"triton {triton.__version__}")
    print(f"attention, {DTYPE} nh={NH} hs={HS}; times in ms, TFLOP/s on real tokens, "
          f"x = speed-up over the fastest SDPA backend that handles the case")
    print(f"{'B':>3} {'T':>4} {'pad':>5}  {'method':<15} {'fwd ms':>8} {'TF/s':>7} {'vs sdpa':>7}"
          f"   {'f+b ms':>8} {'TF/s':>7} {'vs sdpa':>7}")
    for B in (32, 64):
        for T in (128, 512):
            for padding in (0.0, 0.3):
                bench_case(B, T, padding, g)
            print()

    B, T = 32, 128
    lengths = random_lengths(B, T, 0.3, g)
    ids = torch.randint(1000, 30000, (B, T), generator=g).cuda()
    am = (torch.arange(T)[None, :] < lengths[:, None]).long().cuda()  # (B, T)
    labels = torch.randint(0, 2, (B,), generator=g).cuda()
    print(f"fine-tuning step, MiniLM-L12-H384 shape, B={B} T={T} "
          f"padding={1 - lengths.sum().item() / (B * T):.0%}, bf16 autocast, AdamW")
    times = {a: finetune_step_ms(a, ids, am, labels)
             for a in ("sdpa", "eager", "triton", "triton-varlen")}
    for attention, t in times.items():
        print(f"  {attention:<14} {t:8.2f} ms   {times['sdpa'] / t:5.2f}x vs sdpa")


if __name__ == "__main__":
    main()
