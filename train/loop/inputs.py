"""What a run reads, fingerprinted when it starts (RUN/inputs.json) and checked on --resume.

A corpus, data set or tokenizer that changed between the kill and the resume would continue the
run on other data or other token ids, with nothing said: the schedule recomputed for another
size, a step count that no longer fits, tokens that mean other words. So each file the config
names is hashed at the start, and a resume refuses in one line if one of them differs.

Which files: every config field declared `option(..., path=...)` whose value is a file, and, for
one that is a directory (a checkpoint, a tokenizer), the tokenizer files in it: by the time a run
resumes, the weights are its own state. A field declared with `inputs=fn` adds the files fn
names (the data of multi-task specs and of a --tasks-file). The run's own --out is not followed.
A run saved before this file existed has no inputs.json and is not checked.
"""

import dataclasses
import os

from minibert.errors import UserError
from minibert.fetch import sha256_of

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


def input_files(cfg):
    """The files `cfg` names: {path: sha256}."""
    paths = []
    for f in dataclasses.fields(cfg):
        if "path" not in f.metadata or f.name == "out":
            continue
        value = getattr(cfg, f.name)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and "inputs" in f.metadata:
                paths += f.metadata["inputs"](v)
            if isinstance(v, str) and os.path.isfile(v):
                paths.append(v)
            elif isinstance(v, str) and os.path.isdir(v):
                paths += [p for p in (os.path.join(v, n) for n in TOKENIZER_FILES)
                          if os.path.isfile(p)]
    return {p: sha256_of(p) for p in dict.fromkeys(paths)}


def check_same_inputs(saved):
    """Refuse a resume whose inputs are not the ones fingerprinted at the start."""
    for path, digest in saved.items():
        if not os.path.isfile(path):
            raise UserError(f"{path}: this run read it at its start, and it is gone; put it "
                            "back to resume, or start a new run")
        if sha256_of(path) != digest:
            raise UserError(f"{path}: changed since this run started (its sha256 differs), so "
                            "the run would continue on other data or token ids; put the "
                            "original back to resume, or start a new run")
