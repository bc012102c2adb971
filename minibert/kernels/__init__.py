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

from minibert.errors import BackendError, ConfigError, MissingPackage

# Names resolved on first use, so `import minibert.kernels` works without triton installed.
_PUBLIC = {"flash_attention": "flash", "flash_attention_varlen": "flash",
           "dropout_keep_mask": "flash", "attention_reference": "flash_kernels"}


def _import_triton():
    try:
        import triton  # noqa: F401  (only whether it imports)
    except ImportError as e:
        raise MissingPackage(
            "attention='triton' needs the triton package, which is not installed: "
            "`pip install triton` (or `pip install minibert[gpu]`), or use attention='sdpa'"
        ) from e


# The head size is a compile-time tile width of the kernels: a power of two they were written for.
HEAD_SIZES = (16, 32, 64, 128)


def interpreting():
    """True under Triton's CPU interpreter (TRITON_INTERPRET=1): the kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_head_size(hs, what):
    if hs not in HEAD_SIZES:
        raise ConfigError(f"{what}: head size {hs} is not supported by the Triton kernels; it "
                         "must be a power of two from 16 to 128 (a compile-time tile width)")


def _version(text):
    """(major, minor) of a version string: "3.6.0" -> (3, 6), "2.4.0rc1" -> (2, 4)."""
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in text.split(".")[:2])


def check_device(device_type, what):
    if device_type != "cuda" and not interpreting():
        raise BackendError(
            f"{what} runs Triton kernels, which need a CUDA GPU (got {device_type}). To run them "
            "on a CPU (slowly, for tests), set TRITON_INTERPRET=1 before importing triton; "
            "otherwise use attention='sdpa'.")
    if interpreting():  # on CPU tensors, or CUDA ones: the interpreter runs either way
        import numpy
        import triton
        # Before 3.7 the interpreter reads a loop bound with int() on a 1-element array, which
        # NumPy 2.4 made an error, and every kernel here loops up to a length read on the device.
        if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
            raise BackendError(
                f"{what}: Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) cannot "
                f"run these kernels with NumPy {numpy.__version__}: it converts loop bounds in a "
                "way NumPy 2.4 refuses. Use triton>=3.7 or numpy<2.4 with the interpreter.")


def check_triton_usable(cfg):
    """Called by BertEncoder when cfg.attention starts with "triton": fail now, and clearly."""
    _import_triton()
    what = f"attention={cfg.attention!r}"
    check_device("cuda" if torch.cuda.is_available() else "cpu", what)
    check_head_size(cfg.head_size, f"{what} (hidden_size={cfg.hidden_size} / "
                                   f"num_attention_heads={cfg.num_attention_heads})")
    # Attention dropout (attention_probs_dropout_prob) is done inside the kernel: nothing to refuse.


def __getattr__(name):
    if name in _PUBLIC:
        _import_triton()
        return getattr(importlib.import_module(f"minibert.kernels.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module 'minibert.kernels' has no attribute {name!r}")


__all__ = ["HEAD_SIZES", "check_device", "check_head_size", "check_triton_usable",
           "interpreting", *_PUBLIC]
