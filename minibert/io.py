"""Atomic file writes, and strict JSON.

Every file is written to a temporary name beside its target, flushed, fsynced, then renamed over
it. A rename within one directory is atomic on POSIX, so a run killed at any moment leaves either
the old file or the new one, never half of one. Every checkpoint, metrics file, data split,
token cache and result goes through `atomic_open`.

JSON is written strictly: a non-finite float (NaN, inf) becomes `null`, since `NaN` is not JSON
and most parsers other than Python's refuse it.
"""

import contextlib
import json
import math
import os
import secrets


@contextlib.contextmanager
def atomic_open(path, mode="w"):
    """A file object for writing `path`; the file appears, complete, when the block ends."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    # O_EXCL on a random name, as mkstemp does, but with mode 0666: the kernel applies the
    # umask, so the file gets the permissions open() would give it (mkstemp's are 0600)
    tmp = os.path.join(d, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:  # said of the file asked for, not of its hidden temporary name
        raise type(e)(e.errno, e.strerror, path) from None
    try:
        kw = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
        with os.fdopen(fd, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text):
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_bytes(path, data):
    with atomic_open(path, "wb") as f:
        f.write(data)


def finite_or_null(obj):
    """`obj` with every non-finite float replaced by None, recursively through dicts and lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def json_line(obj):
    """One line of strict JSON (no NaN), without its newline."""
    return json.dumps(finite_or_null(obj), allow_nan=False)


def load_json(path):
    """The JSON file at `path`, read as UTF-8 (the encoding every file here is written in)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_json_object(path, error):
    """The JSON object (a dict) at `path`; anything else raises `error` naming the file."""
    try:
        d = load_json(path)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(d, dict):
        raise error(f"{path}: must be a JSON object, not {type(d).__name__}")
    return d


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(finite_or_null(obj), indent=2, allow_nan=False) + "\n")


def atomic_save_safetensors(path, tensors, metadata=None):
    """safetensors.torch.save_file, but through a temp file and a rename."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def atomic_torch_save(path, obj):
    """torch.save of plain tensors/containers, read back with torch.load(weights_only=True)."""
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)
