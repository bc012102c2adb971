"""Where a run computes, and with which numbers: the device, the precision of the forward pass,
and the thread count and random state a run owns.

- `pick_device("auto")` is CUDA when there is one, else the CPU.
- `resolve_precision(name, device)` turns `--precision auto|fp32|bf16|fp16` into a dtype for
  torch.autocast (None: plain fp32). `auto` is bf16 on CUDA and on a CPU with bf16 instructions
  (`native_bf16`: AVX512-BF16 or AMX-BF16), else fp32: a CPU without them emulates bf16 and is
  slower than in fp32. Master weights
  and optimizer state stay fp32 in every case; fp16 also needs a gradient scaler
  (`grad_scaler`), since its small gradients underflow.
- `autocast(device, dtype)` is the one place the forward is put under torch.autocast: the
  trainer's training steps and evaluations, and the pretraining's final evaluation, call it.
- `memory_stats(device)`: the peaks the trainer logs (resident memory; CUDA allocated/reserved).
- `run_state(seed, threads)` is what a run may change in the process: it seeds torch's global
  generator and sets the thread count for the block, then puts both back as they were. So
  `run_finetune` called from a bench or a test leaves its caller's random stream alone.
"""

import contextlib
import resource

import torch

from minibert.errors import UserError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(name):
    """--device: auto (CUDA when there is one), cpu, cuda or cuda:N; anything else, or CUDA on a
    machine without it, is a UserError naming the flag."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: give auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this torch sees no CUDA device; use cpu or auto")
    return device


def native_bf16():
    """The bf16 instructions of this CPU that make bf16 matmuls faster than fp32 ones, by name
    (empty when it has none, or when torch does not say)."""
    try:
        caps = torch._C._cpu._get_cpu_capability()  # torch's own CPU feature probe
    except (AttributeError, RuntimeError):
        return []
    return [f for f in ("avx512_bf16", "amx_bf16") if caps.get(f)]


def resolve_precision(name, device):
    """('fp32'|'bf16'|'fp16', autocast dtype or None) for --precision NAME on `device`."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" or native_bf16() else "fp32"
    return name, DTYPES[name]


def describe_precision(name, dtype, asked="auto", device=None):
    """The precision line a command prints at start; for `--precision auto`, why."""
    text = "fp32" if dtype is None else (f"{name} autocast, fp32 master weights"
                                         + (" and gradient scaler" if name == "fp16" else ""))
    if asked == "auto" and device is not None and device.type == "cpu":
        found = native_bf16()
        text += (f" (auto: this CPU has {' and '.join(found)})" if found else
                 " (auto: this CPU has no bf16 instructions)")
    return text


def grad_scaler(name, device):
    """fp16 scales the loss up so that small gradients do not underflow; the others need none."""
    return torch.amp.GradScaler(device.type) if name == "fp16" else None


def autocast(device, dtype):
    """The forward pass under torch.autocast to `dtype`; a no-op for fp32 (dtype None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def run_state(seed, threads=None, device=None):
    """Seed torch's generators and set its thread count for the block; restore both after."""
    cuda = [device] if device is not None and device.type == "cuda" else []
    old_threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=cuda):
        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            torch.set_num_threads(old_threads)


def memory_stats(device):
    """Peak resident memory of the process and, on CUDA, peak allocated/reserved (MB)."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    out = {"rss_peak_mb": round(rss_kb / 1024, 1)}
    if device.type == "cuda":
        out["cuda_peak_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out["cuda_peak_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    return out


class OutOfMemory(RuntimeError):
    """The trainer's stop when a step runs out of memory; its message says what to change."""


def is_out_of_memory(err):
    """Whether an exception is the device running out of memory: CUDA's OutOfMemoryError, a
    MemoryError, or the plain RuntimeError that torch's CPU allocator raises."""
    return isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err))
