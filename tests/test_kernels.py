"""minibert/kernels: FlashAttention-2 in Triton, held to the eager reference.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set below before triton
is imported), in fp32, on small shapes: T = 1, 17, 97, 130 so that ragged last tiles (64 wide)
are exercised. With CUDA the same tests run on the GPU, and so do the bf16 / fp16 tests at the
end, which use FlashAttention's own rule: error against an fp32 reference at most twice what eager
attention in the same dtype makes.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported, or it is ignored
import triton  # noqa: E402,F401  (imported here on purpose: after the line above)

from minibert.config import BertConfig  # noqa: E402
from minibert.errors import BackendError  # noqa: E402
from minibert.kernels import (  # noqa: E402
    attention_reference, check_device, check_triton_usable, dropout_keep_mask, flash_attention,
    flash_attention_varlen)
from minibert.model import BertEncoder, attention_eager  # noqa: E402
from bench.kernel_accuracy import ENCODER as TINY  # noqa: E402  (2 layers, hidden 64, 2 heads)
from bench.kernel_accuracy import case, encoder_out_and_grads, errors  # noqa: E402
from tests.tiny import make_checkpoint, make_sentiment  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# fp32 everywhere, so kernel and reference differ only in summation order (64-wide tiles, the
# online softmax's rescaling): a few ulp, ~1e-6 on these values. Any masking, scaling or dropout
# bug moves results by 1e-2 or more, far outside this.
FP32_TOL = dict(atol=1e-5, rtol=1e-4)


def make_qkv(B, nh, T, hs, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, nh, T, hs, generator=g).to(DEVICE, dtype).requires_grad_()
            for _ in range(3)]


def right_padding(lengths, T):  # (B, T) bool, True at the first lengths[b] positions
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def eager(q, k, v, mask):
    """minibert.model.attention_eager with padded query rows zeroed, as the kernel defines them."""
    y = attention_eager(q, k, v, mask)
    return y if mask is None else y * mask[:, None, :, None]


def out_and_grads(fn, qkv, do):
    out = fn(*qkv)
    return out, torch.autograd.grad(out, qkv, do)


def check_against_eager(qkv, mask, tol=FP32_TOL):
    """Forward and (dq, dk, dv) against eager; exact zeros where padding must give zero."""
    do = torch.randn_like(qkv[0])
    mask_d = None if mask is None else mask.to(DEVICE)
    out, grads = out_and_grads(lambda q, k, v: flash_attention(q, k, v, mask_d), qkv, do)
    ref, ref_grads = out_and_grads(lambda q, k, v: eager(q, k, v, mask_d), qkv, do)
    torch.testing.assert_close(out, ref, **tol)
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        torch.testing.assert_close(g, r, **tol, msg=lambda m: f"{name}: {m}")
    if mask is not None:
        pad = ~mask_d  # (B, T)
        assert (out.transpose(1, 2)[pad] == 0).all(), "padded query rows must give 0"
        for name, g in zip(("dq", "dk", "dv"), grads):
            assert (g.transpose(1, 2)[pad] == 0).all(), f"{name} must be exactly 0 at padding"


# -----------------------------------------------------------------------------------------------
# fp32 against the eager reference (interpreter on CPU, or the GPU)


@pytest.mark.parametrize("hs", [32, 64])
@pytest.mark.parametrize("T", [1, 17, 97, 130])
def test_right_padding_matches_eager(T, hs):
    g = torch.Generator().manual_seed(T * hs)
    lengths = [T, int(torch.randint(1, T + 1, (1,), generator=g))]  # one full, one padded row
    check_against_eager(make_qkv(2, 2, T, hs, seed=T), right_padding(lengths, T))


def test_no_mask_matches_eager():
    check_against_eager(make_qkv(2, 2, 130, 64, seed=1), None)


@pytest.mark.parametrize("T, hs", [(97, 32), (130, 64)])
def test_general_mask_matches_eager(T, hs):
    # Holes in the middle and padding at the end: the kernel must read the mask, not only the
    # last real token.
    g = torch.Generator().manual_seed(T)
    mask = torch.rand(2, T, generator=g) < 0.6
    mask[:, 0] = True
    mask[0, T - 20:] = False
    check_against_eager(make_qkv(2, 2, T, hs, seed=2), mask)


def test_sequence_without_real_tokens_gives_zeros():
    check_against_eager(make_qkv(2, 2, 17, 32, seed=3), right_padding([0, 5], 17))


def test_varlen_matches_padded():
    T, lengths = 97, [97, 40, 1]
    mask = right_padding(lengths, T).to(DEVICE)
    q, k, v = make_qkv(3, 2, T, 32, seed=4)
    do = torch.randn_like(q) * mask[:, None, :, None]  # padded rows carry no gradient
    cu_seqlens = torch.tensor([0, 97, 137, 138], dtype=torch.int32, device=DEVICE)

    def packed(x):  # (B, nh, T, hs) -> (total, nh, hs), real tokens only
        return x.transpose(1, 2)[mask]

    for p in (0.0, 0.2):  # with dropout too: same seed and T -> the same links are dropped
        out, grads = out_and_grads(
            lambda q, k, v: flash_attention(q, k, v, mask, dropout_p=p, seed=11), (q, k, v), do)
        out_v, grads_v = out_and_grads(
            lambda q, k, v: flash_attention_varlen(packed(q), packed(k), packed(v), cu_seqlens,
                                                   max_seqlen=T, dropout_p=p, seed=11),
            (q, k, v), packed(do))
        torch.testing.assert_close(out_v, packed(out), **FP32_TOL)
        for g_v, g in zip(grads_v, grads):
            torch.testing.assert_close(g_v, g, **FP32_TOL)
        if p == 0.0:
            torch.testing.assert_close(out_v, packed(eager(q, k, v, mask)), **FP32_TOL)


def test_rejects_unsupported_inputs():
    q, k, v = make_qkv(1, 1, 8, 48)
    with pytest.raises(ValueError, match="power of two"):
        flash_attention(q, k, v)
    q, k, v = make_qkv(1, 1, 8, 32)
    with pytest.raises(ValueError, match="bool"):
        flash_attention(q, k, v, torch.ones(1, 8, dtype=torch.long, device=DEVICE))
    cu_seqlens = torch.tensor([0, 8], dtype=torch.int32, device=DEVICE)
    q, k, v = (x[0].transpose(0, 1) for x in (q, k, v))  # packed (total=8, nh=1, hs=32)
    flash_attention_varlen(q, k, v, cu_seqlens, max_seqlen=8)
    with pytest.raises(ValueError, match="max_seqlen"):
        flash_attention_varlen(q, k, v, cu_seqlens, max_seqlen=4)


def test_interpreter_refuses_bf16(monkeypatch):
    """Triton's interpreter multiplies bf16 tiles wrongly (off by ~1e10 on a 16x16 tl.dot): a
    bf16 call there is refused, not answered with garbage. fp16 runs there, and matches."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the check reads it at each call
    q, k, v = (torch.randn(1, 1, 16, 16, dtype=torch.bfloat16) for _ in range(3))  # on the CPU
    with pytest.raises(ValueError, match="bfloat16 does not run under TRITON_INTERPRET=1"):
        flash_attention(q, k, v)
    if DEVICE == "cpu":  # the interpreter really runs here (with CUDA, triton compiled for it)
        q, k, v = (x.half() for x in (q, k, v))
        torch.testing.assert_close(flash_attention(q, k, v).float(),
                                   eager(q.float(), k.float(), v.float(), None), atol=2e-3, rtol=0)


