"""How a training command starts, for `minibert finetune` and `minibert pretrain` alike.

- `command(args, ...)`: `--nproc N` relaunches the command under torchrun; `--resume RUN` reads
  the config saved in RUN/config.json, a fresh run the flags; the run then goes inside this
  process's distributed session, and the project's own errors become one line.
- `run_in_state(body, cfg, ...)`: the run seeds torch and sets its thread count for its own
  duration only (train/loop/device.py), so a library caller's random stream is left alone.
- `open_run(cfg, dist, resume, title)`: the config fitted to the job's process count, the run
  directory (only rank 0 writes), the resolved config printed and saved, and the line that says
  where and in which precision the run computes.
"""

import dataclasses
import json
import os
import sys

import torch

from train.command import dataclass_from_args, print_config
from train.loop import distributed
from train.loop.device import describe_precision, pick_device, resolve_precision, run_state


def run_in_state(body, cfg, resume=False, dist=None):
    """body(cfg, resume, dist) with the run's seed and threads; `dist` None: one process."""
    dist = dist if dist is not None else distributed.single(pick_device(cfg.device))
    with run_state(cfg.seed, cfg.threads, dist.device):
        return body(cfg, resume, dist)


def open_run(cfg, dist, resume, title):
    """(cfg, RunDir, precision name, autocast dtype) for a run about to start."""
    cfg = distributed.fit_to_world(cfg, dist, resume)
    run = distributed.run_dir(cfg.out, dist)
    print_config(cfg, title)
    if not resume:
        run.write_json("config.json", dataclasses.asdict(cfg))
    precision, amp = resolve_precision(cfg.precision, dist.device)
    print(f"device: {dist.device}, torch threads: {torch.get_num_threads()}, processes: "
          f"{dist.world}, precision: {describe_precision(precision, amp)}, attention: "
          f"{cfg.attention}, compile: {cfg.compile}", file=sys.stderr)
    return cfg, run, precision, amp


def command(args, name, config_cls, run_fn, check=None):
    """The body of `minibert NAME`: run_fn(cfg, resume=..., dist=...) from the flags or from
    --resume RUN; `check(cfg)` may refuse a fresh config with a ValueError."""
    if args.nproc > 1 and not distributed.launched():
        return distributed.launch(args.argv, args.nproc)  # this command again, under torchrun
    try:
        if args.resume:
            with open(os.path.join(args.resume, "config.json"), encoding="utf-8") as f:
                cfg = config_cls(**json.load(f))
        else:
            cfg = dataclass_from_args(config_cls, args)
            if check is not None:
                check(cfg)
    except (ValueError, OSError) as e:
        raise SystemExit(f"minibert {name}: {e}") from None
    with distributed.session(pick_device(cfg.device)) as dist:
        try:
            run_fn(cfg, resume=bool(args.resume), dist=dist)
        except (ValueError, FileNotFoundError) as e:  # a DataError is a ValueError
            raise SystemExit(f"minibert {name}: {e}") from None
    return 0
