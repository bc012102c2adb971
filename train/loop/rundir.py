"""The run directory: everything a run writes, each file so that a kill at any instant loses
nothing already written.

    RUN/config.json      the resolved run config
    RUN/metrics.jsonl    one JSON object per log or eval event, appended; a train event's "lr"
                         is each group's lr after the step's schedule update, the one the next
                         update uses (as transformers' Trainer logs it)
    RUN/results.json     final metrics of the best checkpoint evaluated again (fine-tuning:
                         dev/test in fp32; pretraining: valid, in the run's precision), best
                         step, time, throughput
    RUN/best/            the best model so far (Hugging Face layout plus the task's head)
    RUN/state/           optimizer, scheduler, RNG, data position and step: what resume needs

metrics.jsonl is appended one line at a time (flushed and fsynced), so a long pretraining run
costs O(1) per event. A kill in the middle of a line leaves a torn last line without its newline;
`read_jsonl` ignores it. Resume truncates the file once, to the events the resumed state had
seen (`load_events`), so that the events of the lost steps are not counted twice.

A directory such as `best/` or `state/` is several files; it is written whole into `NAME.new/`,
then swapped in by two renames (`NAME` -> `NAME.old`, `NAME.new` -> `NAME`). A run killed between
the renames leaves `NAME.old`, which `find_dir` falls back to.

In a data-parallel job only rank 0 writes: other ranks get `RunDir(path, writer=False)`, which
keeps its events in memory (the trainer saves their count with its state) and writes nothing.

Two guards keep one run's files from mixing with another's: `exclusive(path)` holds RUN/.lock
(an flock, released by the kernel even on kill -9) for the duration of a run, so a second run
pointed at the same --out refuses; and `check_fresh(path)` refuses to start a new run where a
resumable or finished one lives (state/ or results.json). A full disk while saving leaves the
previous best/ or state/ in place and stops with one line that says so.
"""

import contextlib
import errno
import fcntl
import json
import os
import shutil

from minibert.errors import UserError
from minibert.io import atomic_write_json, atomic_write_text, json_line


class RunDir:
    def __init__(self, path, writer=True):
        self.path, self.writer = path, writer
        if writer:
            os.makedirs(path, exist_ok=True)
        self.events = []

    def start_fresh(self):
        """A new run: drop the events of one killed before it saved anything (check_fresh
        has made sure there was nothing to resume)."""
        if self.writer and os.path.exists(self.file("metrics.jsonl")):
            os.remove(self.file("metrics.jsonl"))

    def file(self, name):
        return os.path.join(self.path, name)

    def log(self, event):
        self.events.append(event)
        if self.writer:
            line = json_line(event) + "\n"  # strict JSON: a NaN is written as null
            with open(self.file("metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())

    def load_events(self, keep):
        """On resume: the first `keep` events, and metrics.jsonl cut back to them (once)."""
        self.events = read_jsonl(self.file("metrics.jsonl"))[:keep]
        if self.writer:
            atomic_write_text(self.file("metrics.jsonl"),
                              "".join(json_line(e) + "\n" for e in self.events))

    def write_json(self, name, obj):
        if self.writer:
            atomic_write_json(self.file(name), obj)

    def save_dir(self, name, write_fn):
        """write_fn(tmp_dir) fills a fresh directory, which then replaces RUN/name."""
        if not self.writer:
            return
        final, new, old = self.file(name), self.file(name + ".new"), self.file(name + ".old")
        shutil.rmtree(new, ignore_errors=True)
        os.makedirs(new)
        try:
            write_fn(new)
        except OSError as e:
            shutil.rmtree(new, ignore_errors=True)
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            kept = self.find_dir(name)
            said = f"the previous {os.path.basename(kept)}/ is intact" if kept else \
                f"no {name}/ had been saved yet"
            then = "--resume" if self.find_dir("state") else "start the run again"
            raise UserError(f"{final}: the disk is full ({e.strerror}); {said}: free some space, "
                            f"then {then}") from None
        if os.path.exists(final):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(new, final)
        shutil.rmtree(old, ignore_errors=True)

    def find_dir(self, name):
        for cand in (name, name + ".old"):
            if os.path.isdir(self.file(cand)):
                return self.file(cand)
        return None


# what a checkpoint or a tokenizer holds at its top; a run keeps its models in subdirectories
MODEL_FILES = ("model.safetensors", "pytorch_model.bin", "head.safetensors", "task.json",
               "tokenizer.json", "vocab.txt")


def check_not_a_model(path, files=MODEL_FILES):
    """Refuse to write into a directory that holds a checkpoint or a tokenizer: its config.json
    and files would be replaced (`--out` given the `--model` directory, say); and a file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{path}: a file, not a directory; give another --out")
    held = [n for n in files if os.path.exists(os.path.join(path, n))]
    if held:
        raise UserError(f"{os.path.join(path, held[0])}: {path} holds a checkpoint or a "
                        "tokenizer, which writing here would replace; give another --out")


def check_fresh(path, resumable=True):
    """Refuse to start a new run in a directory that holds one (resumable or finished)."""
    held = [n for n in ("state", "state.old", "results.json")
            if os.path.exists(os.path.join(path, n))]
    if held:
        raise UserError(f"{os.path.join(path, held[0])}: {path} holds a run already; "
                        + (f"continue it with --resume {path}, or " if resumable else "")
                        + "give another --out")


@contextlib.contextmanager
def exclusive(path):
    """Hold RUN/.lock for the block (`as` gives its open file): one run writes into a directory
    at a time."""
    os.makedirs(path, exist_ok=True)
    lock = os.path.join(path, ".lock")
    with open(lock, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise UserError(f"{lock}: another minibert run (pid {pid}) is writing into {path}; "
                            "wait for it to end, or give another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# what a fresh run writes before its first event: nothing that a user would miss
STARTUP_FILES = {".lock", "config.json", "inputs.json"}


def remove_if_unstarted(path, lock):
    """Remove the directory `path` if it holds no more than a run's startup files: for a --out
    that a run made and then stopped in (a refusal, an error, Ctrl-C) before logging anything.
    Called while holding `lock`, the open RUN/.lock that `exclusive` yields: no other run can
    have written here, and a .lock that is not that same file is left alone."""
    if not (os.path.isdir(path) and set(os.listdir(path)) <= STARTUP_FILES):
        return
    for name in STARTUP_FILES - {".lock"}:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(path, name))
    with contextlib.suppress(OSError):
        if os.path.samestat(os.fstat(lock.fileno()), os.stat(os.path.join(path, ".lock"))):
            os.remove(os.path.join(path, ".lock"))
        os.rmdir(path)  # fails, and keeps the directory, if anything new is in it


def read_jsonl(path):
    """The events of a metrics.jsonl; a torn last line (a kill mid-append) is left out."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    complete = lines[:-1]  # the part after the last newline is empty, or a torn line
    events, damaged = [], "the file was damaged or is not a run's metrics.jsonl"
    for n, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path}:{n}: not a JSON event ({e}); {damaged}") from None
        if not isinstance(event, dict):
            raise UserError(f"{path}:{n}: not a JSON event (not an object); {damaged}")
        events.append(event)
    return events
