"""`minibert finetune`: build everything from a FinetuneConfig, then run the Trainer.

Reads top to bottom: device and seed -> data -> model and head -> freezing and parameter groups
-> optimizer and schedule -> trainer -> final test evaluation with the best checkpoint.
The run directory layout is described in train/loop/rundir.py; `--resume RUN` continues a killed run
from its `state/` with the config saved in `RUN/config.json`. The body, `train_task_model`, takes
the model and its loss as a parameter: `minibert distill` (train/distill/) runs it with a student
and a teacher's loss.
"""

import dataclasses
import functools
import json
import os
import sys


from minibert.checkpoint import (check_vocabulary, load_model, read_pooler, read_safetensors,
                                 save_model)
from minibert.config import BertConfig
from minibert.io import atomic_save_safetensors, atomic_write_json, load_json
from minibert.model import BertEncoder
from minibert.tokenizer import Tokenizer
from train.runs.diagnose import write_diagnosis
from train.finetune.config import (FinetuneConfig, batch_size_arg, check_metric, head_spec,
                                   unused_flags)
from train.command import add_dataclass_flags
from train.runs.memory import auto_batch_size, plan_accumulation
from train.tasks.multitask import MultiTask
from train.loop.optim import AdamW
from train.loop.params import (GradualUnfreezer, LrPolicy, frozen_units, param_groups, print_groups,
                          set_trainable, units_top_down)
from train.loop.schedules import LambdaSchedule, WarmupThenPlateau, lr_multiplier
from train.tasks.registry import SINGLE_TASKS
from train.tasks.task import (TaskModel, head_meaning_differs, head_metas, load_head_state,
                              task_from_file)
from train.loop.device import OutOfMemory, grad_scaler
from train.loop.launch import command, open_run, run_in_state
from train.loop.trainer import Diverged, LoopSettings, Trainer, plan_steps

# --task NAME -> the class that knows its head, data and metrics (train/tasks/task.py)
TASKS = {**SINGLE_TASKS, MultiTask.name: MultiTask}


def model_overrides(cfg):
    """The BertConfig fields that flags replace: the attention code, and dropouts when given."""
    overrides = {"attention": cfg.attention}
    if cfg.hidden_dropout is not None:
        overrides["hidden_dropout_prob"] = cfg.hidden_dropout
    if cfg.attention_dropout is not None:
        overrides["attention_probs_dropout_prob"] = cfg.attention_dropout
    return overrides


def with_new_head(bert, cfg, task):
    """`bert` plus a fresh head for `task`; its dropout is --classifier-dropout, else the
    backbone's hidden dropout."""
    drop = cfg.classifier_dropout if cfg.classifier_dropout is not None else \
        bert.config.hidden_dropout_prob
    return TaskModel(bert, task.build_head(bert.config.hidden_size, drop))


def load_backbone(path, overrides):
    """load_model(path) with `overrides`, printing its notes (what it dropped or made new)."""
    notes = []
    bert = load_model(path, notes=notes, **overrides)
    for n in notes:
        print(f"init: {n}", file=sys.stderr)
    return bert


def build_model(cfg: FinetuneConfig, task):
    """The backbone from the checkpoint (or its config alone for --init random) plus a new head."""
    overrides = model_overrides(cfg)
    if cfg.init == "pretrained":
        bert = load_backbone(cfg.model, overrides)
    else:
        mc = BertConfig.from_json(os.path.join(cfg.model, "config.json"))
        bert = BertEncoder(dataclasses.replace(mc, **overrides))
        print("init: random weights (BERT's N(0, 0.02) initialisation), same architecture",
              file=sys.stderr)
    return with_new_head(bert, cfg, task)


