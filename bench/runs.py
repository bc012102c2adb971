"""The runs a bench needs, made once: `minibert CMD ... --out OUT` for every OUT that has no
results.json yet, `jobs` at a time.

A bench lists its runs as (OUT, [command, flags...]). A finished run is read back, never run
again, so an interrupted bench continues where it stopped; a run that was killed part way (OUT
holds state/ but no results.json) continues with `--resume OUT`. Each run's log goes to OUT.log,
beside its directory, so that parallel runs do not interleave on the terminal.

Runs in parallel share the CPU: use jobs > 1 for accuracy, never for timings. Two benches that
share runs may run at once: OUT.making, a directory holding its maker's pid, says that a run is
being made, and the other bench waits for it instead of making it twice.
"""

import contextlib
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

RESUMABLE = ("finetune", "distill")  # the commands that take --resume RUN


def finished(out):
    return os.path.exists(os.path.join(out, "results.json"))


def results(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def command(out, args, threads=None):
    """The argv that makes (or continues) run OUT."""
    args = [str(a) for a in args]
    if os.path.isdir(os.path.join(out, "state")):
        if args[0] not in RESUMABLE:
            raise SystemExit(f"{out}: a killed `minibert {args[0]}` run; remove it to start over")
        args = [args[0], "--resume", out]
    else:
        args = [*args, "--out", out]
    if threads:
        args += ["--threads", str(threads)]
    return [sys.executable, "-P", "-m", "train.cli", *args]


def claim(lock):
    """Takes the directory `lock` (mkdir is atomic) and writes this process's pid in it; False
    when a live process holds it. A holder that died is taken over."""
    while True:
        try:
            os.mkdir(lock)
        except FileExistsError:
            if alive(lock):
                return False
            time.sleep(1)  # a holder that has not written its pid yet, or a dead one
            if not alive(lock):
                release(lock)
            continue
        with open(os.path.join(lock, "pid"), "w") as f:
            f.write(str(os.getpid()))
        return True


def alive(lock):
    """Whether the process whose pid `lock` holds still runs."""
    try:
        with open(os.path.join(lock, "pid")) as f:
            os.kill(int(f.read()), 0)  # signal 0 only asks
        return True
    except (OSError, ValueError):
        return False


def release(lock):
    """Removes `lock`; one that is gone already, or taken over meanwhile, is left as it is."""
    with contextlib.suppress(OSError):
        os.remove(os.path.join(lock, "pid"))
    with contextlib.suppress(OSError):
        os.rmdir(lock)


def run_one(out, args, threads):
    """Makes run OUT, or waits while another bench process makes it (two benches sharing runs)."""
    lock = out.rstrip("/") + ".making"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if not claim(lock):
        print(f"waiting: {out} is being made by another process", file=sys.stderr, flush=True)
        while alive(lock) and not finished(out):
            time.sleep(10)
        return None if finished(out) else run_one(out, args, threads)
    try:
        return make_one(out, args, threads)
    finally:
        release(lock)


def make_one(out, args, threads):
    argv = command(out, args, threads)
    print(f"running: minibert {' '.join(argv[4:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out.rstrip("/") + ".log", "a", encoding="utf-8") as log:
        code = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=log).returncode
    if code:
        return f"{out}: minibert exited with {code}; its log is {out.rstrip('/')}.log"
    print(f"done: {out} in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return None


def run_missing(todo, jobs=1, threads=None):
    """Make every run of `todo` [(OUT, args)] that is not finished, `jobs` at a time, each with
    --threads `threads` when given. Every run is tried; then the first failure stops the bench."""
    pending = [(out, args) for out, args in todo if not finished(out)]
    if pending:
        print(f"{len(pending)} of {len(todo)} runs to make, {jobs} at a time", file=sys.stderr)
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        errors = [e for e in pool.map(lambda t: run_one(*t, threads), pending) if e]
    if errors:
        raise SystemExit("\n".join(errors))
