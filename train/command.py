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