def init_heads(model, specs, task):
    """--init-heads: copy trained head weights from finetune runs' best/ into the new head(s).
    DIR replaces the whole head; NAME=DIR (multitask) replaces head NAME, taken from DIR's head
    NAME when DIR is itself multi-task, else DIR's whole head. Shapes and keys must match.
    A head trained on cls pooling read BERT's pooler, which DIR's model.safetensors holds: DIR
    brings it along, except into a multi-task model, whose heads share one pooler."""
    head, task_name = model.head, task.name
    for spec in specs:
        name, src = head_spec(spec)
        path = os.path.join(src, "head.safetensors")
        if not os.path.exists(path):
            raise SystemExit(f"minibert finetune: --init-heads {spec}: no {path} (give a "
                             "finetune run's best/ directory)")
        src_meta = load_json(os.path.join(src, "task.json"))
        src_task, src_heads = src_meta["task"], head_metas(src_meta)
        dst_heads = head_metas(task.meta)
        for n in [name] if name else list(dst_heads):
            s, d = src_heads.get(n if src_task == "multitask" else None), dst_heads.get(n)
            why = s is not None and d is not None and head_meaning_differs(s, d)
            if why:
                raise SystemExit(f"minibert finetune: --init-heads {spec}: that head was trained "
                                 f"with {why}: its outputs would mean something else here")
        weights = read_safetensors(path)
        if name and src_task == "multitask":
            weights = {k[len(name) + 1:]: v for k, v in weights.items()
                       if k.startswith(name + ".")}
        if name and name not in head:
            raise SystemExit(f"minibert finetune: --init-heads {spec}: no head {name!r}; "
                             f"heads are {list(head)}")
        target = head[name] if name else head
        want = target.state_dict()
        if set(weights) != set(want) or any(weights[k].shape != want[k].shape for k in want):
            have = {k: tuple(v.shape) for k, v in weights.items()}
            need = {k: tuple(v.shape) for k, v in want.items()}
            raise SystemExit(f"minibert finetune: --init-heads {spec}: {path} ({src_task}) "
                             f"holds {have or 'no such head'}, the {task_name} head "
                             f"{name or ''} needs {need}")
        target.load_state_dict(weights)
        pooler = ""
        if src_meta.get("pooling") == "cls" and task.uses_pooler:
            if name:
                pooler = "; its pooler is not: the heads share the checkpoint's"
            else:
                model.bert.pooler.load_state_dict(read_pooler(src))
                pooler = ", and the pooler it read from its model.safetensors"
        print(f"init: head {name or '(all)'} from {path}{pooler}", file=sys.stderr)


def build_schedule(cfg, optimizer, total_steps):
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else \
        round(cfg.warmup_ratio * total_steps)
    print(f"schedule: {cfg.schedule}, {warmup} warm-up steps of {total_steps}", file=sys.stderr)
    if cfg.schedule == "plateau":
        return WarmupThenPlateau(optimizer, warmup, mode=cfg.metric_mode,
                                 factor=cfg.plateau_factor, patience=cfg.plateau_patience,
                                 cooldown=cfg.plateau_cooldown, threshold=cfg.plateau_threshold,
                                 min_lr=cfg.plateau_min_lr)
    fn = functools.partial(lr_multiplier, kind=cfg.schedule, warmup_steps=warmup,
                           total_steps=total_steps)
    return LambdaSchedule(optimizer, fn)


def save_task_model(model, tok, task, out_dir):
    """best/: the backbone in Hugging Face layout, the head, and task.json (what predict needs)."""
    save_model(model.bert, out_dir, tok)
    atomic_save_safetensors(os.path.join(out_dir, "head.safetensors"), model.head.state_dict())
    atomic_write_json(os.path.join(out_dir, "task.json"), task.meta)


def load_task_model(best_dir, device):
    task = task_from_file(TASKS, os.path.join(best_dir, "task.json"))
    bert = load_model(best_dir)
    head = task.build_head(bert.config.hidden_size, 0.0)
    path = os.path.join(best_dir, "head.safetensors")
    load_head_state(head, read_safetensors(path), path)
    return TaskModel(bert, head).to(device).eval(), task


