"""The run directory: everything a run writes, each file atomically.

    RUN/config.json      the resolved run config
    RUN/metrics.jsonl    one JSON object per log or eval event
    RUN/results.json     final dev/test metrics, best step, time, throughput
    RUN/best/            the best model so far (Hugging Face layout plus the task's head)
    RUN/state/           optimizer, scheduler, RNG, data position and step: what resume needs

A directory such as `best/` or `state/` is several files; it is written whole into `NAME.new/`,
then swapped in by two renames (`NAME` -> `NAME.old`, `NAME.new` -> `NAME`). A run killed between
the renames leaves `NAME.old`, which `find_dir` falls back to, so a kill at any instant loses at
most the work since the last save.
"""

import json
import os
import shutil

from minibert.io import atomic_write_json, atomic_write_text


class RunDir:
    def __init__(self, path):
        self.path = path
        os.makedirs(path, exist_ok=True)
        self.events = []

    def file(self, name):
        return os.path.join(self.path, name)

    # metrics.jsonl is rewritten whole (atomically) at each event: it stays small, and a resumed
    # run can drop the events that came after the state it resumes from.
    def log(self, event):
        self.events.append(event)
        atomic_write_text(self.file("metrics.jsonl"),
                          "".join(json.dumps(e) + "\n" for e in self.events))

    def load_events(self, keep):
        self.events = read_jsonl(self.file("metrics.jsonl"))[:keep]

    def write_json(self, name, obj):
        atomic_write_json(self.file(name), obj)

    def save_dir(self, name, write_fn):
        """write_fn(tmp_dir) fills a fresh directory, which then replaces RUN/name."""
        final, new, old = self.file(name), self.file(name + ".new"), self.file(name + ".old")
        shutil.rmtree(new, ignore_errors=True)
        os.makedirs(new)
        write_fn(new)
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


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