# -----------------------------------------------------------------------------------------------
# Dropout: the kernel's mask, its statistics, and forward/backward using the same one


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_statistics(p):
    B, nh, T = 2, 4, 128  # 131072 links; each head's mask is 2 x 2 tiles of 64 x 64
    keep = dropout_keep_mask(1234, B, nh, T, p, DEVICE).float()
    n = keep.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(keep.mean().item() - (1 - p)) < 5 * sigma
    chance = p * p + (1 - p) * (1 - p)

    def z(a, b):
        """How many standard errors two equally shaped parts of the mask are from agreeing as
        often as chance says. Below 5 for independent draws (~40 checks here: a correct mask
        fails one with probability < 1e-4); a copied tile agrees everywhere: 85 or more."""
        agree = (a == b).float().mean().item()
        return abs(agree - chance) / (chance * (1 - chance) / a.numel()) ** 0.5

    heads = keep.reshape(B * nh, T, T)
    # every (batch row, head) draws its own mask, not only some pair of them
    for i in range(B * nh):
        for j in range(i):
            assert z(heads[i], heads[j]) < 5, ("heads", i, j)
    # within a head, the tiles (one kernel program each) are not copies of each other...
    tiles = [heads[:, r:r + 64, c:c + 64] for r in (0, 64) for c in (0, 64)]
    for i in range(len(tiles)):
        for j in range(i):
            assert z(tiles[i], tiles[j]) < 5, ("tiles", i, j)
    # ... and neighbouring rows, columns and diagonals are not shifted copies either
    assert z(heads[:, 1:], heads[:, :-1]) < 5
    assert z(heads[:, :, 1:], heads[:, :, :-1]) < 5
    assert z(heads[:, 1:, 1:], heads[:, :-1, :-1]) < 5
    assert z(heads[:, 1:, :-1], heads[:, :-1, 1:]) < 5
    assert not torch.equal(keep, dropout_keep_mask(1235, B, nh, T, p, DEVICE).float())


