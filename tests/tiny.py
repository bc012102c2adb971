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
