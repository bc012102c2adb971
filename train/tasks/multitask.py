"""Multi-task fine-tuning: one backbone, several named heads, each with its own task type and data
(the hard parameter sharing of Caruana 1997, as in MT-DNN, Liu et al. 2019).

Tasks are given as specs, either on the command line

    --tasks 'polarity:classification:data/rt-snippets/{split}.jsonl:label_field=label,
             intensity:regression:data/rt-snippets/{split}.jsonl:target_field=score:weight=0.5'

(NAME:TYPE:PATH[:key=value...], specs separated by commas; `{split}` in PATH becomes train, dev
and test, and a dev/test file that does not exist is skipped), or as a JSON file `--tasks-file`:
[{"name": "polarity", "type": "classification", "path": "...{split}.jsonl", "label_field":
"label"}, ...], where a relative path is read from the file's own folder. Every key other
than name/type/path/weight sets, for this task alone, a flag of how it reads its data and builds
its head (PER_TASK below: label_field, target_field, standardize_targets, crf, max_length,
pooling ...); training flags are the run's.
`weight` multiplies the task's loss (default 1).

Each batch holds one task. Which task comes next (`--sampling`):
- proportional: every batch of every task once per epoch, shuffled together, so a task is drawn
  in proportion to its size n_i;
- round-robin: tasks in turn; a task that runs out starts over with a fresh shuffle;
- temperature: task i with probability n_i^(1/T) / sum_j n_j^(1/T) (Arivazhagan et al. 2019);
  T = 1 is proportional, large T approaches uniform.
An epoch is as many batches as all tasks have together. The order is a pure function of
(seed, epoch), like every other dataset here, so resume is exact.

Dev metrics are "NAME/metric" for every head, plus `combined`, the mean of each head's default
metric (all of them higher-is-better; note that QA's F1 is in percent, the others in 0-1), and
`loss`, the weighted sum of the heads' dev losses. `--freeze-head NAME` keeps a head's weights
bit for bit, at its new initialisation or, with `--init-heads NAME=DIR`, at the weights a
previous run trained (train task A, then train B with A's head frozen and A's loss still on:
the backbone moves for B while A's head keeps being served). The checkpoint's head.safetensors
holds every head under its `NAME.` prefix, and `minibert predict` answers with every head.

Limits: a batch never mixes tasks; --batch-size auto is refused (its probe batches would).
"""

import dataclasses
import os
import random
import typing

import torch
import torch.nn as nn

from minibert.config import BertConfig
from minibert.io import load_json
from train.command import converter
from train.data.examples import DataError
from train.finetune.config import (TASK_FLAGS, FinetuneConfig, flag_applies, flag_defaults,
                                   tasks_file_path)
from train.tasks.registry import SINGLE_TASKS
from train.tasks.task import TaskModel

SPLITS = ("train", "dev", "test")


@dataclasses.dataclass
class TaskSpec:
    name: str
    type: str
    path: str  # with {split}
    weight: float = 1.0
    options: dict = dataclasses.field(default_factory=dict)  # FinetuneConfig fields


# the fine-tuning flags that say how a task reads its data and builds its head: the ones a spec
# may set for its task alone (the training flags, lr, epochs, freezing..., are the run's)
PER_TASK = ("text_field", "pair_field", "label_field", "target_field", "standardize_targets",
            "skip_bad_rows", "max_length", "pooling", "crf", "bio_constraints", "doc_stride",
            "max_answer_len")


def _convert(cfg_cls, key, value, where):
    """A spec option, from the command line (a string) or JSON (typed), read as the flag of the
    FinetuneConfig field it sets would read it: its type, its choices."""
    field = {f.name: f for f in dataclasses.fields(cfg_cls)}.get(key)
    if field is None or key not in PER_TASK:  # training flags are the run's, for every head
        raise ValueError(f"{where}: {key!r} is not a per-task option; those are "
                         f"{', '.join(PER_TASK)}")
    tp = typing.get_type_hints(cfg_cls)[key]
    parse = converter(tp)
    if isinstance(value, (dict, list)):  # from JSON; no per-task flag takes a list
        raise ValueError(f"{where}: {key}={value!r} must be {getattr(parse, '__name__', tp)}")
    text = str(value)
    if tp is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{where}: {key} must be true or false, not {value!r}")
        return text.lower() in ("true", "1")
    try:
        out = parse(text)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {key}={value!r} must be {getattr(parse, '__name__', tp)}"
                         ) from None
    choices = field.metadata.get("choices")
    if choices and out not in choices:
        raise ValueError(f"{where}: {key}={value!r} must be one of {', '.join(choices)}")
    return out


