"""How a training command starts, for `minibert finetune` and `minibert pretrain` alike.

- `command(args, ...)`: `--nproc N` relaunches the command under torchrun; `--resume RUN` reads
  the config saved in RUN/config.json, a fresh run the flags; the run then goes inside this
  process's distributed session, and the project's own errors become one line.
- `run_in_state(body, cfg, ...)`: the run seeds torch and sets its thread count for its own
  duration only (train/loop/device.py), so a library caller's random stream is left alone; it
  holds RUN/.lock, and a fresh run refuses a directory that holds a run (train/loop/rundir.py);
  a --out it made and that holds no event yet is removed again if the run stops.
- `open_run(cfg, dist, resume, title)`: the config with absolute paths, fitted to the job's
  process count, the run directory (only rank 0 writes), the resolved config printed and saved,
  the inputs fingerprinted (or, on resume, checked: train/loop/inputs.py), and the line that
  says where and in which precision the run computes.
"""

import contextlib
import dataclasses
import json
import os
import sys
import types
import typing

import torch

from minibert.errors import UserError
from minibert.io import load_json
from minibert.kernels import check_device
from train.command import absolute, dataclass_from_args, print_config
from train.loop import distributed
from train.loop.inputs import check_same_inputs, input_files
from train.loop.device import describe_precision, pick_device, resolve_precision, run_state
from train.loop.rundir import check_fresh, check_not_a_model, exclusive, remove_if_unstarted


def run_in_state(body, cfg, resume=False, dist=None):
    """body(cfg, resume, dist) with the run's seed and threads; `dist` None: one process. Rank 0
    holds the run directory's lock throughout; a fresh run refuses a directory holding a run."""
    dist = dist if dist is not None else distributed.single(pick_device(cfg.device))
    made = dist.is_main and not resume and not os.path.exists(cfg.out)
    with contextlib.ExitStack() as stack:
        held = None
        with dist.main_first():  # rank 0's refusal stops the other ranks quietly
            if dist.is_main:
                if not resume:
                    check_not_a_model(cfg.out)  # before the lock file is made there
                held = stack.enter_context(exclusive(cfg.out))
                if not resume:
                    check_fresh(cfg.out)
        stack.enter_context(run_state(cfg.seed, cfg.threads, dist.device))
        try:
            return body(cfg, resume, dist)
        except BaseException:
            if made:  # a run that stops before its first event leaves no directory behind
                remove_if_unstarted(cfg.out, held)  # while the lock is ours
            raise


def open_run(cfg, dist, resume, title):
    """(cfg, RunDir, precision name, autocast dtype) for a run about to start."""
    # absolute paths: config.json names the same files whatever directory --resume runs in
    cfg = distributed.fit_to_world(absolute_paths(cfg), dist, resume)
    run = distributed.run_dir(cfg.out, dist)
    print_config(cfg, title)
    if not resume:
        run.start_fresh()
        run.write_json("config.json", dataclasses.asdict(cfg))
        if run.writer:
            run.write_json("inputs.json", input_files(cfg))
    elif os.path.isfile(run.file("inputs.json")):  # on every rank: each stops alike
        check_same_inputs(load_json(run.file("inputs.json")))
    if cfg.attention.startswith("triton"):  # the device the run picked, not whether one exists
        check_device(torch.device(dist.device).type, f"attention={cfg.attention!r}")
    precision, amp = resolve_precision(cfg.precision, dist.device)
    said = describe_precision(precision, amp, cfg.precision, dist.device)
    print(f"device: {dist.device}, torch threads: {torch.get_num_threads()}, processes: "
          f"{dist.world}, precision: {said}, attention: {cfg.attention}, compile: {cfg.compile}",
          file=sys.stderr)
    return cfg, run, precision, amp


def absolute_paths(cfg):
    """cfg with its path fields made absolute: those declared `option(..., path=True)`, or
    `path=fn` where fn makes the path inside a spec absolute; a list field item by item."""
    def fix(how, v):
        if isinstance(v, list):
            return [fix(how, x) for x in v]
        return v if v is None else (absolute if how is True else how)(v)
    return dataclasses.replace(cfg, **{f.name: fix(f.metadata["path"], getattr(cfg, f.name))
                                       for f in dataclasses.fields(cfg) if "path" in f.metadata})


def read_run_config(run):
    """RUN/config.json, the resolved config a run saved at its start."""
    path = os.path.join(run, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"{run}: no config.json: not a minibert run directory")
    try:
        return load_json(path)
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None


