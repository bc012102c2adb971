"""minibert: BERT written from scratch in plain PyTorch.

The public API is three loaders over a checkpoint directory (config.json, model.safetensors and
tokenizer.json or vocab.txt):
- load_encoder(path): nn.Module; m(input_ids, attention_mask=None, token_type_ids=None) -> (B, T, C)
- load_mlm(path):     the same call gives masked-LM logits (B, T, V)
- load_tokenizer(path): tok.encode_batch(texts, pairs=None, max_length=512) -> dict of (B, T)
"""

from minibert.checkpoint import load_model, save_model
from minibert.config import BertConfig
from minibert.model import BertEncoder, BertForMLM
from minibert.tokenizer import Tokenizer


def load_encoder(path, **overrides):
    return load_model(path, with_head=False, **overrides)


def load_mlm(path, **overrides):
    return load_model(path, with_head=True, **overrides)


def load_tokenizer(path):
    return Tokenizer.from_dir(path)


__all__ = ["BertConfig", "BertEncoder", "BertForMLM", "Tokenizer", "load_encoder", "load_mlm",
           "load_tokenizer", "load_model", "save_model"]
