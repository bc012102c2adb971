"""What a fine-tuning task is: a head on the shared backbone, its data, its metrics.

A task is a class with these members (classification.py is the worked example):

    name, default_metric              e.g. "classification", "accuracy"
    metrics                           the names in evaluate()'s dict that --metric may choose
    uses_pooler                       whether a head reads BERT's pooler (else it stays frozen)
    __init__(meta)                    meta: a JSON-able dict saved as best/task.json; it holds
                                      everything needed to rebuild the head and read inputs
    from_data(cfg, tokenizer)         classmethod -> (task, {"train": ds, "dev": ds, "test": ds}):
                                      reads the files, builds meta (e.g. the label map from train)
    build_head(hidden_size, dropout)  -> nn.Module with forward(bert, batch) -> {"loss", ...}
    evaluate(model, ds, device)       -> metrics dict, always with "loss"
    read_inputs(texts, path, tok, batch_size, where)
                                      -> a dataset of unlabelled inputs, for `minibert predict`;
                                      `where` names text i in errors ("--text {}", "stdin:{}")
    predict(model, ds, device)        -> list of JSON-able rows, one per input

A dataset has `batches(epoch)`, `collate(indices)` and `lengths`, as train/loop/trainer.py expects.
"""

import torch
import torch.nn as nn

from minibert.errors import CheckpointError
from minibert.io import load_json_object


class TaskModel(nn.Module):
    """The backbone (`bert`) and one task head; `model(batch)` is the head's loss dict."""

    def __init__(self, bert, head):
        super().__init__()
        self.bert, self.head = bert, head

    def forward(self, batch):
        return self.head(self.bert, batch)


def head_metas(meta):
    """{head name: its task meta} of a task.json; a single task's one head is named None."""
    if meta["task"] == "multitask":
        return {h["name"]: h["meta"] for h in meta["heads"]}
    return {None: meta}


def head_meaning_differs(src, dst):
    """Why a head trained under task meta `src` would mean something else under `dst` (its
    outputs read as other labels, other units, another pooled vector), or None."""
    for key in ("task", "labels", "pooling", "crf", "bio_constraints"):  # labels: in order
        if src.get(key) != dst.get(key):
            return f"{key} {src.get(key)!r}, here {dst.get(key)!r}"
    scaled = [m.get("target_mean", 0.0) != 0.0 or m.get("target_std", 1.0) != 1.0
              for m in (src, dst)]
    if scaled[0] != scaled[1]:  # the head's outputs are in standardised units, or raw ones
        return "standardized targets, here raw ones" if scaled[0] else \
            "raw targets, here standardized ones"
    return None


def split_files(cfg):
    """(split, path) of each of --train, --dev and --test that is given, in that order."""
    return [(s, getattr(cfg, s)) for s in ("train", "dev", "test") if getattr(cfg, s)]


def batching(cfg, split):
    """(batch size, seed, group_by_length, shuffle) of a split's dataset: training batches are
    shuffled (and grouped by length with --group-by-length); the others, evaluation batches, are
    taken in order."""
    train = split == "train"
    return (cfg.batch_size if train else cfg.eval_batch_size, cfg.seed,
            cfg.group_by_length and train, train)


@torch.no_grad()
def run_batches(model, dataset, device, fn):
    """fn(outputs, indices) for every batch of `dataset` in length order (least padding), in eval
    mode; returns the per-example results of fn re-ordered to dataset order."""
    model.eval()
    order = sorted(range(len(dataset.lengths)), key=lambda i: dataset.lengths[i])
    out = [None] * len(order)
    for s in range(0, len(order), dataset.batch_size):
        idx = order[s:s + dataset.batch_size]
        batch = {k: v.to(device) for k, v in dataset.collate(idx).items()}
        for i, r in zip(idx, fn(model(batch), idx)):
            out[i] = r
    return out


def task_from_file(tasks, path):
    """The task a saved task.json describes, from `tasks` (name -> class); a file that minibert
    did not write, or that was damaged, is one line naming it."""
    meta = load_json_object(path, CheckpointError)
    if meta.get("task") not in tasks:
        raise CheckpointError(f"{path}: task {meta.get('task')!r} is not one of "
                              f"{', '.join(tasks)}: not a task.json minibert wrote")
    try:
        return tasks[meta["task"]](meta)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a task.json minibert wrote ({type(e).__name__}: "
                              f"{e})") from None


def load_head_state(head, state, path):
    """head.load_state_dict(state), where `state` was read from `path`; a state of another
    head (another run's, a damaged file) is one line, not torch's report of every key."""
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        gist = str(e).strip().splitlines()[-1].strip()  # torch's list of keys or shapes
        raise CheckpointError(f"{path}: does not fit the head its task.json describes ({gist}); "
                              "the two come from different runs") from None