def plan_batches(cfg, model, optimizer, train_data, device):
    """Resolve --batch-size auto and --effective-batch-size into micro-batch x accumulation."""
    batch = cfg.batch_size
    if batch == "auto":  # probe with the longest training examples: the worst case
        longest = sorted(range(len(train_data.lengths)), key=lambda i: -train_data.lengths[i])
        batch = auto_batch_size(model, optimizer, lambda n: train_data.collate(longest[:n]),
                                device, limit=len(longest))
    accum = cfg.grad_accum
    if cfg.effective_batch_size is not None:
        # the effective batch is global: batch x accum x processes
        if cfg.effective_batch_size % cfg.nproc:
            raise ValueError(f"--effective-batch-size {cfg.effective_batch_size} does not "
                             f"divide among {cfg.nproc} processes")
        batch, accum = plan_accumulation(cfg.effective_batch_size // cfg.nproc, batch)
    if (batch, accum) == (cfg.batch_size, cfg.grad_accum):
        return cfg
    train_data.batch_size = batch  # the dataset was built with the flag's value
    print(f"batching: micro-batch {batch} x {accum} accumulated x {cfg.nproc} process(es) = "
          f"{batch * accum * cfg.nproc} examples per optimizer step", file=sys.stderr)
    return dataclasses.replace(cfg, batch_size=batch, grad_accum=accum)


def finetune_model(cfg, task, tok, data, resume, dist):
    """`minibert finetune`'s model and training data: the checkpoint with a new head (or heads
    from --init-heads), on the device, trained on the task's own loss."""
    model = build_model(cfg, task)
    check_vocabulary(model.bert.config, tok, cfg.model)
    if cfg.init_heads and not resume:  # on resume the saved state holds the heads
        init_heads(model, cfg.init_heads, task)
    return model.to(dist.device), data["train"]


def run_finetune(cfg: FinetuneConfig, resume=False, dist=None):
    """Fine-tune as `cfg` says; returns results.json's content (None on ranks other than 0).

    `dist` is this process's place in a data-parallel job (train/loop/distributed.py); None:
    one process. The run seeds torch and sets its thread count for its own duration only."""
    return run_in_state(train_task_model, cfg, resume, dist)


def train_task_model(cfg, resume, dist, build=finetune_model, name="finetune"):
    """The body of a run that trains a TaskModel on a task's data: `minibert finetune`, and
    `minibert distill` with another `build`.

    build(cfg, task, tok, data, resume, dist) -> (model, training data): a TaskModel on the
    device whose forward(batch) returns the loss dict (best/ saves its .bert and .head; state/
    all of it), and the dataset the trainer draws batches from. Everything else (freezing,
    optimizer, schedule, trainer, resume, the final test) is this one body."""
    device = dist.device
    if dist.world > 1 and cfg.unfreeze_every is not None:
        raise ValueError("--unfreeze-every changes which parameters train mid-run, which "
                         "DistributedDataParallel cannot follow; use one process")
    if dist.world > 1 and cfg.batch_size == "auto":
        raise ValueError("--batch-size auto could pick a different size on each process; "
                         "give --batch-size N with --nproc")
    if cfg.batch_size == "auto" and cfg.task == "multitask":
        raise ValueError("--batch-size auto probes one task's longest batches; a multi-task "
                         "run mixes tasks: give --batch-size N")
    if cfg.batch_size == "auto" and device.type != "cuda":
        raise SystemExit(f"minibert {name}: --batch-size auto measures GPU memory and needs a "
                         "CUDA device; on CPU give --batch-size N (`minibert memory` estimates "
                         "the memory of a batch)")
    cfg, run, precision, amp = open_run(cfg, dist, resume, f"{name} config")
    for why in unused_flags(cfg):
        print(f"note: {why}; it is ignored", file=sys.stderr)
    positions = BertConfig.from_json(os.path.join(cfg.model, "config.json")).max_position_embeddings
    if cfg.max_length > positions:  # else it trains on short texts, then fails on a long one
        print(f"max length: {positions}, the positions {cfg.model} has, not --max-length "
              f"{cfg.max_length}", file=sys.stderr)
        cfg = dataclasses.replace(cfg, max_length=positions)

    tok = Tokenizer.from_dir(cfg.model)
    task, data = TASKS[cfg.task].from_data(cfg, tok)
    # before any training; here, since a multitask's metric names come with its heads
    check_metric(cfg.metric, task.metrics, cfg.task)
    print(f"task: {json.dumps(task.meta)}", file=sys.stderr)
    model, data["train"] = build(cfg, task, tok, data, resume, dist)

    # Freezing and parameter groups. A frozen parameter has requires_grad=False: no gradient is
    # computed for it and, not being in any param group, it gets no optimizer state.
    n_layers = model.bert.config.num_hidden_layers
    frozen = frozen_units(n_layers, cfg.freeze_embeddings, cfg.freeze_layers, cfg.freeze_backbone)
    policy = LrPolicy(cfg.lr, cfg.lr_head, cfg.layer_lr_decay, cfg.lr_embeddings, cfg.lr_encoder,
                      cfg.weight_decay)
    unfreezer = None
    if cfg.unfreeze_every is not None:
        unfreezer = GradualUnfreezer(model, policy, cfg.unfreeze_every, cfg.unfreeze_unit,
                                     cfg.stage_lrs, frozen, task.uses_pooler)
        trainable = {"head"}
        scale = unfreezer.lr_scale(0)
    else:
        trainable = set(units_top_down(n_layers)) - frozen
        scale = 1.0
    set_trainable(model, trainable, task.uses_pooler)  # mean pooling, tagging, QA: pooler unread
    for head in cfg.freeze_head or []:  # multitask: a head that keeps its weights bit for bit
        task.freeze_head(model.head, head)
    groups = param_groups(model, trainable, policy, scale)
    if not groups:
        raise SystemExit(f"minibert {name}: every parameter is frozen; nothing would train. "
                         "Drop a --freeze-* flag.")
    print_groups(groups, model)
    optimizer = AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                      eps=cfg.adam_eps, weight_decay=cfg.weight_decay, foreach=True)
    cfg = plan_batches(cfg, model, optimizer, data["train"], device)
    if not resume:
        run.write_json("config.json", dataclasses.asdict(cfg))  # resolved: --resume reuses it
    # The order is drawn in global micro-batches, batch x processes; each rank takes its share.
    data["train"].batch_size = cfg.batch_size * dist.world

    settings = LoopSettings(cfg.epochs, cfg.max_steps, cfg.grad_accum, cfg.clip_grad_norm,
                            cfg.eval_every, cfg.log_every, cfg.metric, cfg.metric_mode,
                            cfg.early_stopping_patience, cfg.save_every, autocast=amp)
    _, total = plan_steps(len(data["train"].batches(0)), cfg.grad_accum, cfg.epochs,
                          cfg.max_steps)
    schedule = build_schedule(cfg, optimizer, total)
    # no dev set: the trainer keeps the last checkpoint as best/, and --test scores that one
    evaluate = (lambda m: task.evaluate(m, data["dev"], device)) if "dev" in data else None
    # a multitask batch uses one head: DDP must expect parameters without gradients
    net = dist.wrap(model, find_unused_parameters=cfg.task == "multitask", compile=cfg.compile)
    dist.seed_per_rank(cfg.seed)
    trainer = Trainer(model, optimizer, schedule, data["train"], evaluate, run, settings, device,
                      unfreezer=unfreezer,
                      save_best=lambda d: save_task_model(model, tok, task, d),
                      dist=dist, net=net, scaler=grad_scaler(precision, device), log=sys.stderr)
    if resume:
        trainer.load_state()
    try:
        summary = trainer.fit()
    except (Diverged, OutOfMemory) as e:
        if isinstance(e, OutOfMemory) and not dist.is_main:
            raise  # one rank's own failure, which the others did not share: named by session()
        if isinstance(e, Diverged) and dist.is_main:
            write_diagnosis(run.path)
        raise SystemExit(f"minibert {name}: {e}") from None
    if not dist.is_main:
        return None  # the final evaluation and results.json are rank 0's

    # Final evaluation with the best checkpoint, not the last weights, in fp32: under bf16 the
    # evaluations during training may differ from it in the last digits.
    best_dir = run.find_dir("best")
    results = {"best_step": summary["best_step"], "train_seconds": summary["train_seconds"],
               "examples_per_second": summary["examples_per_second"],
               "precision": precision,  # what --precision resolved to (auto depends on the CPU)
               "checkpoint": "best on dev" if "dev" in data else "last (no dev set)"}
    if best_dir:
        best, _ = load_task_model(best_dir, device)
        which = "best" if "dev" in data else "last"
        for split in ("dev", "test"):
            if split in data:
                m = task.evaluate(best, data[split], device)
                results[split] = {k: v for k, v in m.items()}
                print(f"{split} ({which} checkpoint, step {summary['best_step']}): " + ", ".join(
                    f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float)),
                    file=sys.stderr)
    run.write_json("results.json", results)
    print(f"results: {run.file('results.json')}", file=sys.stderr)
    write_diagnosis(run.path)  # to stderr and RUN/diagnosis.json
    return results


