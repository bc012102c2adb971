"""Triton kernels: FlashAttention-2 for `attention="triton"` and `attention="triton-varlen"`.

- flash.py          flash_attention, flash_attention_varlen, dropout_keep_mask (the public API)
- flash_kernels.py  the Triton kernels and the plain reference they are tested against
- unpad.py          the encoder run on packed tokens (padding removed once, restored at the end)

Importing this package does not import triton: the model calls `check_triton_usable` first so that
a missing triton or a missing GPU is one clear message, not a traceback from deep inside triton.
"""

import importlib
import os

import torch

# Names resolved on first use, so `import minibert.kernels` works without triton installed.
_PUBLIC = {"flash_attention": "flash", "flash_attention_varlen": "flash",
           "dropout_keep_mask": "flash", "attention_reference": "flash_kernels"}


def _import_triton():
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "attention='triton' needs the triton package, which is not installed: "
            "`pip install triton` (or `pip install minibert[gpu]`), or use attention='sdpa'"
        ) from e


def check_triton_usable(cfg):
    """Called by BertEncoder when cfg.attention starts with "triton": fail now, and clearly."""
    _import_triton()
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(
            f"attention={cfg.attention!r} runs Triton kernels, which need a CUDA GPU, and none is "
            "available. To run them on a CPU (slowly, for tests), set TRITON_INTERPRET=1 before "
            "importing triton; otherwise use attention='sdpa'."
        )
    hs = cfg.head_size
    if hs not in (16, 32, 64, 128):
        raise ValueError(
            f"attention={cfg.attention!r} needs a head size that is a power of two from 16 to 128; "
            f"hidden_size={cfg.hidden_size} / num_attention_heads={cfg.num_attention_heads} = {hs}"
        )
    # Attention dropout (attention_probs_dropout_prob) is done inside the kernel: nothing to refuse.


def __getattr__(name):
    if name in _PUBLIC:
        _import_triton()
        return getattr(importlib.import_module(f"minibert.kernels.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module 'minibert.kernels' has no attribute {name!r}")


__all__ = ["check_triton_usable", *_PUBLIC]
