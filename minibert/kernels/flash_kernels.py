"""FlashAttention-2 in Triton: forward, backward, key-padding masks, packed sequences, dropout.

Follows Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning" (https://arxiv.org/abs/2307.08691), which builds on Dao et al. 2022
(https://arxiv.org/abs/2205.14135). The plain reference is `attention_reference` below (and
`minibert.model.attention_eager`, which it matches when there is no dropout).

Why: the eager reference writes the (T, T) score matrix to memory and reads it back three times.
Here one program owns a block of queries, streams key/value blocks through on-chip memory and keeps
a running ("online") softmax, so nothing of size T^2 is ever stored. The backward recomputes the
scores from q, k and the saved log-sum-exp instead of storing them.

Kernels (one program per (row block, batch*head)):
  _fwd_kernel        O = softmax(s) V, s = scale q k^T, with the online softmax; saves LSE.
  _bwd_preprocess    delta = rowsum(dO * O), the correction term of the softmax backward.
  _bwd_dkdv_kernel   one block of keys, loops over query blocks: dK, dV.
  _bwd_dq_kernel     one block of queries, loops over key blocks: dQ.
Splitting dK/dV from dQ (FA2's choice) means each program accumulates its own output in
registers, with no atomics, at the cost of computing q k^T twice in the backward.

Two layouts share the kernels, chosen by IS_VARLEN:
- padded (B, nh, T, hs) with a key padding mask (B, T), True at real tokens;
- packed (total, nh, hs) with cu_seqlens (B+1,) int32, no padding at all (`flash_attention_varlen`).
Masks (padded layout): the mask (B, T) is loaded per key block (one byte per key, beside a
(BN, hs) tile of K and one of V), and blocks past the last real token of a sequence are never
visited, so right padding (what tokenizers produce) costs nothing past each sequence's end.
Padded query rows give zero output and padded keys/values get exactly zero gradient (their
probabilities are exactly 0). The wrapper finds the last real token on the device: no host sync.

Dropout (as BERT fine-tuning uses, p = 0.1) happens inside the kernel: Philox random numbers
from (seed, offset), offset = ((b nh + h) T + i) T + j for query i and key j (T: the padded
length, or max_seqlen when packed), so the backward regenerates the same mask without storing
it. `dropout_keep_mask` returns that mask for tests.

Limits: self-attention only (q, k, v of equal length, one mask for both); no causal mask, no
attention bias; head size 16, 32, 64 or 128 (a compile-time block width); fp16 / bf16 / fp32 on a
CUDA GPU, fp16 / fp32 on a CPU under TRITON_INTERPRET=1 (slowly). Block sizes are a table per
head size and kernel (GPU_TILES in flash.py), not autotuned at run time; bench/flash_tiles.py
sweeps others on a GPU (one run on an H200 so far: bench/README.md).
"""

import math

import torch
import triton
import triton.language as tl

# exp(x) = exp2(x log2 e), and exp2 is the GPU's native instruction. (A constexpr: kernels read it.)
LOG2E = tl.constexpr(1.4426950408889634)
# Triton compiles a kernel again for each new pattern of its integer arguments (equal to 1,
# divisible by 16). T_max changes with every padded batch and the dropout seed with every step, so
# left specialized they would compile each kernel up to six times in the first minutes of a
# fine-tune; neither is an address whose alignment the compiler could use.
NOT_SPECIALIZED = ("T_max", "seed")


