"""What every command shares: flags built from a config dataclass, the resolved config printed
at start, and the command line that starts minibert again in a subprocess.

A flag exists for every field of the config, with its type and default, and the resolved config
is the dataclass itself. Fields are declared with `option(default, help)`.

`--some-field` maps to `some_field`; booleans get `--x/--no-x`; `Optional[...]` fields accept the
word `none`; list fields (`list[float]`) take a comma-separated value. The help text is the
comment of the field, given through `field(metadata={"help": ...})`.
"""

import argparse
import dataclasses
import os
import sys
import types
import typing


def option(default, help_, **kw):
    """A config field with its flag's help text (and e.g. `choices=`), for add_dataclass_flags."""
    return dataclasses.field(default=default, metadata={"help": help_, **kw})


def absolute(path):
    """`path` from the current directory, as given: not normalized, so that `link/../x` still
    means what it meant through the link (os.path.abspath would drop `link/..` as text)."""
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)


def minibert_argv():
    """The command line of `minibert` for a subprocess (`sweep`'s trials, `--nproc`'s workers).

    `python -P -m train.cli`: -P keeps the working directory off sys.path, so that a user's own
    train.py (common in ML folders) cannot stand in for minibert's `train` package."""
    return [sys.executable, "-P", "-m", "train.cli"]


def die_with_parent():
    """A subprocess's preexec_fn: Linux SIGKILLs the child when its parent dies.

    A sweep's trial, or torchrun under `--nproc` (which starts each worker in a session of its
    own), would otherwise go on training and writing into its RUN after the command that started
    it was killed (kill -9, a lost node), while a rerun or a resume of the same RUN starts. With
    this, the job dies as a whole. Linux only (prctl); elsewhere orphans must be stopped by hand."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _parse_list(inner):
    def parse(s):
        return [inner(x) for x in s.split(",") if x != ""]
    parse.__name__ = f"comma-separated {inner.__name__} list"
    return parse


def converter(tp):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:  # X | None
        inner = converter(next(a for a in args if a is not type(None)))

        def parse(s):
            return None if s.lower() == "none" else inner(s)
        parse.__name__ = getattr(inner, "__name__", "value")
        return parse
    if origin is list:
        return _parse_list(args[0])
    return tp


def add_dataclass_flags(parser, cls, skip=()):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        # `spelled`: the flag users see first, the field's own name kept as the older spelling
        flags = [f.metadata["spelled"], flag] if "spelled" in f.metadata else [flag]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        help_ = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        if len(flags) > 1:
            help_ += f" ({flag}: its older spelling, still accepted)"
        choices = f.metadata.get("choices")
        tp = hints[f.name]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if tp is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_)
        else:
            named = {"metavar": "DIR"} if len(flags) > 1 else {}
            parser.add_argument(*flags, dest=f.name, type=converter(tp), default=default,
                                choices=choices, required=required,
                                help=f"{help_} (default: {default})", **named)


def dataclass_from_args(cls, ns):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(ns).items() if k in names})


def print_config(cfg, title, file=None):
    """The resolved config, one field a line, on stderr (stdout is for a command's data)."""
    file = sys.stderr if file is None else file  # the stream of the moment, not of import
    print(f"{title}:", file=file)
    for f in dataclasses.fields(cfg):
        print(f"  {f.name:28s} {getattr(cfg, f.name)!r}", file=file)
    file.flush()


# ------------------------------------------------------------------- the ranges of numeric flags
# One definition for every command whose config holds the field (finetune and distill, pretrain,
# `memory --freeze-layers`): field -> (accepts a value, the range as said). A value outside it
# would be used as given: a negative lr or clip norm reverses training (torch scales gradients
# by max_norm / norm), a zero stage lr divides the unfreezer's lr ratio by zero.
_POSITIVE = (lambda v: v > 0, "must be > 0")
_AT_LEAST_0 = (lambda v: v >= 0, "must be >= 0")
_BETA = (lambda v: 0 <= v < 1, "must be in [0, 1)")
RANGES = {
    "lr": _POSITIVE, "lr_head": _POSITIVE, "lr_encoder": _POSITIVE, "lr_embeddings": _POSITIVE,
    "stage_lrs": _POSITIVE,  # each value
    # > 1 is allowed: lower blocks then train faster than the top (1 turns the decay off)
    "layer_lr_decay": _POSITIVE,
    "clip_grad_norm": _POSITIVE,
    "weight_decay": _AT_LEAST_0,
    "adam_beta1": _BETA, "adam_beta2": _BETA,
    "adam_eps": _POSITIVE,
    "warmup_ratio": (lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    "warmup_steps": _AT_LEAST_0,
    "plateau_factor": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "plateau_patience": _AT_LEAST_0, "plateau_cooldown": _AT_LEAST_0,
    "plateau_threshold": _AT_LEAST_0, "plateau_min_lr": _AT_LEAST_0,
    "early_stopping_patience": (lambda v: v >= 1, "must be >= 1"),
    "freeze_layers": _AT_LEAST_0,
    "unfreeze_every": _POSITIVE,
    # 0 would read as "never" or "torch's default" where none says that; 0 minutes is one step
    "eval_every": _POSITIVE, "save_every": _POSITIVE, "threads": _POSITIVE,
    "max_minutes": _AT_LEAST_0,
}


def check_range(name, value, optional=False):
    """ValueError `--flag VALUE: must be ...` when `value` is outside RANGES[name]; None (the
    flag's 'none') passes where the field is optional. A list is checked value by value."""
    ok, said = RANGES[name]
    if value is None and optional:
        return
    values = value if isinstance(value, list) else [value]
    if value is None or not all(ok(v) for v in values):
        shown = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
        each = "each " if isinstance(value, list) else ""
        raise ValueError(f"--{name.replace('_', '-')} {shown}: {each}{said}"
                         f"{', or none' if optional else ''}")


def check_ranges(cfg):
    """check_range on every field of the dataclass `cfg` that RANGES knows."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        if f.name in RANGES:
            check_range(f.name, getattr(cfg, f.name), type(None) in typing.get_args(hints[f.name]))
