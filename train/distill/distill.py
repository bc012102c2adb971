"""`minibert distill`: train a smaller student to imitate a fine-tuned teacher.

Knowledge distillation (Hinton et al. 2015) as DistilBERT applies it (Sanh et al. 2019): the
student learns from the gold labels and from the teacher's softened outputs together,
alpha * hard + (1 - alpha) * T^2 * KL, optionally with TinyBERT's hidden-state loss and MiniLM's
attention loss (train/distill/loss.py has the formulas). It is task-specific distillation: the
teacher is a `minibert finetune` run, and the student is trained on the task's data.

Everything but the model and its loss is fine-tuning's own code: `train_task_model`
(train/finetune/finetune.py) runs with `build_distillation` as its `build`, so the run
directory, the flags, freezing, learning rates, early stopping, resume after kill -9, the
diagnosis, results.json and best/ are those of `minibert finetune`, and `minibert predict RUN`
and `minibert export RUN` read a distilled run unchanged.

Reads top to bottom: the teacher -> the student (train/distill/student.py) -> the loss around it
(train/distill/model.py) -> where the teacher's outputs come from: cached once before training
(train/distill/teacher.py), or the teacher beside the student at every step when its hidden
states or attention are needed.

Limits: classification, regression and tagging teachers (QA and multi-task are refused); the
training data must give the teacher's labels (and, for regression, its target standardisation);
the hidden-state and attention losses need the teacher's tokenizer and, for attention, as many
heads in the last layer; no unlabelled data (every example also has its hard loss).
"""

import os
import sys
import time

from minibert.checkpoint import check_vocabulary
from minibert.errors import UserError
from minibert.tokenizer import Tokenizer
from train.distill.config import NOT_FOR_DISTILL, DistillConfig, teacher_best
from train.distill.model import DistillModel
from train.distill.student import build_student
from train.distill.teacher import (CACHE, CachedTargets, load_targets, retokenized,
                                   save_targets, teacher_pass)
from train.finetune.finetune import add_run_flags, load_task_model, train_task_model
from train.loop.launch import command, run_in_state


def check_same_task(task, teacher_task, cfg):
    """The student's task, built from --train, must be the teacher's: the same labels in the
    same order (the teacher's logits index them), the same standardisation of targets."""
    want, have = teacher_task.meta, task.meta
    differ = [k for k in want if have.get(k) != want[k]]
    if differ:
        k = differ[0]
        raise UserError(f"--train {cfg.train}: gives {k} {have.get(k)!r}, the teacher's is "
                        f"{want[k]!r}; distil on data with the teacher's labels")


def check_on_the_fly(cfg, student, teacher, same_tokens):
    """What the hidden-state and attention losses need: the same tokens, the same heads."""
    which = "--attention-kl" if cfg.attention_kl else "--hidden-mse"
    if not same_tokens:
        raise UserError(f"{which} compares the two models token by token, but the student "
                        f"{cfg.student} has a tokenizer of its own; use the teacher's")
    if cfg.attention_kl:
        nh_s, nh_t = student.bert.blocks[-1].attn.nh, teacher.bert.blocks[-1].attn.nh
        if nh_s != nh_t:
            raise UserError(f"--attention-kl {cfg.attention_kl}: the student's last layer has "
                            f"{nh_s} heads, the teacher's {nh_t}; the attention loss compares "
                            "head by head (give a student with as many heads, or 0)")
        if cfg.attention == "triton-varlen":
            raise UserError("--attention-kl reads the last block's attention on padded rows; "
                            "--attention triton-varlen packs them: use sdpa")


def cached_targets(cfg, teacher, train, teacher_tok, resume, dist):
    """The teacher's soft targets on the training set: read back on --resume, else computed in
    one pass (and saved by rank 0)."""
    path = os.path.join(cfg.out, CACHE)
    n = len(train.lengths)
    if resume and os.path.exists(path):
        print(f"teacher: soft targets of {n} training examples read from {path}",
              file=sys.stderr)
        return load_targets(path, n)
    t0 = time.time()
    cache = teacher_pass(teacher, cfg.task,
                         retokenized(train, teacher_tok, cfg.max_length, cfg.eval_batch_size),
                         dist.device)
    if dist.is_main:
        save_targets(path, cache, cfg.teacher)
    print(f"teacher: soft targets of {n} training examples computed in one pass "
          f"({time.time() - t0:.2f} s) and cached in {path}; each batch reads its rows",
          file=sys.stderr)
    return cache


def build_distillation(cfg, task, tok, data, resume, dist):
    """train_task_model's `build` for distillation: the student inside its distillation loss,
    and the training data (with the teacher's soft targets, when they are cached)."""
    best = teacher_best(cfg.teacher)
    teacher, teacher_task = load_task_model(best, dist.device)  # eval mode: no dropout
    check_same_task(task, teacher_task, cfg)
    teacher_tok = Tokenizer.from_dir(best)
    student = build_student(cfg, task, teacher, teacher_tok)
    check_vocabulary(student.bert.config, tok, cfg.model)
    n_s = sum(p.numel() for p in student.parameters())
    n_t = sum(p.numel() for p in teacher.parameters())
    print(f"distill: student {n_s:,} parameters, teacher {n_t:,} ({n_s / n_t:.0%}); loss "
          f"{cfg.alpha} * hard + {1 - cfg.alpha:g} * soft (T = {cfg.temperature})"
          + (f" + {cfg.hidden_mse} * hidden MSE" if cfg.hidden_mse else "")
          + (f" + {cfg.attention_kl} * attention KL" if cfg.attention_kl else ""),
          file=sys.stderr)
    if cfg.teacher_on_the_fly:
        check_on_the_fly(cfg, student, teacher, tok.tok.to_str() == teacher_tok.tok.to_str())
        print("teacher: runs beside the student at every step (the hidden-state and attention "
              "losses read its insides, which no cache of its outputs holds)", file=sys.stderr)
    model = DistillModel(student.bert, student.head, cfg.task, cfg.alpha, cfg.temperature,
                         teacher if cfg.teacher_on_the_fly else None, cfg.hidden_mse,
                         cfg.attention_kl).to(dist.device)
    if cfg.teacher_on_the_fly:
        return model, data["train"]
    cache = cached_targets(cfg, teacher, data["train"], teacher_tok, resume, dist)
    return model, CachedTargets(data["train"], cfg.task, cache)


def run_distill(cfg: DistillConfig, resume=False, dist=None):
    """Distil as `cfg` says; returns results.json's content (None on ranks other than 0)."""
    def body(cfg, resume, dist):
        return train_task_model(cfg, resume, dist, build=build_distillation, name="distill")
    return run_in_state(body, cfg, resume, dist)


def required_inputs(cfg):
    if cfg.train is None:
        raise UserError("--train is required")


def cmd_distill(args):
    return command(args, "distill", DistillConfig, run_distill, check=required_inputs)


def register(sub):
    p = sub.add_parser("distill", help="train a smaller student to imitate a fine-tuned teacher")
    add_run_flags(p, DistillConfig, skip=NOT_FOR_DISTILL)
    p.set_defaults(func=cmd_distill)
