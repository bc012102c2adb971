"""Atomic file writes: write a temporary file beside the target, fsync it, then rename.

A rename within one directory is atomic on POSIX, so a run killed at any moment leaves either the
old file or the new one, never half of one. Every checkpoint, metrics file and result goes
through here.
"""

import json
import os
import tempfile


def _atomic_write(path, write_fn, mode):
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text):
    _atomic_write(path, lambda f: f.write(text), "w")


def atomic_write_bytes(path, data):
    _atomic_write(path, lambda f: f.write(data), "wb")


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_save_safetensors(path, tensors, metadata=None):
    """safetensors.torch.save_file, but through a temp file and a rename."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def atomic_torch_save(path, obj):
    """torch.save of plain tensors/containers, read back with torch.load(weights_only=True)."""
    import torch

    _atomic_write(path, lambda f: torch.save(obj, f), "wb")
