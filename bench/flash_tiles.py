"""Tile sizes for minibert's Triton FlashAttention-2 on this GPU: a small sweep, each kernel alone.

For each head size (32: MiniLM, 64: BERT-base), on bf16 batches of 32k tokens at T = 128 and
T = 512 with lengths uniform in [T/4, T] (the padded layout, prefix mask), it times
  fwd   the forward, for each (BLOCK_M, BLOCK_N, num_warps, num_stages) in FWD
  dkdv  the backward with each config in DKDV for the dK/dV kernel (dq at the current table's)
  dq    the backward with each config in DQ for the dQ kernel (dkdv at the current table's)
Each config is first checked: its output and gradients against the same computation in fp32, at
most twice the error of eager attention in bf16 (tests/test_kernels.py's rule). A config that
fails the check, or that does not fit in shared memory, is listed and never chosen. The winner
per kernel and head size minimises the summed time of the two lengths.

    python bench/flash_tiles.py [--out tiles.json]

It prints the current table's times against the winners' ("before" and "after"), and writes the
winners as JSON that `bench/attention.py --tiles` and `bench/throughput.py --tiles` load; copy
them into GPU_TILES in minibert/kernels/flash.py to make them the default.
"""

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minibert.kernels import flash  # noqa: E402
from minibert.model import attention_eager  # noqa: E402

NH, TOKENS, LENGTHS = 12, 32768, (128, 512)
# (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M counts queries, BLOCK_N keys
FWD = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 3),
       (128, 32, 4, 3)]
DKDV = [(64, 64, 4, 3), (32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 4), (64, 128, 4, 2)]
DQ = [(64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 4), (128, 64, 4, 2)]


def load_tiles(path):
    """Replace minibert's GPU tile table with one this script wrote (bench/attention.py and
    bench/throughput.py call this for --tiles)."""
    with open(path) as f:
        table = json.load(f)
    for hs, kernels in table.items():
        flash.GPU_TILES[int(hs)] = {k: tuple(v) for k, v in kernels.items()}
    print(f"tiles: {path}: {json.dumps(table)}", file=sys.stderr)


def eager_masked(q, k, v, mask):  # eager attention, zero at padded query rows as the kernel is
    return attention_eager(q, k, v, mask) * mask[:, None, :, None]


def out_and_grads(fn, qkv, do):
    out = fn(*qkv)
    return [out, *torch.autograd.grad(out, qkv, do)]


def batch(hs, T, seed):
    """One case: bf16 q, k, v (B, NH, T, hs), its mask (B, T) and output gradient, with the fp32
    reference (out, dq, dk, dv) and the error bf16 eager attention makes against it, computed
    once: a config passes if its error is at most twice eager's (tests/test_kernels.py's rule)."""
    g = torch.Generator().manual_seed(seed)
    B = TOKENS // T
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).cuda()  # (B, T)
    qkv = [torch.randn(B, NH, T, hs, generator=g).cuda().to(torch.bfloat16).requires_grad_()
           for _ in range(3)]
    do = torch.randn(B, NH, T, hs, generator=g).cuda().to(torch.bfloat16) * mask[:, None, :, None]
    q32 = [x.detach().float().requires_grad_() for x in qkv]
    ref = out_and_grads(lambda q, k, v: eager_masked(q, k, v, mask), q32, do.float())
    low = out_and_grads(lambda q, k, v: eager_masked(q, k, v, mask), qkv, do)
    limits = [2 * (lo.float() - r).abs().max() + 1e-3 for lo, r in zip(low, ref)]
    return dict(qkv=qkv, mask=mask, do=do, ref=ref, limits=limits)


def passes(case):
    """The current table's kernels on this case, within 2x eager bf16's error against fp32."""
    got = out_and_grads(lambda q, k, v: flash.flash_attention(q, k, v, case["mask"]),
                        case["qkv"], case["do"])
    return all((x.float() - r).abs().max() <= lim
               for x, r, lim in zip(got, case["ref"], case["limits"]))


