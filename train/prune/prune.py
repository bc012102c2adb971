"""`minibert prune RUN --heads F --ffn F --out DIR [--finetune-steps N]`: a smaller model.

Reads top to bottom: the run's best/ model and its data (from RUN/config.json) -> importance of
every head and FFN neuron on training examples (importance.py, Michel et al. 2019) -> the
fraction F of each with the lowest scores removed physically (surgery.py) -> dev and test
scored before and after -> DIR/pruned/ -> optionally a short fine-tune of the pruned model,
which is an ordinary `minibert finetune` run in DIR/finetune/ (resume it with
`minibert finetune --resume DIR/finetune` if it is killed).

The scores come from the training set, never from dev or test, which judge the result.
DIR/results.json holds the scores before and after, the sizes, and which heads and how many
neurons each layer lost; DIR/pruned/ and DIR/finetune/best/ serve `minibert predict` and
`minibert export` like any fine-tuned model.

Limits: structured pruning only (whole heads, whole neurons), so the matrices really shrink;
every layer keeps at least one head and one neuron. A distilled run (`minibert distill`) is pruned
like any other, but its short fine-tune learns from the gold labels alone, without the teacher.
"""

import dataclasses
import os
import sys
import time
from dataclasses import dataclass

from minibert.commands import add_model_argument, resolve_model
from minibert.errors import UserError
from minibert.io import load_json
from minibert.tokenizer import Tokenizer
from train.command import add_dataclass_flags, dataclass_from_args, option, print_config
from train.finetune.config import FinetuneConfig
from train.finetune.finetune import TASKS, load_task_model, run_finetune, save_task_model
from train.finetune.predict import find_best
from train.loop.device import pick_device, run_state
from train.loop.launch import read_run_config, saved_config
from train.loop.rundir import RunDir, check_fresh, check_not_a_model, exclusive
from train.prune.importance import importance, least_important
from train.prune.surgery import pruned, size_report
from train.tasks.task import TaskModel


@dataclass
class PruneConfig:
    model: str = option(None, "a finetune run directory: its best/ is pruned, its data reused")
    out: str = option("runs/pruned", "directory to write")
    heads: float = option(0.0, "fraction of all attention heads to remove (0..1); every layer "
                          "keeps at least one, so the most removed is all but one a layer")
    ffn: float = option(0.0, "fraction of all FFN neurons to remove (0..1); every layer keeps at "
                        "least one")
    importance_examples: int = option(2048, "training examples that score the heads and "
                                            "neurons (Michel et al. use a few thousand)")
    finetune_steps: int = option(0, "then fine-tune the pruned model this many steps with the "
                                    "run's own recipe (0: no fine-tuning)")
    seed: int = option(42, "seeds the fine-tune")
    device: str = option("auto", "cpu, cuda, or auto")
    threads: int | None = option(None, "CPU threads for torch (default: torch's choice)")

    def __post_init__(self):
        for name in ("heads", "ffn"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"--{name} {getattr(self, name)}: give a fraction in [0, 1)")
        if self.importance_examples < 1 or self.finetune_steps < 0:
            raise UserError("--importance-examples must be >= 1 and --finetune-steps >= 0")


def score_batches(dataset, n, device):
    """The first n training examples in the run's first-epoch order, as batches on `device`."""
    left = n
    for idx in dataset.batches(0):
        if left <= 0:
            return
        idx = idx[:left]
        left -= len(idx)
        yield {k: v.to(device) for k, v in dataset.collate(idx).items()}


def evaluate(task, model, data, device):
    """Dev and test scores. The unpruned model is scored here too, not read from RUN's
    results.json: both sides then come from the same process, data and precision (fp32)."""
    return {split: task.evaluate(model, data[split], device)
            for split in ("dev", "test") if split in data}


def scores(metrics):
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


def run_prune(cfg: PruneConfig):
    device = pick_device(cfg.device)
    check_not_a_model(cfg.out)  # before the lock file is made there
    with exclusive(cfg.out), run_state(cfg.seed, cfg.threads, device):
        tuned = os.path.join(cfg.out, "finetune")
        if RunDir(tuned, writer=False).find_dir("state") and not os.path.exists(
                os.path.join(tuned, "results.json")):  # this DIR's own fine-tune, stopped
            raise UserError(f"{tuned}: the fine-tune of an earlier prune into {cfg.out}, "
                            f"stopped; continue it with `minibert finetune --resume {tuned}`, "
                            "or give another --out")
        check_fresh(cfg.out, resumable=False)  # prune itself has no --resume
        if cfg.finetune_steps:  # before any work or write, not when the fine-tune starts
            check_fresh(os.path.join(cfg.out, "finetune"))
        return _prune(cfg, device)


