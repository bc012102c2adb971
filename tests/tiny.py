"""Tiny checkpoints and datasets that tests build for themselves in a temporary directory.

The sentiment task is learnable from one word per text, so a 2-layer, 32-wide BERT fits it in a
few dozen steps; tests that need learning rely on that, tests of bookkeeping do not care.
"""

import json
import os
import random

import torch

from minibert.checkpoint import save_model
from minibert.config import BertConfig
from minibert.model import BertEncoder, BertForMLM
from minibert.tokenizer import Tokenizer, build_wordpiece

POSITIVE = ["good", "great", "fine", "superb", "lovely"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring"]
FILLER = ["the", "movie", "was", "a", "plot", "and", "very", "it", "film", "story"]
WORDS = POSITIVE + NEGATIVE + FILLER + ["##s", "##ly"]


def tiny_tokenizer():
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS)}
    return Tokenizer(build_wordpiece(vocab))


def tiny_config(**kw):
    d = dict(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2,
             num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
             hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    d.update(kw)
    return BertConfig(**d)


def make_checkpoint(path, seed=0, mlm=False, **kw):
    torch.manual_seed(seed)
    cfg = tiny_config(**kw)
    model = BertForMLM(cfg) if mlm else BertEncoder(cfg)
    save_model(model, path, tiny_tokenizer())
    return path


def make_sentiment(path, n_train=64, n_dev=32, n_test=32, seed=0):
    """JSONL train/dev/test files; label 1 iff the text holds a positive word."""
    rng = random.Random(seed)
    os.makedirs(path, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
        with open(os.path.join(path, f"{split}.jsonl"), "w") as f:
            for _ in range(n):
                label = rng.random() < 0.5
                words = rng.sample(FILLER, rng.randint(2, 6))
                words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
                f.write(json.dumps({"text": " ".join(words), "label": int(label)}) + "\n")
    return path


def compile_and_bf16_losses(monkeypatch, capsys, train):
    """Train three times, `train(name, **flags)`: eager fp32, compiled fp32, eager bf16;
    returns {name: [train losses]} after checking what all three runs must show. The compiled
    model must compute what the eager one does (rel 1e-5: fp32, the same ops; inductor may fuse
    and reorder sums, which moves a loss of ~0.7 by ~1e-7, while a wrong model moves it by far
    more), and --compile must reach torch.compile (once: the compiled run only). bf16 autocast
    must change the arithmetic (so it took effect) but not the losses beyond bf16 rounding: it
    keeps 8 mantissa bits (~4e-3 relative per rounded value), but a loss averages many of them
    and the errors mostly cancel (the runs differ by ~2e-4 relative); 2e-3 leaves margin, while
    bf16 weights or a bf16 loss reduction would move the loss by more. The caller turns dropout
    off: compiled dropout draws other masks than eager dropout."""
    import pytest
    from train.loop.rundir import read_jsonl

    compiled, real_compile = [], torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda m, **kw: compiled.append(m) or real_compile(m, **kw))
    losses = {}
    for name, kw in {"eager": {"precision": "fp32"},
                     "compiled": {"precision": "fp32", "compile": True},
                     "bf16": {"precision": "bf16"}}.items():
        out = train(name, **kw)
        losses[name] = [e["train_loss"] for e in read_jsonl(os.path.join(out, "metrics.jsonl"))
                        if e["event"] == "train"]
    assert "precision: bf16 autocast" in capsys.readouterr().err
    assert len(losses["eager"]) == 3
    assert len(compiled) == 1
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5)
    assert losses["bf16"] != losses["eager"]
    assert losses["bf16"] == pytest.approx(losses["eager"], rel=2e-3)
    return losses


NEWS_WORDS = ("the senate voted on a contentious nomination while markets fell sharply and the "
              "president said that talks with europe went well despite unbelievable weather").split()


def make_corpus(path):
    """A pretraining corpus: train.txt (60 documents) and valid.txt (8) of 5-40 random words."""
    rng = random.Random(0)
    for name, n in (("train.txt", 60), ("valid.txt", 8)):
        docs = [" ".join(rng.choice(NEWS_WORDS) for _ in range(rng.randint(5, 40))) + "."
                for _ in range(n)]
        (path / name).write_text("\n".join(docs) + "\n", encoding="utf-8")
    return path


def pretrain_config(corpus, out, **kw):
    """A PretrainConfig for the tiny model on `corpus` (make_corpus): 4 steps on the CPU, unless
    `kw` says otherwise."""
    from train.pretrain.config import PretrainConfig
    base = dict(corpus=[str(corpus / "train.txt")], valid=str(corpus / "valid.txt"), out=str(out),
                config="tiny", vocab_size=200, max_len=32, batch_size=4, max_steps=4,
                eval_every=2, log_every=1, threads=1, device="cpu", warmup_steps=1,
                cache_dir=str(corpus / "cache"))
    return PretrainConfig(**{**base, **kw})