def time_ms(fn, grads=()):
    return triton.testing.do_bench(fn, warmup=10, rep=50, grad_to_none=list(grads),
                                   return_mode="median")


def measure(kernel, case):
    """Median ms of the forward ("fwd"), or of the backward alone (the others)."""
    (q, k, v), mask, do = case["qkv"], case["mask"], case["do"]
    if kernel == "fwd":
        def fwd():
            with torch.no_grad():
                flash.flash_attention(q, k, v, mask)
        return time_ms(fwd)
    out = flash.flash_attention(q, k, v, mask)
    return time_ms(lambda: out.backward(do, retain_graph=True), (q, k, v))


def sweep(kernel, candidates, hs, cases):
    """{config: [ms per case] or the reason it was dropped}."""
    base = {k: tuple(v) for k, v in flash.GPU_TILES[hs].items()}
    found = {}
    for cfg in candidates:
        flash.GPU_TILES[hs] = {**base, kernel: cfg}
        try:
            if not all(passes(case) for case in cases):
                found[cfg] = "wrong results"
                continue
            found[cfg] = [measure(kernel, case) for case in cases]
        except Exception as e:  # out of shared memory or registers, or a tile Triton refuses
            found[cfg] = f"fails: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]}"
        finally:
            flash.GPU_TILES[hs] = base
    return found


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="tiles.json", help="where to write the winners (JSON)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/flash_tiles.py times Triton kernels and needs a CUDA GPU")
    print(f"GPU {torch.cuda.get_device_name()}; torch {torch.__version__}, triton "
          f"{triton.__version__}; bf16, nh {NH}, {TOKENS} tokens a batch, lengths uniform in "
          "[T/4, T]; ms are medians")
    winners, summary = {}, []
    for hs in (32, 64):
        cases = [batch(hs, T, seed=T + hs) for T in LENGTHS]
        current = {k: tuple(v) for k, v in flash.GPU_TILES[hs].items()}
        chosen = dict(current)
        for kernel, candidates in (("fwd", FWD), ("dkdv", DKDV), ("dq", DQ)):
            found = sweep(kernel, [current[kernel]] + [c for c in candidates
                                                       if c != current[kernel]], hs, cases)
            print(f"\nhs {hs}, {kernel}: | BLOCK_M, BLOCK_N, warps, stages | "
                  + " | ".join(f"T={T} ms" for T in LENGTHS) + " | sum |")
            for cfg, r in found.items():
                mark = " (current)" if cfg == current[kernel] else ""
                if isinstance(r, str):
                    print(f"| {cfg}{mark} | {r} |")
                else:
                    print(f"| {cfg}{mark} | " + " | ".join(f"{t:.3f}" for t in r)
                          + f" | {sum(r):.3f} |", flush=True)
            timed = {c: r for c, r in found.items() if not isinstance(r, str)}
            if timed:
                best = min(timed, key=lambda c: sum(timed[c]))
                chosen[kernel] = best
                before = timed.get(current[kernel])
                summary.append((hs, kernel, current[kernel], before, best, timed[best]))
        winners[str(hs)] = {k: list(v) for k, v in chosen.items()}

    print("\n| hs | kernel | before (current) | ms | after (chosen) | ms | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for hs, kernel, cur, before, best, after in summary:
        b = "-" if before is None else " / ".join(f"{t:.3f}" for t in before)
        up = "-" if before is None else f"{sum(before) / sum(after):.2f}x"
        print(f"| {hs} | {kernel} | {cur} | {b} | {best} | "
              + " / ".join(f"{t:.3f}" for t in after) + f" | {up} |")
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(winners, f, indent=1)
    os.replace(tmp, a.out)
    print(f"\nwinners written to {a.out}: {json.dumps(winners)}")


if __name__ == "__main__":
    main()