def finetune_recipe(run):
    """RUN's FinetuneConfig. A distilled run saved a DistillConfig, the fine-tuning fields plus
    the teacher's: those are left out, as the fine-tune after pruning has no teacher."""
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    done = os.path.join(run, "results.json")
    if not os.path.exists(os.path.join(run, "config.json")) and os.path.isdir(
            os.path.join(run, "pruned")) and os.path.exists(done):
        raise UserError(f"{run}: a `minibert prune` output, which has no data of its own to "
                        f"score on: prune {load_json(done).get('run', 'its run')} again, with "
                        f"larger fractions, or prune {os.path.join(run, 'finetune')} (a prune "
                        "with --finetune-steps)")
    config = read_run_config(run)
    if "train" not in config:  # a checkpoint's config.json: the model's, not a run's
        raise UserError(f"{run}: a checkpoint, not a run directory: give the finetune run whose "
                        "best/ it is, which names the data to score on (a pruned model is "
                        "pruned again through its DIR/finetune run)")
    return saved_config(FinetuneConfig, {k: v for k, v in config.items() if k in names}, run,
                        "finetune")


def _prune(cfg, device):
    run_cfg = finetune_recipe(cfg.model)
    best = find_best(cfg.model, "prune")
    model, task = load_task_model(best, device)
    tok = Tokenizer.from_dir(best)
    _, data = TASKS[task.meta["task"]].from_data(run_cfg, tok)  # the run's own files
    before = size_report(model.bert)
    print(f"prune: {best}: {before['heads']} heads, {before['neurons']} FFN neurons, "
          f"{before['parameters'] / 1e6:.2f}M encoder parameters", file=sys.stderr)

    t0 = time.perf_counter()
    head_scores, ffn_scores = importance(
        model, score_batches(data["train"], cfg.importance_examples, device))
    n_scored = min(cfg.importance_examples, len(data["train"].lengths))
    print(f"importance: {n_scored} training examples in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    heads = least_important(head_scores, cfg.heads) if cfg.heads else {}
    neurons = least_important(ffn_scores, cfg.ffn) if cfg.ffn else {}
    small = TaskModel(pruned(model.bert, heads, neurons), model.head).eval()
    after = size_report(small.bert)
    print(f"prune: removed {before['heads'] - after['heads']} heads, "
          f"{before['neurons'] - after['neurons']} neurons: {after['parameters'] / 1e6:.2f}M "
          f"encoder parameters ({after['parameters'] / before['parameters']:.0%})",
          file=sys.stderr)
    for unit, flag, asked in (("heads", "--heads", cfg.heads), ("neurons", "--ffn", cfg.ffn)):
        removed = before[unit] - after[unit]
        if removed < round(asked * before[unit]):  # each layer keeps one (least_important)
            print(f"prune: {flag} {asked:g} asks for "
                  f"{round(asked * before[unit])} of {before[unit]} {unit}; {removed} removed, "
                  "as every layer keeps at least one", file=sys.stderr)

    results = {"run": cfg.model, "heads": cfg.heads, "ffn": cfg.ffn,
               "importance_examples": n_scored,
               "size_before": before, "size_after": after,
               "pruned_heads": small.bert.config.pruned_heads,
               "neurons_removed": {i: len(js) for i, js in neurons.items()},
               "before": evaluate(task, model, data, device),
               "pruned": evaluate(task, small, data, device)}
    out = RunDir(cfg.out)
    pruned_dir = out.file("pruned")
    if cfg.finetune_steps:  # built (and checked) before anything is written
        # init "pretrained": the backbone is the pruned one, whatever the run started from (an
        # --init random run would otherwise refuse the trained head of --init-heads)
        ft = dataclasses.replace(
            run_cfg, model=pruned_dir, init="pretrained", init_heads=[pruned_dir],
            out=out.file("finetune"), max_steps=cfg.finetune_steps, seed=cfg.seed,
            device=cfg.device, threads=cfg.threads,
            eval_every=min(run_cfg.eval_every or cfg.finetune_steps, cfg.finetune_steps), nproc=1)
    out.save_dir("pruned", lambda d: save_task_model(small, tok, task, d))
    for split, m in results["pruned"].items():
        print(f"{split}: before " + scores(results["before"][split]) + "; pruned " + scores(m),
              file=sys.stderr)
    results["model"] = pruned_dir
    # written now too: a fine-tune killed below leaves DIR serving pruned/, its scores kept, and
    # `finetune --resume DIR/finetune` finishes it (DIR then serves finetune/best/)
    out.write_json("results.json", results)

    if cfg.finetune_steps:
        print(f"fine-tune: {cfg.finetune_steps} steps with the run's recipe -> {ft.out}",
              file=sys.stderr)
        tuned = run_finetune(ft)
        results["finetuned"] = {s: tuned[s] for s in ("dev", "test") if s in tuned}
        results["model"] = os.path.join(ft.out, "best")
    out.write_json("results.json", results)
    print(f"results: {out.file('results.json')}; model: {results['model']}", file=sys.stderr)
    return results


def cmd_prune(args):
    resolve_model(args, "prune")
    cfg = dataclass_from_args(PruneConfig, args)
    print_config(cfg, "prune config")
    run_prune(cfg)
    return 0


def register(sub):
    p = sub.add_parser("prune", help="remove the least important heads and FFN neurons of a "
                                     "fine-tuned run")
    add_model_argument(p, "finetune run directory: its best/ is pruned, its data reused")
    add_dataclass_flags(p, PruneConfig, skip=("model",))
    p.set_defaults(func=cmd_prune)