def test_dropout_forward_and_backward_use_the_kernels_mask():
    T, p, seed = 97, 0.3, 7
    mask = right_padding([97, 50], T).to(DEVICE)
    qkv = make_qkv(2, 2, T, 32, seed=5)
    do = torch.randn_like(qkv[0])
    keep = dropout_keep_mask(seed, 2, 2, T, p, DEVICE)  # (B, nh, T, T)
    out, grads = out_and_grads(
        lambda q, k, v: flash_attention(q, k, v, mask, dropout_p=p, seed=seed), qkv, do)
    ref, ref_grads = out_and_grads(
        lambda q, k, v: attention_reference(q, k, v, mask, keep, p), qkv, do)
    torch.testing.assert_close(out, ref, **FP32_TOL)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **FP32_TOL)
    assert (out - eager(*qkv, mask)).abs().max() > 0.1  # dropout really changed something


def test_dropout_seed_is_reproducible():
    qkv = [x.detach() for x in make_qkv(1, 2, 17, 32, seed=6)]
    out = {s: flash_attention(*qkv, dropout_p=0.5, seed=s) for s in (1, 2)}
    assert torch.equal(out[1], flash_attention(*qkv, dropout_p=0.5, seed=1))
    assert not torch.equal(out[1], out[2])
    torch.manual_seed(0)  # seed=None draws from torch's generator
    a, b = flash_attention(*qkv, dropout_p=0.5), flash_attention(*qkv, dropout_p=0.5)
    torch.manual_seed(0)
    assert torch.equal(a, flash_attention(*qkv, dropout_p=0.5)) and not torch.equal(a, b)


# -----------------------------------------------------------------------------------------------
# The model: attention="triton" and "triton-varlen" against "eager"

@pytest.mark.parametrize("attention", ["triton", "triton-varlen"])
def test_model_matches_eager(attention):
    # Both fp32 runs, the kernels' and eager's, are held to eager in float64, normwise: for the
    # output and each gradient, max|x - x64| <= 2e-6 max|x64| (about 17 ulp of the tensor's
    # largest entry). Not elementwise: the token-type embedding's gradient sums 66 positions'
    # terms, and an entry that cancels down to 0.19 in a tensor whose largest entry is 777 keeps
    # the terms' rounding error; eager fp32's own error on that tensor is 7e-5 (an H200),
    # more than an elementwise 1e-5 + 1e-4 * 0.19 allows. Measured normwise, at most 4.8e-7 on
    # that H200 (sdpa; the kernels 3.2e-7) and 4.1e-7 on this project's CPU. Tried and caught:
    # an ignored mask, a softmax scale or a dK 1.001x off, a dropped dQ. bench/kernel_accuracy.py
    # prints every tensor's error for every path.
    state, ids, am, w = case(DEVICE)  # right padding and a hole: the padded path reads its mask
    y64, g64 = encoder_out_and_grads("eager", state, ids, am, w, torch.float64)
    for name in ("eager", attention):  # eager first: the rule must hold for the reference too
        y, g = encoder_out_and_grads(name, state, ids, am, w, torch.float32)
        assert g.keys() == g64.keys()
        for what, (err, scale) in errors(y, g, y64, g64, am).items():
            assert err <= 2e-6 * scale, f"{name}, {what}: off by {err:.3g}, max entry {scale:.3g}"
        if name == "triton-varlen":
            assert (y[1, 20:] == 0).all() and (y[1, 5:8] == 0).all(), "re-padding puts zeros"


def test_model_attention_dropout_follows_torch_seed():
    model = BertEncoder(BertConfig(**{**TINY, "attention_probs_dropout_prob": 0.1},
                                   attention="triton-varlen")).to(DEVICE).train()
    ids = torch.randint(1, 100, (2, 17), device=DEVICE)
    am = right_padding([17, 9], 17).long().to(DEVICE)
    torch.manual_seed(3)
    a = model(ids, am)
    torch.manual_seed(3)
    assert torch.equal(a, model(ids, am))
    assert not torch.equal(a, model(ids, am))