def saved_config(config_cls, saved, run, name):
    """`config_cls` from RUN/config.json, refused in one line where the file is another
    command's run (a pretraining run given to finetune) or was edited into a wrong shape."""
    path = os.path.join(run, "config.json")
    if not isinstance(saved, dict):
        raise UserError(f"{path}: not a run's config (a JSON object)")
    unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(config_cls)})
    if unknown:
        raise UserError(f"{path}: {'keys' if len(unknown) > 1 else 'key'} {', '.join(unknown)}"
                        f" of no `minibert {name}` run; is it another command's run?")
    hints = typing.get_type_hints(config_cls)
    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
    for key, value in saved.items():
        if not (_fits(hints[key], value) or value is None and defaults[key] is None):
            raise UserError(f"{path}: {key} {json.dumps(value)} is not {_said(hints[key])}")
    try:
        return config_cls(**upgraded(saved))
    except (TypeError, ValueError) as e:  # a value of the wrong type or range, edited by hand
        raise UserError(f"{path}: {e}") from None


def upgraded(saved):
    """A config.json saved before a value was refused, in the spelling that means the same now:
    0 for --eval-every / --save-every meant never (none), for --threads torch's default (none)."""
    return {k: None if k in ("eval_every", "save_every", "threads") and v == 0 else v
            for k, v in saved.items()}


def _fits(tp, value):
    """Whether a JSON value is of the field type `tp` (int, float, str, bool, list[X], X | None)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_fits(t, value) for t in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return isinstance(value, list) and all(_fits(typing.get_args(tp)[0], v) for v in value)
    if tp is type(None):
        return value is None
    if tp in (int, float) and isinstance(value, bool):
        return False  # JSON's true is no number
    return isinstance(value, (int, float) if tp is float else tp)


def _said(tp):
    """A field type in JSON's words: `int | None` -> "an integer or null"."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_said(t) for t in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        inner = _said(typing.get_args(tp)[0]).split(" ", 1)[1]  # "an integer" -> "integer"
        return f"a list of {inner}s"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "null"}.get(tp, str(tp))


def command(args, name, config_cls, run_fn, check=None):
    """The body of `minibert NAME`: run_fn(cfg, resume=..., dist=...) from the flags or from
    --resume RUN; `check(cfg)` may refuse a fresh config with a ValueError."""
    if args.nproc > 1 and not distributed.launched():
        return distributed.launch(args.argv, args.nproc)  # this command again, under torchrun
    try:
        if args.resume:
            # the run's own config, in the directory given: a run copied or moved elsewhere
            # resumes there, not where it was first written. Only how this process runs may
            # change (--nproc, --threads); a flag that would change the run is refused, not
            # silently dropped.
            flags = {a.split("=")[0] for a in args.argv if a.startswith("--")}
            allowed = {"--resume", "--nproc", "--threads", "--debug"}
            # argparse took a flag's unique prefix (--thr) as the flag: allowed when every
            # option it could begin is (--de begins --device too, in pretrain)
            options = allowed | {"--" + f.name.replace("_", "-")
                                 for f in dataclasses.fields(config_cls)}
            given = sorted(f for f in flags if not {o for o in options if o.startswith(f)}
                           <= allowed)
            if given:
                raise UserError(f"--resume {args.resume} continues with the run's saved "
                                f"config.json; drop {', '.join(given)}")
            saved = read_run_config(args.resume)
            threads = {"threads": args.threads} if args.threads is not None else {}
            cfg = saved_config(config_cls, saved, args.resume, name)
            cfg = dataclasses.replace(cfg, out=args.resume, **threads)
        else:
            if distributed.launched() and args.nproc == 1:  # --nproc N, which launch() strips:
                args.nproc = int(os.environ["WORLD_SIZE"])  # --effective-batch-size counts it
            cfg = dataclass_from_args(config_cls, args)
            if check is not None:
                check(cfg)
    except (UserError, ValueError, OSError) as e:  # a config that refuses its flags
        if distributed.other_rank():
            raise SystemExit(2) from None  # rank 0 says it, once
        if isinstance(e, UserError):
            raise  # train/cli.py says it in one line
        raise SystemExit(f"minibert {name}: {e}") from None
    with distributed.session(pick_device(cfg.device)) as dist:
        try:
            run_fn(cfg, resume=bool(args.resume), dist=dist)
        except UserError:
            raise
        except ValueError as e:
            raise SystemExit(f"minibert {name}: {e}") from None
    return 0
