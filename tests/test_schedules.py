"""train/loop/schedules.py against transformers' schedules and torch's ReduceLROnPlateau.

The schedules compute the same float operations as the references, so the lrs are compared for
exact equality: any difference is a different formula, not rounding.
"""

import functools
import io
import json
import random

import pytest
import torch
from transformers import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                          get_cosine_with_min_lr_schedule_with_warmup,
                          get_linear_schedule_with_warmup)

from train.loop.schedules import LambdaSchedule, ReduceLROnPlateau, WarmupThenPlateau, lr_multiplier

BASE_LRS = [1e-3, 5e-4, 2e-4]   # one group per layer, as with layer-wise lr decay


def make_optimizer(lrs=BASE_LRS):
    return torch.optim.SGD([dict(params=[torch.nn.Parameter(torch.zeros(2))], lr=lr, name=f"g{i}")
                            for i, lr in enumerate(lrs)])


def lrs(opt):
    return [g["lr"] for g in opt.param_groups]


def through_bytes(state_dict):
    """What a resumed run gets back: torch.save, then torch.load(weights_only=True)."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ----------------------------------------------------------------------------------------------
# schedules that are functions of the step

CASES = [  # (kind, warmup, total, min_ratio, the transformers reference for it)
    ("linear", 10, 100, 0.0, lambda o: get_linear_schedule_with_warmup(o, 10, 100)),
    ("linear", 0, 37, 0.0, lambda o: get_linear_schedule_with_warmup(o, 0, 37)),
    ("cosine", 10, 100, 0.0, lambda o: get_cosine_schedule_with_warmup(o, 10, 100)),
    ("cosine", 7, 61, 0.1,
     lambda o: get_cosine_with_min_lr_schedule_with_warmup(o, 7, 61, min_lr_rate=0.1)),
    ("constant", 10, 100, 0.0, lambda o: get_constant_schedule_with_warmup(o, 10)),
    ("constant", 0, 20, 0.0, lambda o: get_constant_schedule_with_warmup(o, 0)),
]


@pytest.mark.parametrize("kind,warmup,total,min_ratio,reference", CASES)
def test_lambda_schedule_matches_transformers(kind, warmup, total, min_ratio, reference):
    """Every group's lr at every step of a run, with a resume from a state_dict halfway."""
    fn = functools.partial(lr_multiplier, kind=kind, warmup_steps=warmup, total_steps=total,
                           min_ratio=min_ratio)
    ref_opt, opt = make_optimizer(), make_optimizer()
    ref, ours = reference(ref_opt), LambdaSchedule(opt, fn)
    for step in range(total + 1):
        if step == total // 2:
            saved_opt, saved = through_bytes(opt.state_dict()), through_bytes(ours.state_dict())
            opt = make_optimizer([9.0] * 3)  # wrong lrs on purpose: the loaded state must win
            ours = LambdaSchedule(opt, fn)
            opt.load_state_dict(saved_opt)
            ours.load_state_dict(saved)
        assert fn(step) == ref.lr_lambdas[0](step), step
        assert lrs(opt) == lrs(ref_opt), step
        ref_opt.step()
        opt.step()
        ref.step()
        ours.step()
    # the run went somewhere: warm-up started at 0 and the decay (if any) reached its floor
    assert fn(0) == (0.0 if warmup else 1.0)
    assert fn(total) == {"linear": 0.0, "cosine": min_ratio, "constant": 1.0}[kind]


def test_lambda_schedule_group_added_later_and_errors():
    fn = functools.partial(lr_multiplier, kind="linear", warmup_steps=4, total_steps=20)
    opt = make_optimizer()
    sched = LambdaSchedule(opt, fn)
    for _ in range(6):
        sched.step()
    sched.add_param_group(dict(params=[torch.nn.Parameter(torch.zeros(2))], lr=3e-3, name="new"))
    new = opt.param_groups[-1]
    assert new["initial_lr"] == 3e-3 and new["lr"] == 3e-3 * fn(6) and new["name"] == "new"
    sched.step()
    assert lrs(opt) == [base * fn(7) for base in BASE_LRS + [3e-3]]
    # a group that bypassed the schedule would train at an unscheduled lr: refused
    opt.add_param_group(dict(params=[torch.nn.Parameter(torch.zeros(2))], lr=1.0))
    with pytest.raises(RuntimeError, match="initial_lr"):
        sched.step()
    with pytest.raises(ValueError, match="unknown schedule kind"):
        lr_multiplier(0, kind="step", warmup_steps=0, total_steps=10)


# ----------------------------------------------------------------------------------------------
# ReduceLROnPlateau against torch's

