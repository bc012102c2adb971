"""FlashAttention-2 for minibert: the autograd wrapper and the public functions.

Dao 2023, "FlashAttention-2" (https://arxiv.org/abs/2307.08691); the Triton kernels and the plain
reference live in flash_kernels.py, whose docstring explains the algorithm.

- flash_attention(q, k, v, key_padding_mask=None, softmax_scale=None, dropout_p=0.0, seed=None)
  q, k, v (B, nh, T, hs), key_padding_mask (B, T) bool, True at real tokens -> (B, nh, T, hs)
- flash_attention_varlen(q, k, v, cu_seqlens, max_seqlen, softmax_scale=None, dropout_p=0.0,
                         seed=None)
  packed q, k, v (total, nh, hs), cu_seqlens int32 (B+1,) -> (total, nh, hs)
- dropout_keep_mask(seed, B, nh, T, dropout_p, device): the dropout mask the kernels use, for tests.

Padded query rows give 0, and padded keys/values (and padded query rows) get exactly 0 gradient.
A mask never leaves the device (no host sync, so a model calling this in every layer never
stalls the GPU): each sequence's last real token bounds the tiles visited, so no tile past it is
read, and the mask itself is read per key tile, one byte per key.

Limits: self-attention (one length and one mask for q and k), no causal mask or bias; head size
16, 32, 64 or 128; fp16 / bf16 / fp32 on a CUDA GPU; fp16 / fp32 on the CPU under
TRITON_INTERPRET=1 (whose tl.dot on bf16 tiles is wrong, so bf16 is refused there).
With seed=None a dropout seed is drawn from torch's default generator, so torch.manual_seed
makes a run repeatable; the same seed always gives the same mask for the same T.
"""

import math

import torch
import triton

from minibert.kernels import HEAD_SIZES, check_device, check_head_size, interpreting
from minibert.kernels.flash_kernels import (_bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_preprocess,
                                            _fwd_kernel, _keep_mask_kernel)


# Tiles per kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_M counts queries, BLOCK_N
# keys. "fwd" and "dq" own BLOCK_M queries per program and stream keys in BLOCK_N steps; "dkdv"
# owns BLOCK_N keys and streams queries in BLOCK_M steps. Keyed by head size. These are starting
# points (FlashAttention-2's shapes), the ones the kernel tests have run with on a GPU.
# bench/flash_tiles.py sweeps others on the GPU at hand and writes a table that the benches load
# with --tiles; one sweep on an H200 found faster tiles for hs 32 and 64 (bench/README.md), to be
# copied here once the kernel tests pass with them there.
# Module-level so that the bench can try other tables; nothing in the library changes it.
GPU_TILES = {hs: {"fwd": (128, 64, 4 if hs <= 64 else 8, 3),
                  "dkdv": (64, 64, 4, 3), "dq": (64, 64, 4, 3)} for hs in HEAD_SIZES}
# The interpreter pays per program and per op: few, large tiles. 64 wide, so that the tests'
# T = 97 and 130 end in a ragged tile.
INTERPRETER_TILES = {"fwd": (64, 64, 4, 1), "dkdv": (64, 64, 4, 1), "dq": (64, 64, 4, 1)}


def _tiles(hs):
    """{"fwd" | "dkdv" | "dq": (BLOCK_M, BLOCK_N, num_warps, num_stages)} for this head size."""
    return INTERPRETER_TILES if interpreting() else GPU_TILES[hs]