def required_inputs(cfg):
    # multitask reads its data from --tasks/--tasks-file, not --train
    needed = ("model",) if cfg.task == "multitask" else ("model", "train")
    missing = [f for f in needed if getattr(cfg, f) is None]
    if missing:
        raise ValueError(f"--{missing[0]} is required")


def cmd_finetune(args):
    return command(args, "finetune", FinetuneConfig, run_finetune, check=required_inputs)


def add_run_flags(p, config_cls, skip=()):
    """A flag for every field of `config_cls` (a FinetuneConfig), `--batch-size N|auto` and
    `--resume RUN`: the command line of `minibert finetune` and of the commands built on it."""
    add_dataclass_flags(p, config_cls, skip=("batch_size", *skip))
    p.add_argument("--batch-size", dest="batch_size", type=batch_size_arg,
                   default=config_cls.batch_size,
                   help="examples per micro-batch, or 'auto' (CUDA only): the largest that fits "
                        f"in GPU memory, less 10%% (default: {config_cls.batch_size})")
    p.add_argument("--resume", metavar="RUN", default=None,
                   help="continue the killed run in RUN with its saved config and state")


def register(sub):
    p = sub.add_parser("finetune", help="fine-tune a checkpoint on a labelled dataset")
    add_run_flags(p, FinetuneConfig)
    p.set_defaults(func=cmd_finetune)