def parse_specs(cfg):
    """TaskSpecs from --tasks or --tasks-file (exactly one of them)."""
    if bool(cfg.tasks) == bool(cfg.tasks_file):
        raise ValueError("--task multitask needs --tasks or --tasks-file (one of them)")
    raw = []
    if cfg.tasks:
        for n, spec in enumerate(cfg.tasks, 1):
            parts = spec.strip().split(":")
            if len(parts) < 3 or not all(parts[:3]):
                raise ValueError(f"--tasks spec {n} {spec!r}: write NAME:TYPE:PATH[:key=value...]")
            opts = {}
            for kv in parts[3:]:
                if "=" not in kv:
                    raise ValueError(f"--tasks spec {n} {spec!r}: {kv!r} is not key=value")
                k, v = kv.split("=", 1)
                opts[k] = v
            raw.append((f"--tasks spec {n}", {"name": parts[0], "type": parts[1],
                                               "path": parts[2], **opts}))
    else:
        try:
            rows = load_json(cfg.tasks_file)
        except ValueError as e:
            raise ValueError(f"{cfg.tasks_file}: not valid JSON ({e})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{cfg.tasks_file}: must be a JSON list of objects, one a task "
                             "(name, type, path, ...)")
        raw = [(f"{cfg.tasks_file}[{i}]", dict(r)) for i, r in enumerate(rows)]
    specs = []
    for where, d in raw:
        missing = [k for k in ("name", "type", "path") if k not in d]
        if missing:
            raise ValueError(f"{where}: missing {missing[0]!r}")
        name, typ, path = d.pop("name"), d.pop("type"), d.pop("path")
        for key, v in (("name", name), ("type", typ), ("path", path)):
            if not isinstance(v, str) or not v:
                raise ValueError(f"{where}: {key}={v!r} must be a non-empty string")
        if cfg.tasks_file:  # read from the file's folder: the same files from any directory
            path = tasks_file_path(cfg.tasks_file, path)
        if typ not in SINGLE_TASKS:
            raise ValueError(f"{where}: unknown task type {typ!r}; one of {list(SINGLE_TASKS)}")
        weight = d.pop("weight", 1.0)
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: weight={weight!r} must be a number") from None
        opts = {k: _convert(FinetuneConfig, k, v, where) for k, v in d.items()}
        unread = [k for k in opts if flag_applies(k, typ)]
        if unread:  # e.g. crf=true on a classification head: it would be ignored
            raise ValueError(f"{where}: {unread[0]} applies to type "
                             f"{' or '.join(TASK_FLAGS[unread[0]])} only")
        if "{split}" not in path:  # else dev and test would be the training file itself
            raise ValueError(f"{where}: path {path!r} has no {{split}}, which becomes train, dev "
                             "and test (a dev or test file that does not exist is skipped)")
        specs.append(TaskSpec(name, typ, path, weight, opts))
    names = [s.name for s in specs]
    if len(set(names)) != len(names) or any("." in n or "/" in n for n in names):
        raise ValueError(f"task names must be unique, without '.' or '/': {names}")
    return specs


class MultiHead(nn.ModuleDict):
    """Heads by name; a batch's `task_id` picks the head, whose loss is scaled by its weight.
    Being a ModuleDict, its state_dict keys are `NAME.<the head's own keys>`."""

    def __init__(self, heads, weights):
        super().__init__(heads)
        self.names, self.weights = list(heads), weights

    def forward(self, bert, batch):
        name = self.names[int(batch["task_id"][0])]
        out = self[name](bert, {k: v for k, v in batch.items() if k != "task_id"})
        if "loss" in out:
            out["loss"] = out["loss"] * self.weights[name]
        return out