def _precision(x):
    """fp32 inputs get true fp32 products (not tf32, Triton's default on GPUs): fp32 means fp32."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def _strides(x, is_varlen):
    """(batch, head, token) strides of (B, nh, T, hs), or of packed (total, nh, hs) (batch: 0)."""
    return (0, x.stride(1), x.stride(0)) if is_varlen else (x.stride(0), x.stride(1), x.stride(2))


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, seq, mask, T_max, sm_scale, dropout_p, seed):
        is_varlen = q.dim() == 3  # packed (total, nh, hs); else padded (B, nh, T, hs)
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        B = seq.numel() - 1 if is_varlen else seq.numel()
        nh, hs = q.shape[1], q.shape[-1]  # dim 1 is the head in both layouts
        o = torch.zeros(q.shape, dtype=q.dtype, device=q.device)  # rows never visited stay 0
        lse = torch.empty((B, nh, T_max), dtype=torch.float32, device=q.device)
        BM, BN, warps, stages = _tiles(hs)["fwd"]
        if o.numel() > 0 and T_max > 0:
            _fwd_kernel[(triton.cdiv(T_max, BM), B * nh)](
                q, k, v, o, lse, seq, seq if mask is None else mask,
                *_strides(q, is_varlen), *_strides(k, is_varlen), *_strides(v, is_varlen),
                *_strides(o, is_varlen), nh, T_max, sm_scale, dropout_p, seed,
                HS=hs, BLOCK_M=BM, BLOCK_N=BN, IS_VARLEN=is_varlen, HAS_MASK=mask is not None,
                HAS_DROPOUT=dropout_p > 0.0, PREC=_precision(q), num_warps=warps,
                num_stages=stages)
        ctx.save_for_backward(q, k, v, o, lse, seq, mask)
        ctx.args = (B, nh, hs, T_max, sm_scale, dropout_p, seed, is_varlen)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, seq, mask = ctx.saved_tensors
        B, nh, hs, T_max, sm_scale, dropout_p, seed, is_varlen = ctx.args
        do = do.contiguous()  # now in o's layout, which dq, dk, dv share
        dq, dk, dv = (torch.zeros(o.shape, dtype=x.dtype, device=o.device) for x in (q, k, v))
        if o.numel() == 0 or T_max == 0:
            return dq, dk, dv, None, None, None, None, None, None
        delta = torch.empty_like(lse)  # (B, nh, T_max)
        tiles = _tiles(hs)
        so = _strides(o, is_varlen)
        _bwd_preprocess[(triton.cdiv(T_max, 64), B * nh)](
            o, do, delta, seq, *so, nh, T_max, HS=hs, BLOCK_M=64, IS_VARLEN=is_varlen)
        args = (seq, seq if mask is None else mask,
                *_strides(q, is_varlen), *_strides(k, is_varlen), *_strides(v, is_varlen), *so,
                nh, T_max, sm_scale, dropout_p, seed)
        flags = dict(HS=hs, IS_VARLEN=is_varlen, HAS_MASK=mask is not None,
                     HAS_DROPOUT=dropout_p > 0.0, PREC=_precision(q))
        BM, BN, warps, stages = tiles["dkdv"]  # a program per BN keys
        _bwd_dkdv_kernel[(triton.cdiv(T_max, BN), B * nh)](
            q, k, v, do, dk, dv, lse, delta, *args, BLOCK_M=BM, BLOCK_N=BN, num_warps=warps,
            num_stages=stages, **flags)
        BM, BN, warps, stages = tiles["dq"]  # a program per BM queries
        _bwd_dq_kernel[(triton.cdiv(T_max, BM), B * nh)](
            q, k, v, do, dq, lse, delta, *args, BLOCK_M=BM, BLOCK_N=BN, num_warps=warps,
            num_stages=stages, **flags)
        return dq, dk, dv, None, None, None, None, None, None


def _check_inputs(q, k, v, layout, dropout_p):
    if not (q.shape == k.shape == v.shape and q.dim() == len(layout.split(","))):
        raise ValueError(f"q, k, v must share one shape {layout}; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype or q.dtype not in (torch.float16, torch.bfloat16,
                                                            torch.float32):
        raise ValueError("q, k, v must all be float16, bfloat16 or float32; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype == torch.bfloat16 and interpreting():
        # Triton's interpreter runs tl.dot on bf16 tiles through numpy, which has no bfloat16:
        # a 16x16 product comes out wrong by ~1e10. Refused here rather than returned.
        raise ValueError("flash_attention: bfloat16 does not run under TRITON_INTERPRET=1 (the "
                         "interpreter's tl.dot on bf16 is wrong); use float16 or float32 on the "
                         "CPU, bf16 on a GPU")
    check_head_size(q.size(-1), "flash_attention")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    check_device(q.device.type, "flash_attention")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p} must be in [0, 1)")


def _resolve(softmax_scale, dropout_p, seed, hs):
    """The scale 1/sqrt(hs) by default, and a seed from torch's RNG when none is given (so that
    torch.manual_seed makes runs repeatable); the seed is saved for the backward."""
    scale = 1.0 / math.sqrt(hs) if softmax_scale is None else float(softmax_scale)
    if dropout_p == 0.0:
        return scale, 0
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    return scale, int(seed)


def flash_attention(q, k, v, key_padding_mask=None, softmax_scale=None, dropout_p=0.0, seed=None):
    """softmax(scale q k^T) v for q, k, v (B, nh, T, hs); key_padding_mask (B, T) bool, True at
    real tokens (None: no padding). Returns (B, nh, T, hs), zero at padded query rows."""
    _check_inputs(q, k, v, "(B, nh, T, hs)", dropout_p)
    B, nh, T, hs = q.shape
    if key_padding_mask is None:
        seq, mask = torch.full((B,), T, dtype=torch.int32, device=q.device), None
    else:
        if key_padding_mask.shape != (B, T) or key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be bool of shape (B, T) = {(B, T)}; got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        m = key_padding_mask.to(q.device)
        pos = torch.arange(1, T + 1, device=q.device)  # (T,) position + 1
        seq = torch.where(m, pos, 0).amax(1).to(torch.int32)  # (B,) last real token + 1
        mask = m.to(torch.int8).contiguous()  # (B, T), read per key tile
    scale, seed = _resolve(softmax_scale, dropout_p, seed, hs)
    return _FlashAttention.apply(q, k, v, seq, mask, T, scale, float(dropout_p), seed)


def flash_attention_varlen(q, k, v, cu_seqlens, max_seqlen, softmax_scale=None, dropout_p=0.0,
                           seed=None, validate=True):
    """The same over packed sequences: q, k, v (total, nh, hs), sequence b being rows
    cu_seqlens[b]:cu_seqlens[b+1] (cu_seqlens int32 (B+1,), starting at 0); max_seqlen >= the
    longest sequence (it also sets the dropout offsets). Returns (total, nh, hs).
    validate=False skips the host-side check of cu_seqlens (one sync per call), for a caller
    that built cu_seqlens itself and calls once per layer (minibert/kernels/unpad.py)."""
    _check_inputs(q, k, v, "(total, nh, hs)", dropout_p)
    if validate:
        _check_cu_seqlens(q, cu_seqlens, max_seqlen)
    scale, seed = _resolve(softmax_scale, dropout_p, seed, q.size(-1))
    return _FlashAttention.apply(q, k, v, cu_seqlens, None, int(max_seqlen), scale,
                                 float(dropout_p), seed)


def _check_cu_seqlens(q, cu_seqlens, max_seqlen):
    if (cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1
            or cu_seqlens.device != q.device):
        raise ValueError(f"cu_seqlens must be int32 (B+1,) on {q.device}; got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)} on {cu_seqlens.device}")
    # Checked on the host (one sync): a max_seqlen below the longest sequence would silently skip
    # its last rows, and cu_seqlens not ending at total would read past q.
    cu = cu_seqlens.tolist()
    lengths = [end - start for start, end in zip(cu, cu[1:])]
    if cu[0] != 0 or cu[-1] != q.size(0) or min(lengths, default=0) < 0 or max(
            lengths, default=0) > max_seqlen:
        raise ValueError(f"cu_seqlens must rise from 0 to total={q.size(0)}, no sequence longer "
                         f"than max_seqlen={max_seqlen}; got cu_seqlens={cu}")


def dropout_keep_mask(seed, B, nh, T, dropout_p, device):
    """The keep mask (B, nh, T, T) bool that the kernels draw for this seed: True = link kept.
    For flash_attention_varlen, sequence b's mask is [b, :, :n_b, :n_b] with T = max_seqlen."""
    out = torch.empty((B, nh, T, T), dtype=torch.int8, device=device)
    BLOCK = 64
    if out.numel() > 0:
        _keep_mask_kernel[(triton.cdiv(T, BLOCK), triton.cdiv(T, BLOCK), B * nh)](
            out, T, float(dropout_p), int(seed), BLOCK=BLOCK)
    return out.bool()