def test_check_triton_usable_fails_clearly(monkeypatch):
    cfg = BertConfig(**TINY, attention="triton")
    check_triton_usable(cfg)  # fine here, with attention dropout too
    check_triton_usable(BertConfig(**{**TINY, "attention_probs_dropout_prob": 0.1},
                                   attention="triton"))
    with pytest.raises(ValueError, match="power of two"):
        check_triton_usable(BertConfig(**{**TINY, "hidden_size": 48}, attention="triton"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="CUDA GPU.*TRITON_INTERPRET=1"):
        check_triton_usable(cfg)
    monkeypatch.setitem(__import__("sys").modules, "triton", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install triton"):
        check_triton_usable(cfg)



def test_old_interpreter_with_numpy_2_4_is_refused(monkeypatch):
    # Triton's interpreter before 3.7 reads a loop bound with int() on a 1-element array, which
    # NumPy 2.4 refuses, so no kernel here runs (seen with triton 3.6.0 and numpy 2.5.2 on the
    # H200 machine, 2026-12-04). Refused by name, not a TypeError from inside the interpreter.
    import numpy
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for tv, nv, refused in [("3.6.0", "2.4.0", True), ("3.5.1", "2.5.2", True),
                            ("3.7.0", "2.4.6", False), ("3.10.0", "2.5.2", False),
                            ("3.6.0", "2.3.5", False), ("3.6.0", "2.4.0rc1", True)]:
        monkeypatch.setattr(triton, "__version__", tv)
        monkeypatch.setattr(numpy, "__version__", nv)
        for device in ("cpu", "cuda"):  # the interpreter runs on either
            if refused:
                with pytest.raises(BackendError,
                                   match=rf"Triton {tv}'s.*NumPy {nv}:.*triton>=3\.7"):
                    check_device(device, "flash_attention")
            else:
                check_device(device, "flash_attention")
    monkeypatch.delenv("TRITON_INTERPRET")
    check_device("cuda", "flash_attention")  # compiled on a GPU: no interpreter, no refusal

# -----------------------------------------------------------------------------------------------
# bf16 / fp16 on a GPU: error vs fp32 <= 2x eager's own error in that dtype (FlashAttention's rule)

ABS_FLOOR = 1e-5  # so that a case where eager happens to be exact does not demand exactness


def assert_within_2x_eager(fn, qkv_lp, mask, do):
    qkv32 = [x.detach().float().requires_grad_() for x in qkv_lp]
    ref, ref_grads = out_and_grads(lambda q, k, v: eager(q, k, v, mask), qkv32, do.float())
    pt, pt_grads = out_and_grads(lambda q, k, v: eager(q, k, v, mask), qkv_lp, do)
    out, grads = out_and_grads(fn, qkv_lp, do)
    for name, o, p, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (pt, *pt_grads),
                             (ref, *ref_grads)):
        err, err_pt = (o.float() - r).abs().max().item(), (p.float() - r).abs().max().item()
        assert err <= 2 * err_pt + ABS_FLOOR, f"{name}: error {err:.2e} > 2 x eager's {err_pt:.2e}"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hs", [32, 64, 128])
@pytest.mark.parametrize("T", [97, 257, 512])
@pytest.mark.parametrize("general_mask", [False, True])
def test_low_precision_within_2x_eager(T, hs, dtype, general_mask):
    g = torch.Generator().manual_seed(T + hs)
    lengths = torch.randint(1, T + 1, (4,), generator=g).tolist()
    mask = right_padding(lengths, T)
    if general_mask:
        mask &= torch.rand(4, T, generator=g) < 0.8
        mask[:, 0] = True
    mask = mask.cuda()
    qkv = make_qkv(4, 4, T, hs, dtype=dtype, seed=T)
    do = torch.randn_like(qkv[0])
    assert_within_2x_eager(lambda q, k, v: flash_attention(q, k, v, mask), qkv, mask, do)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_varlen_within_2x_eager(dtype):
    T, lengths = 512, [512, 300, 77, 1]
    mask = right_padding(lengths, T).cuda()
    cu_seqlens = torch.tensor([0, 512, 812, 889, 890], dtype=torch.int32, device="cuda")
    qkv = make_qkv(4, 4, T, 64, dtype=dtype, seed=9)
    do = torch.randn_like(qkv[0]) * mask[:, None, :, None]

    def varlen_padded(q, k, v):  # pack, run, scatter back into (B, nh, T, hs)
        def packed(x):
            return x.transpose(1, 2)[mask]
        y = flash_attention_varlen(packed(q), packed(k), packed(v), cu_seqlens, max_seqlen=T)
        out = y.new_zeros(4, T, *y.shape[1:])
        out[mask] = y
        return out.transpose(1, 2)
    assert_within_2x_eager(varlen_padded, qkv, mask, do)


@needs_cuda
def test_low_precision_dropout_within_2x_eager():
    T, p, seed = 257, 0.1, 5
    mask = right_padding([257, 100], T).cuda()
    qkv = make_qkv(2, 4, T, 64, dtype=torch.bfloat16, seed=10)
    do = torch.randn_like(qkv[0])
    keep = dropout_keep_mask(seed, 2, 4, T, p, "cuda")
    qkv32 = [x.detach().float().requires_grad_() for x in qkv]
    ref, ref_grads = out_and_grads(lambda q, k, v: attention_reference(q, k, v, mask, keep, p),
                                   qkv32, do.float())
    pt, pt_grads = out_and_grads(lambda q, k, v: attention_reference(q, k, v, mask, keep, p),
                                 qkv, do)
    out, grads = out_and_grads(
        lambda q, k, v: flash_attention(q, k, v, mask, dropout_p=p, seed=seed), qkv, do)
    for o, pp, r in zip((out, *grads), (pt, *pt_grads), (ref, *ref_grads)):
        assert (o.float() - r).abs().max() <= 2 * (pp.float() - r).abs().max() + ABS_FLOOR


# A training run: `minibert finetune --attention triton|triton-varlen` against --attention eager

@pytest.mark.parametrize("attention", ["triton", "triton-varlen"])
def test_finetune_with_triton_attention_trains_as_eager(attention, tmp_path):
    # Each run is its own process. Without CUDA, TRITON_INTERPRET=1 is set before anything
    # imports triton, so the kernels run in the interpreter on the CPU whatever this process did;
    # with CUDA the runs use the GPU and its compiled kernels. Dropout off: the kernel draws its
    # own dropout mask, not eager's. lr 1e-2 so that every weight's gradient matters in 6 steps.
    #
    # Tolerance: fp32 throughout, so the kernel and eager attention differ by summation order
    # only, and 6 AdamW steps carry that into the losses (~0.7). On the CPU, measured, the runs
    # agree to 9e-8 relative (1.5 ulp): rtol 1e-6 (16 ulp) leaves margin; leaving dq out of the
    # kernel's backward (so the query projection never learns) moves the losses by 2e-5
    # relative, and a masking or scaling bug by 1e-2 or more. On a GPU, cuBLAS and the kernels
    # sum in orders of their own, so the kernel may differ from eager by as much as PyTorch's
    # own fused attention (sdpa) does, times 4, or 1e-6 relative, whichever is more.
    ckpt, data = make_checkpoint(tmp_path / "ckpt"), make_sentiment(tmp_path / "data")
    on_gpu = torch.cuda.is_available()
    env = dict(os.environ)
    if on_gpu:
        env.pop("TRITON_INTERPRET", None)
    else:
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    losses = {}
    for name in ("eager", attention, *(["sdpa"] if on_gpu else [])):
        out = tmp_path / name
        proc = subprocess.run(
            [sys.executable, "-m", "train.cli", "finetune", "--model", str(ckpt),
             "--train", f"{data}/train.jsonl", "--out", str(out), "--attention", name,
             "--max-steps", "6", "--batch-size", "8", "--log-every", "1", "--eval-every", "none",
             "--device", "cuda" if on_gpu else "cpu", "--precision", "fp32", "--threads", "1",
             "--lr", "1e-2", "--lr-head", "1e-2", "--hidden-dropout", "0",
             "--attention-dropout", "0", "--classifier-dropout", "0"],
            cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        with open(out / "metrics.jsonl") as f:
            losses[name] = [e["train_loss"] for e in map(json.loads, f) if e["event"] == "train"]
        with open(out / "config.json") as f:
            assert json.load(f)["attention"] == name  # the resolved config the run used
    assert len(losses["eager"]) == 6
    eager = torch.tensor(losses["eager"], dtype=torch.float64)
    off = (torch.tensor(losses[attention], dtype=torch.float64) - eager).abs().max().item()
    allowed = 1e-6 * eager.abs().max().item()
    if on_gpu:
        sdpa_off = (torch.tensor(losses["sdpa"], dtype=torch.float64) - eager).abs().max().item()
        allowed = max(allowed, 4 * sdpa_off)
    print(f"{attention}: losses off eager by {off:.3g} (allowed {allowed:.3g})")
    assert off <= allowed, f"{attention}: {losses[attention]} against eager {losses['eager']}"
    assert losses["eager"][0] != losses["eager"][-1]