class MultiDataset:
    """Several tasks' datasets behind one index space; every batch comes from one task."""

    def __init__(self, parts, sampling, temperature, seed):
        self.parts, self.names = parts, list(parts)
        self.sampling, self.temperature, self.seed = sampling, temperature, seed
        self.offsets, n = {}, 0
        for name in self.names:
            self.offsets[name] = n
            n += len(parts[name].lengths)
        self.lengths = [x for name in self.names for x in parts[name].lengths]

    @property
    def batch_size(self):
        return self.parts[self.names[0]].batch_size

    @batch_size.setter
    def batch_size(self, b):  # e.g. set by --effective-batch-size planning: applies to every task
        for ds in self.parts.values():
            ds.batch_size = b

    def _stream(self, name, epoch):
        """The task's batches, as global indices, forever: each pass a fresh shuffle."""
        k = 0
        while True:
            for b in self.parts[name].batches(epoch * 1_000 + k):
                yield [self.offsets[name] + i for i in b]
            k += 1

    def batches(self, epoch):
        rng = random.Random(self.seed * 7_919 + epoch)
        own = {n: [[self.offsets[n] + i for i in b] for b in self.parts[n].batches(epoch)]
               for n in self.names}
        total = sum(len(b) for b in own.values())
        if self.sampling == "proportional":
            out = [b for n in self.names for b in own[n]]
            rng.shuffle(out)
            return out
        streams = {n: self._stream(n, epoch) for n in self.names}
        if self.sampling == "round-robin":
            return [next(streams[self.names[i % len(self.names)]]) for i in range(total)]
        sizes = [len(self.parts[n].lengths) for n in self.names]
        p = [s ** (1.0 / self.temperature) for s in sizes]
        return [next(streams[rng.choices(self.names, weights=p)[0]]) for _ in range(total)]

    def unit_of(self, idx):
        """The task (its number) of a batch of global indices: what its items count."""
        return max(i for i, n in enumerate(self.names) if self.offsets[n] <= idx[0])

    def count_items(self, batch):
        """What the batch's task averages its loss over (a tagger's words), else its examples;
        train/loop/accumulate.py weighs tasks by examples and each task's batches by these."""
        count = getattr(self.parts[self.names[int(batch["task_id"][0])]], "count_items", None)
        return count(batch) if count is not None else len(batch["task_id"])

    def collate(self, idx):
        k = self.unit_of(idx)
        name = self.names[k]
        local = [i - self.offsets[name] for i in idx]
        if not all(0 <= i < len(self.parts[name].lengths) for i in local):
            raise ValueError("a multitask batch mixes tasks")  # batches() never makes one
        batch = self.parts[name].collate(local)
        batch["task_id"] = torch.full((len(idx),), k, dtype=torch.long)
        return batch