PLATEAU_CASES = [  # (constructor arguments, group lrs)
    (dict(factor=0.5, patience=2, threshold=0.02), BASE_LRS),
    (dict(mode="max", threshold_mode="abs", threshold=0.05, patience=1, cooldown=2), BASE_LRS),
    (dict(threshold_mode="abs", threshold=0.02, patience=0, cooldown=3, factor=0.3), BASE_LRS),
    (dict(mode="max", factor=0.2, patience=1, threshold=0.03, min_lr=1e-4), BASE_LRS),
    (dict(factor=0.5, patience=0, min_lr=[4e-4, 1e-4, 1e-5]), BASE_LRS),
    # group 1's cut, 7.5e-9, is below eps: skipped, while group 0 is cut
    (dict(factor=0.5, patience=1, eps=1e-8), [1e-2, 1.5e-8]),
]


def metric_walk(seed, n=60):
    """A noisy metric that improves for a while, then flattens: improvements, plateaus and cuts."""
    rng = random.Random(seed)
    value, out = 1.0, []
    for i in range(n):
        value += rng.gauss(-0.02 if i < n // 3 else 0.0, 0.03)
        out.append(value)
    return out


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("args,group_lrs", PLATEAU_CASES)
def test_plateau_matches_torch(args, group_lrs, seed):
    ref_opt, opt = make_optimizer(group_lrs), make_optimizer(group_lrs)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(ref_opt, **args)
    ours = ReduceLROnPlateau(opt, **args)
    metrics = metric_walk(seed)
    for i, metric in enumerate(metrics):
        if i == len(metrics) // 2:  # resume: a fresh optimizer and default-argument scheduler
            saved_opt, saved = through_bytes(opt.state_dict()), through_bytes(ours.state_dict())
            opt = make_optimizer(group_lrs)
            ours = ReduceLROnPlateau(opt)
            opt.load_state_dict(saved_opt)
            ours.load_state_dict(saved)
        ref.step(metric)
        # a 0-dim tensor is a metric too (float64, so that it is the same number)
        ours.step(torch.tensor(metric, dtype=torch.float64) if i % 2 else metric)
        assert lrs(opt) == lrs(ref_opt), i
        assert ours.get_last_lr() == ref.get_last_lr()
        assert (ours.best, ours.num_bad_epochs, ours.cooldown_counter) == (
            ref.best, ref.num_bad_epochs, ref.cooldown_counter), i
    assert lrs(opt)[0] < group_lrs[0]  # some cut happened, or the comparison was vacuous
    if "eps" in args:
        assert lrs(opt)[1] == group_lrs[1]


@pytest.mark.parametrize("min_lr", [1e-5, [1e-5] * 3])
def test_plateau_group_added_later_like_torch(min_lr):
    """A scalar min_lr covers a new group; a per-group list cannot, and both say so."""
    ref_opt, opt = make_optimizer(), make_optimizer()
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(ref_opt, patience=0, min_lr=min_lr)
    ours = ReduceLROnPlateau(opt, patience=0, min_lr=min_lr)
    for o in (ref_opt, opt):
        o.add_param_group(dict(params=[torch.nn.Parameter(torch.zeros(2))], lr=1e-3))
    for sched in (ref, ours):
        sched.step(1.0)
        if isinstance(min_lr, list):
            with pytest.raises(RuntimeError):
                sched.step(2.0)
        else:
            sched.step(2.0)
    assert lrs(opt) == lrs(ref_opt)


@pytest.mark.parametrize("bad", [dict(factor=1.0), dict(factor=2.0), dict(mode="mean"),
                                 dict(threshold_mode="relative"), dict(min_lr=[0.0, 0.0])])
def test_plateau_bad_arguments_raise_like_torch(bad):
    with pytest.raises(ValueError):
        torch.optim.lr_scheduler.ReduceLROnPlateau(make_optimizer(), **bad)
    with pytest.raises(ValueError):
        ReduceLROnPlateau(make_optimizer(), **bad)


def test_plateau_needs_an_optimizer():
    with pytest.raises(TypeError):
        torch.optim.lr_scheduler.ReduceLROnPlateau(object())
    with pytest.raises(TypeError):
        ReduceLROnPlateau(object())


# ----------------------------------------------------------------------------------------------
# warm-up, then plateau

WARMUP, EVAL_EVERY, TOTAL = 20, 5, 150


@pytest.mark.parametrize("resume_at", [12, 80])
def test_warmup_then_plateau(resume_at):
    """The reference: transformers' constant schedule with warm-up for the ramp, stepped until it
    reaches the base lr, then torch's ReduceLROnPlateau fed only the evaluations from the end of
    warm-up on."""
    args = dict(factor=0.5, patience=1, cooldown=1)
    ref_opt, opt = make_optimizer(), make_optimizer()
    ref_ramp = get_constant_schedule_with_warmup(ref_opt, WARMUP)
    ref_plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(ref_opt, **args)
    ours = WarmupThenPlateau(opt, WARMUP, **args)
    # rising (bad) during warm-up: counted, they would cut the lr twice before it got to base
    metrics = [1.0 + 0.1 * i for i in range(WARMUP // EVAL_EVERY)] + metric_walk(3)
    seen = []
    for step in range(TOTAL):
        if step == resume_at:
            saved_opt, saved = through_bytes(opt.state_dict()), through_bytes(ours.state_dict())
            # the optimizer first: then building the scheduler resets the lrs to the ramp's
            # start, and only the scheduler's state can put back the plateau's cuts
            opt = make_optimizer()
            opt.load_state_dict(saved_opt)
            ours = WarmupThenPlateau(opt, WARMUP, **args)
            ours.load_state_dict(saved)
        assert lrs(opt) == lrs(ref_opt), step
        ref_opt.step()
        opt.step()
        ours.step()
        if step < WARMUP:  # after WARMUP steps the ramp's factor is 1 and it is done
            ref_ramp.step()
        if (step + 1) % EVAL_EVERY == 0:
            metric = metrics[(step + 1) // EVAL_EVERY - 1]
            seen.append(ours.evaluate(metric))
            if step + 1 >= WARMUP:
                ref_plateau.step(metric)
    assert lrs(opt) == lrs(ref_opt)
    assert seen[:3] == [False] * 3 and all(seen[3:])   # evaluations at steps 5, 10, 15 ignored
    assert lrs(opt)[0] < BASE_LRS[0]                    # and the plateau did cut afterwards


@pytest.mark.parametrize("mode", ["min", "max"])
def test_plateau_state_before_any_evaluation_goes_through_json(mode):
    # resume state is JSON (train/loop/state.py), which has no infinity: a state saved before the
    # plateau's first evaluation must come back as the same scheduler, not with best = None
    args = dict(mode=mode, factor=0.5, patience=0)
    ref_opt, opt = make_optimizer(), make_optimizer()
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(ref_opt, **args)
    saved = json.loads(json.dumps(WarmupThenPlateau(opt, 4, **args).state_dict(),
                                  allow_nan=False))
    ours = WarmupThenPlateau(opt, 4, **args)
    ours.load_state_dict(saved)
    for step in range(12):
        opt.step()
        ours.step()
        if step >= 4:
            metric = [1.0, 2.0, 0.5][step % 3]
            ref.step(metric)
            ours.evaluate(metric)
            assert lrs(opt) == lrs(ref_opt), step


def test_warmup_then_plateau_group_added_during_warmup():
    opt = make_optimizer()
    sched = WarmupThenPlateau(opt, 10, patience=0)
    for _ in range(4):
        sched.step()
    sched.add_param_group(dict(params=[torch.nn.Parameter(torch.zeros(2))], lr=1e-2))
    assert opt.param_groups[-1]["lr"] == 1e-2 * (4 / 10)
    for _ in range(6):
        sched.step()
    assert lrs(opt) == BASE_LRS + [1e-2]   # all at their base lr at the end of warm-up
    assert sched.evaluate(1.0) and sched.evaluate(2.0)
    assert lrs(opt) == [lr * 0.1 for lr in BASE_LRS + [1e-2]]


# ----------------------------------------------------------------------------------------------
# --schedule plateau in a real fine-tuning run, in the metric's own direction


@pytest.mark.parametrize("metric,mode", [("accuracy", "max"), ("loss", "min")])
def test_plateau_in_a_finetuning_run_follows_torch(tmp_path, metric, mode):
    """Replays the run's logged dev values through torch's ReduceLROnPlateau, in `mode`: every
    eval's logged lrs must be the reference's, and the other mode must have given other lrs."""
    from tests.tiny import make_checkpoint, make_sentiment
    from train.finetune.config import FinetuneConfig
    from train.finetune.finetune import run_finetune
    from train.loop.rundir import read_jsonl

    make_checkpoint(tmp_path / "ckpt")
    data = make_sentiment(tmp_path / "data")
    cfg = FinetuneConfig(model=str(tmp_path / "ckpt"), train=f"{data}/train.jsonl",
                         dev=f"{data}/dev.jsonl", out=str(tmp_path / "r"), batch_size=8,
                         epochs=4, eval_every=2, log_every=1, threads=1, lr=3e-3, lr_head=3e-3,
                         schedule="plateau", metric=metric, warmup_steps=0, plateau_patience=1,
                         plateau_factor=0.5, plateau_threshold=0.05)  # 5%: cuts in both modes
    assert cfg.metric_mode == mode
    run_finetune(cfg)
    events = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    base = next(e for e in events if e["event"] == "train")["lr"]  # step 1: no eval yet
    evals = [e for e in events if e["event"] == "eval"]
    assert len(evals) == 16

    def replay(mode):
        names = list(base)
        opt = torch.optim.SGD([dict(params=[torch.nn.Parameter(torch.zeros(1))], lr=base[n])
                               for n in names])
        ref = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode=mode, factor=cfg.plateau_factor, patience=cfg.plateau_patience,
            threshold=cfg.plateau_threshold, cooldown=cfg.plateau_cooldown,
            min_lr=cfg.plateau_min_lr)
        out = []
        for e in evals:
            ref.step(e["dev"][metric])
            out.append(dict(zip(names, lrs(opt))))
        return out

    want = replay(mode)
    assert [e["lr"] for e in evals] == want
    assert want[-1]["head"] < base["head"]  # the plateau did cut
    assert replay("min" if mode == "max" else "max") != want  # the mode made a difference