def attention_reference(q, k, v, key_padding_mask=None, keep=None, dropout_p=0.0,
                        softmax_scale=None):
    """The plain math, (B, nh, T, hs) -> (B, nh, T, hs), with an *explicit* dropout keep mask
    (B, nh, T, T) and zeros at padded query rows, as the kernel defines them.

    Memory traffic: the (B, nh, T, T) scores are written by the matmul, read and written by the
    mask, the softmax and the dropout, and read by the second matmul; the kernel writes only
    (B, nh, T, hs) and the (B, nh, T) log-sum-exp."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.size(-1))
    att = (q @ k.transpose(-2, -1)) * scale  # (B, nh, T, T)
    if key_padding_mask is not None:
        att = att.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    att = torch.softmax(att, dim=-1).nan_to_num(0.0)  # an all-padding row gives 0, not NaN
    if keep is not None:
        att = att * keep / (1.0 - dropout_p)
    y = att @ v  # (B, nh, T, hs)
    if key_padding_mask is not None:
        y = y * key_padding_mask[:, None, :, None]
    return y


# -----------------------------------------------------------------------------------------------
# Helpers shared by the kernels


@triton.jit
def _seq_bounds(SEQ, b, IS_VARLEN: tl.constexpr):
    """Where sequence b starts in its tensor and how many rows of it to visit."""
    if IS_VARLEN:  # SEQ = cu_seqlens (B+1,)
        start = tl.load(SEQ + b)
        n = tl.load(SEQ + b + 1) - start
    else:  # SEQ = (B,): the last real token + 1 (T without a mask)
        start = 0
        n = tl.load(SEQ + b)
    return start, n


@triton.jit
def _keep(seed, bh, T_max, rows, cols, dropout_p):
    """The dropout keep mask of one tile: one Philox draw per (batch, head, query, key) link."""
    offsets = (bh.to(tl.int64) * T_max + rows[:, None]) * T_max + cols[None, :]  # (BM, BN) int64
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _tile_ptrs(X, b, h, start, rows, sb, sh, st, HS: tl.constexpr):
    """Pointers to rows `rows` of sequence b, head h: (len(rows), HS)."""
    base = X + b.to(tl.int64) * sb + h * sh
    return base + (start + rows).to(tl.int64)[:, None] * st + tl.arange(0, HS)[None, :]


@triton.jit
def _load_tile(X, b, h, start, rows, ok, sb, sh, st, HS: tl.constexpr):
    """Rows `rows` of sequence b, head h, zeros where not `ok`: (len(rows), HS)."""
    return tl.load(_tile_ptrs(X, b, h, start, rows, sb, sh, st, HS), mask=ok[:, None], other=0.0)


@triton.jit
def _visit(MASK, b, T_max, pos, n, HAS_MASK: tl.constexpr):
    """Which positions `pos` of sequence b to visit: those below n and, with a mask, real tokens
    (the key padding mask (B, T_max) int8 is 1 there)."""
    ok = pos < n
    if HAS_MASK:
        ok = ok & (tl.load(MASK + b * T_max + pos, mask=ok, other=0) != 0)
    return ok


# -----------------------------------------------------------------------------------------------
# Forward


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _fwd_kernel(Q, K, V, O, LSE, SEQ, MASK,
                sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                nh, T_max, sm_scale, dropout_p, seed,
                HS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                PREC: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // nh, bh % nh
    start, n = _seq_bounds(SEQ, b, IS_VARLEN)
    if pid_m * BLOCK_M >= n:  # rows past the last real token: O stays zero
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,) positions within the sequence
    row_ok = rows < n
    q = _load_tile(Q, b, h, start, rows, row_ok, sqb, sqh, sqt, HS)
    qk_scale = sm_scale * LOG2E  # scores in log2 units, for exp2

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of the scores
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i), before dropout
    acc = tl.zeros([BLOCK_M, HS], tl.float32)  # running sum of p v, after dropout
    for start_n in range(0, n, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)  # (BN,)
        col_ok = _visit(MASK, b, T_max, cols, n, HAS_MASK)
        k = _load_tile(K, b, h, start, cols, col_ok, skb, skh, skt, HS)
        v = _load_tile(V, b, h, start, cols, col_ok, svb, svh, svt, HS)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # (BM, BN), log2 units
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A general mask can hide every key of a tile from a row: keep the max finite then, so that
        # exp2(-inf - -inf) never makes a NaN (those p are exactly 0 either way).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])  # (BM, BN)
        alpha = tl.math.exp2(m_i - m_safe)  # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:  # the normaliser l_i counts every link; only kept ones reach the output
            p = tl.where(_keep(seed, bh, T_max, rows, cols, dropout_p), p, 0.0)
        pv = tl.dot(p.to(v.dtype), v, input_precision=PREC)  # (BM, BN) x (BN, HS) -> (BM, HS)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    # Every visited row has at least one real key (n ends at a real token), so l_i > 0 there.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if HAS_DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    if HAS_MASK:  # padded query rows inside [0, n) give zero
        out = tl.where(_visit(MASK, b, T_max, rows, n, HAS_MASK)[:, None], out, 0.0)
    tl.store(_tile_ptrs(O, b, h, start, rows, sob, soh, sot, HS), out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    # LSE in log2 units, (B, nh, T_max): the backward gets p = exp2(s - lse) in one step.
    lse = tl.where(m_i == float("-inf"), 0.0, m_i) + tl.math.log2(l_safe)
    tl.store(LSE + bh * T_max + rows, lse, mask=row_ok)


# -----------------------------------------------------------------------------------------------
# Backward. With P = softmax(S) and, under dropout, Pd = P * keep / (1 - p) the matrix that met V:
#   dV = Pd^T dO,   dPd = dO V^T,   dP = dPd * keep / (1 - p),   dS = P * (dP - delta),
#   dQ = scale dS K,   dK = scale dS^T Q,   delta_i = sum_j P_ij dP_ij = rowsum(dO * O)_i.
# O, dO, dQ, dK, dV share one layout (strides sob, soh, sot): the wrapper makes it so.


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _bwd_preprocess(O, DO, DELTA, SEQ, sob, soh, sot, nh, T_max,
                    HS: tl.constexpr, BLOCK_M: tl.constexpr, IS_VARLEN: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // nh, bh % nh
    start, n = _seq_bounds(SEQ, b, IS_VARLEN)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    o = _load_tile(O, b, h, start, rows, row_ok, sob, soh, sot, HS)
    do = _load_tile(DO, b, h, start, rows, row_ok, sob, soh, sot, HS)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BM,)
    tl.store(DELTA + bh * T_max + rows, delta, mask=row_ok)


@triton.jit
def _recompute_p(q, k, lse, row_ok, col_ok, qk_scale, PREC: tl.constexpr):
    """P of one tile from the saved LSE, exactly 0 at padded rows and columns: (BM, BN)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # (BM, BN), log2 units
    p = tl.math.exp2(s - lse[:, None])
    return tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, SEQ, MASK,
                     sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                     nh, T_max, sm_scale, dropout_p, seed,
                     HS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                     PREC: tl.constexpr):
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // nh, bh % nh
    start, n = _seq_bounds(SEQ, b, IS_VARLEN)
    if pid_n * BLOCK_N >= n:  # keys past the last real token: dK, dV stay zero
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) this program's keys
    col_ok = _visit(MASK, b, T_max, cols, n, HAS_MASK)
    k = _load_tile(K, b, h, start, cols, col_ok, skb, skh, skt, HS)
    v = _load_tile(V, b, h, start, cols, col_ok, svb, svh, svt, HS)
    qk_scale = sm_scale * LOG2E
    dk = tl.zeros([BLOCK_N, HS], tl.float32)
    dv = tl.zeros([BLOCK_N, HS], tl.float32)
    for start_m in range(0, n, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)  # (BM,)
        # a padded query's output is a constant 0: it sends no gradient back
        row_ok = _visit(MASK, b, T_max, rows, n, HAS_MASK)
        q = _load_tile(Q, b, h, start, rows, row_ok, sqb, sqh, sqt, HS)
        do = _load_tile(DO, b, h, start, rows, row_ok, sob, soh, sot, HS)
        lse = tl.load(LSE + bh * T_max + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * T_max + rows, mask=row_ok, other=0.0)
        p = _recompute_p(q, k, lse, row_ok, col_ok, qk_scale, PREC)  # (BM, BN)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)  # (BM, HS) x (HS, BN): dPd
        if HAS_DROPOUT:
            keep = _keep(seed, bh, T_max, rows, cols, dropout_p)
            p_used = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        else:
            p_used = p
        dv += tl.dot(tl.trans(p_used).to(do.dtype), do, input_precision=PREC)  # (BN, BM) x (BM, HS)
        ds = p * (dp - delta[:, None])  # (BM, BN)
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)  # (BN, BM) x (BM, HS)
    dk = dk * sm_scale
    tl.store(_tile_ptrs(DK, b, h, start, cols, sob, soh, sot, HS), dk.to(DK.dtype.element_ty),
             mask=(cols < n)[:, None])
    tl.store(_tile_ptrs(DV, b, h, start, cols, sob, soh, sot, HS), dv.to(DV.dtype.element_ty),
             mask=(cols < n)[:, None])


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, SEQ, MASK,
                   sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                   nh, T_max, sm_scale, dropout_p, seed,
                   HS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   PREC: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // nh, bh % nh
    start, n = _seq_bounds(SEQ, b, IS_VARLEN)
    if pid_m * BLOCK_M >= n:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,) this program's queries
    row_ok = _visit(MASK, b, T_max, rows, n, HAS_MASK)
    q = _load_tile(Q, b, h, start, rows, row_ok, sqb, sqh, sqt, HS)
    do = _load_tile(DO, b, h, start, rows, row_ok, sob, soh, sot, HS)
    lse = tl.load(LSE + bh * T_max + rows, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * T_max + rows, mask=row_ok, other=0.0)
    qk_scale = sm_scale * LOG2E
    dq = tl.zeros([BLOCK_M, HS], tl.float32)
    for start_n in range(0, n, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)  # (BN,)
        col_ok = _visit(MASK, b, T_max, cols, n, HAS_MASK)
        k = _load_tile(K, b, h, start, cols, col_ok, skb, skh, skt, HS)
        v = _load_tile(V, b, h, start, cols, col_ok, svb, svh, svt, HS)
        p = _recompute_p(q, k, lse, row_ok, col_ok, qk_scale, PREC)  # (BM, BN)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)  # (BM, BN)
        if HAS_DROPOUT:
            keep = _keep(seed, bh, T_max, rows, cols, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)  # (BM, BN) x (BN, HS)
    dq = dq * sm_scale
    tl.store(_tile_ptrs(DQ, b, h, start, rows, sob, soh, sot, HS), dq.to(DQ.dtype.element_ty),
             mask=(rows < n)[:, None])


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _keep_mask_kernel(OUT, T_max, dropout_p, seed, BLOCK: tl.constexpr):
    """Writes the keep mask (B*nh, T_max, T_max) that the kernels above use (for tests)."""
    pid_m, pid_n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    cols = pid_n * BLOCK + tl.arange(0, BLOCK)
    keep = _keep(seed, bh, T_max, rows, cols, dropout_p)
    ptrs = OUT + (bh.to(tl.int64) * T_max + rows[:, None]) * T_max + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < T_max) & (cols[None, :] < T_max))
