"""The CUDA path end to end: `minibert finetune` and `pretrain` on a GPU, with each attention.

tests/test_kernels.py holds the kernels to eager attention, op by op; here the commands run on
the GPU as a user runs them (autocast, the Triton kernels inside a training loop, fp16 with its
loss scaler, torch.compile). Every test here needs a CUDA GPU and is skipped without one; these
and test_kernels.py's low-precision cases are the suite's only skips.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.tiny import make_checkpoint, make_corpus, make_sentiment, pretrain_config
from train.loop.rundir import read_jsonl
from train.pretrain.pretrain import run_pretrain

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def finetune(tmp_path, name, *flags, steps=6):
    """Run `minibert finetune` on the GPU; (train losses, resolved config, results)."""
    ckpt = tmp_path / "ckpt"
    if not ckpt.exists():
        make_checkpoint(ckpt)
        make_sentiment(tmp_path / "data", n_train=128)
    out = tmp_path / name
    proc = subprocess.run(
        [sys.executable, "-m", "train.cli", "finetune", "--model", str(ckpt),
         "--train", str(tmp_path / "data" / "train.jsonl"),
         "--dev", str(tmp_path / "data" / "dev.jsonl"), "--out", str(out), "--device", "cuda",
         "--max-steps", str(steps), "--batch-size", "16", "--log-every", "1",
         "--eval-every", "none", *flags],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [e["train_loss"] for e in read_jsonl(str(out / "metrics.jsonl"))
              if e["event"] == "train"]
    with open(out / "config.json") as f:
        cfg = json.load(f)
    with open(out / "results.json") as f:
        return losses, cfg, json.load(f)


NO_DROPOUT = ("--hidden-dropout", "0", "--attention-dropout", "0", "--classifier-dropout", "0")


@pytest.mark.parametrize("attention", ["sdpa", "triton", "triton-varlen"])
def test_fp32_training_on_the_gpu_matches_eager(attention, tmp_path):
    # fp32 (the kernels use true fp32 products, not tf32), dropout off, lr 1e-2 so that every
    # weight's gradient matters within 6 steps. On the CPU the same runs agree to 9e-8 relative
    # (tests/test_kernels.py); on the GPU cuBLAS and the embedding backward's atomic adds also
    # sum in other orders from run to run, so 1e-5 (~80 ulp): a masking or scaling bug moves the
    # losses by 1e-2 or more, and a kernel that leaves dq out by 2e-5.
    flags = ("--precision", "fp32", "--lr", "1e-2", "--lr-head", "1e-2", *NO_DROPOUT)
    ref, _, _ = finetune(tmp_path, "eager", "--attention", "eager", *flags)
    losses, cfg, _ = finetune(tmp_path, attention, "--attention", attention, *flags)
    assert cfg["attention"] == attention and cfg["device"] == "cuda"
    assert len(ref) == 6 and ref[0] != ref[-1]
    assert losses == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_training_with_the_kernels_learns(precision, tmp_path):
    # The default recipe's shape (dropout on, inside the kernel) in bf16 or fp16 (with its loss
    # scaler): 60 steps at lr 5e-3 on a task a tiny model learns (the label is whether a positive
    # word is in the sentence). On the CPU in bf16 the last 10 losses average 0.007; chance is
    # ln 2 = 0.69, and a run whose updates were lost (an fp16 scaler skipping every step, say)
    # stays near it.
    losses, cfg, _ = finetune(tmp_path, precision, "--attention", "triton-varlen",
                              "--precision", precision, "--lr", "5e-3", "--lr-head", "5e-3",
                              steps=60)
    assert cfg["precision"] == precision
    assert all(x == x and abs(x) < 1e4 for x in losses), losses  # finite throughout
    assert sum(losses[-10:]) / 10 < 0.2, losses


def test_compile_on_the_gpu_matches_eager_mode(tmp_path):
    flags = ("--precision", "fp32", "--lr", "1e-2", "--lr-head", "1e-2", *NO_DROPOUT)
    ref, _, _ = finetune(tmp_path, "plain", *flags)
    losses, cfg, _ = finetune(tmp_path, "compiled", "--compile", *flags)
    assert cfg["compile"] is True
    assert losses == pytest.approx(ref, rel=1e-5)  # inductor reorders sums: ~1e-7 seen on CPU


def test_pretraining_on_the_gpu(tmp_path):
    # test_pretrain.py's tiny corpus and config, on the GPU in bf16 with the varlen kernels
    corpus = make_corpus(tmp_path)
    run_pretrain(pretrain_config(corpus, tmp_path / "out", device="cuda", precision="bf16",
                                 attention="triton-varlen", batch_size=8, max_steps=20,
                                 eval_every=10, warmup_steps=2))
    assert os.path.exists(tmp_path / "out" / "best" / "model.safetensors")
    losses = [e["train_loss"] for e in read_jsonl(str(tmp_path / "out" / "metrics.jsonl"))
              if e["event"] == "train"]
    assert losses[-1] < losses[0], losses