class MultiTask:
    name = "multitask"
    default_metric = "combined"

    def __init__(self, meta):
        self.meta = meta
        self.tasks = {h["name"]: SINGLE_TASKS[h["meta"]["task"]](h["meta"])
                      for h in meta["heads"]}
        self.weights = {h["name"]: h["weight"] for h in meta["heads"]}

    @classmethod
    def from_data(cls, cfg, tok):
        specs = parse_specs(cfg)
        positions = BertConfig.from_json(os.path.join(cfg.model, "config.json")
                                         ).max_position_embeddings
        heads, parts = [], {s: {} for s in SPLITS}
        defaults = flag_defaults()
        unread = [k for k in TASK_FLAGS if getattr(cfg, k) != defaults[k]
                  and all(flag_applies(k, s.type) for s in specs)]
        if unread:  # a run's --crf with no tagging head would be ignored
            raise ValueError(f"{flag_applies(unread[0], 'multitask')}, and no head is of that "
                             "type")
        for spec in specs:
            # the run's task flags are the defaults of the heads that read them; the others keep
            # the field's default (their own check would refuse a --crf on a classification head).
            # Early stopping and the schedule follow the run's dev metric, checked below.
            unused = {k: defaults[k] for k in TASK_FLAGS if flag_applies(k, spec.type)}
            if not spec.options.get("crf", cfg.crf):  # a head that says crf=false: no constraints
                unused["bio_constraints"] = False
            paths = {s: spec.path.replace("{split}", s) for s in SPLITS}
            if not os.path.exists(paths["train"]):
                raise DataError(f"task {spec.name}: no training data at {paths['train']}")
            sub = dataclasses.replace(
                cfg, task=spec.type, metric=None, tasks=None, tasks_file=None, freeze_head=None,
                init_heads=None, early_stopping_patience=None, schedule="linear",
                **{s: paths[s] if os.path.exists(paths[s]) else None for s in SPLITS},
                **{**unused, **spec.options})
            if spec.options.get("max_length", 0) > positions:  # --max-length is capped already
                raise ValueError(f"task {spec.name}: max_length={sub.max_length} is above the "
                                 f"{positions} positions {cfg.model} has")
            task, data = SINGLE_TASKS[spec.type].from_data(sub, tok)
            heads.append({"name": spec.name, "weight": spec.weight, "meta": task.meta})
            for split, ds in data.items():
                parts[split][spec.name] = ds
        watch = "--schedule plateau" if cfg.schedule == "plateau" else \
            "--early-stopping-patience" if cfg.early_stopping_patience is not None else None
        if watch and not parts["dev"]:
            raise ValueError(f"{watch} follows the dev metric, and no --tasks head has a dev file")
        task = cls({"task": cls.name, "heads": heads, "sampling": cfg.sampling,
                    "sampling_temperature": cfg.sampling_temperature})
        data = {s: MultiDataset(p, cfg.sampling, cfg.sampling_temperature, cfg.seed)
                for s, p in parts.items() if p}
        return task, data

    @property
    def metrics(self):
        return ["combined", "loss"] + [f"{n}/{m}" for n, t in self.tasks.items() for m in t.metrics]

    @property
    def uses_pooler(self):  # pooling is per head: one head with --pooling cls trains it
        return any(t.uses_pooler for t in self.tasks.values())

    def build_head(self, hidden_size, dropout):
        return MultiHead({n: t.build_head(hidden_size, dropout) for n, t in self.tasks.items()},
                         self.weights)

    def freeze_head(self, head, name):
        if name not in head:
            raise ValueError(f"--freeze-head {name}: no such head; heads are {list(head)}")
        head[name].requires_grad_(False)

    def evaluate(self, model, ds, device):
        out, main, loss = {}, [], 0.0
        for name, part in ds.parts.items():
            sub = self.tasks[name]
            m = sub.evaluate(TaskModel(model.bert, model.head[name]), part, device)
            out.update({f"{name}/{k}": v for k, v in m.items()})
            main.append(m[sub.default_metric])
            loss += self.weights[name] * m["loss"]
        out["combined"] = sum(main) / len(main)
        out["loss"] = loss
        return out

    def only(self, names):
        """This model's task with the heads `names` alone (predict --head), in meta order."""
        return MultiTask({**self.meta, "heads": [h for h in self.meta["heads"]
                                                 if h["name"] in names]})

    def input_kinds(self):
        """{head name: the input it reads}: one --text feeds every head only if they agree."""
        return {n: "'QUESTION ||| CONTEXT'" if t.meta["task"] == "qa" else
                "'TEXT ||| PAIR'" if t.meta.get("pair_field") else "a text"
                for n, t in self.tasks.items()}

    def read_inputs(self, texts, path, tok, batch_size, where="--text {}"):
        """Every head reads the same inputs, each with its own fields."""
        return {n: t.read_inputs(texts, path, tok, batch_size, where)
                for n, t in self.tasks.items()}

    def predict(self, model, ds, device):
        per_head = {n: self.tasks[n].predict(TaskModel(model.bert, model.head[n]), ds[n], device)
                    for n in self.tasks}
        first = next(iter(per_head.values()))  # the first head's rows (self.tasks keeps meta order)
        # the text once, where the heads read one (a QA head's rows carry their question)
        return [{**({"text": row["text"]} if "text" in row else {}),
                 **{n: {k: v for k, v in preds[i].items() if k != "text"}
                    for n, preds in per_head.items()}}
                for i, row in enumerate(first)]
