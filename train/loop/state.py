"""RUN/state/: what an exact resume needs, saved at every evaluation (and every --save-every).

    state/model.safetensors   the weights (each tied tensor stored once)
    state/optimizer.pt        AdamW's state_dict: plain tensors, read with weights_only=True
    state/rng.pt              torch's generators (every rank's, in a data-parallel job)
    state/trainer.json        step, epoch, position in the epoch, best so far, whether early
                              stopping said stop, schedule, scaler, and how many metrics.jsonl
                              events had been written

The directory is replaced whole (RunDir.save_dir), so a kill leaves the previous state intact.
A resumed run continues bit for bit on one process: the data order is a pure function of
(seed, epoch), the position is the micro-batch index, and the generators continue where they
were. With another process count, weights and data order continue exactly, and dropout draws
afresh (N ranks' generators cannot be dealt to M ranks).
"""

import os

import torch

from minibert.checkpoint import read_safetensors
from minibert.errors import UserError
from minibert.io import atomic_save_safetensors, atomic_torch_save, atomic_write_json, load_json


def _unique_tensors(model):
    """The state_dict with tied weights once: safetensors wants each storage a single time."""
    seen, unique = set(), {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.shape)
        if key not in seen:
            seen.add(key)
            unique[k] = v
    return unique


def save(t):
    """Write trainer `t`'s state into RUN/state/ (rank 0 writes every rank's generators)."""
    rng = {"torch": torch.get_rng_state()}
    if t.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(t.device)
    ranks = t.dist.all_gather(rng)

    def write(d):
        atomic_save_safetensors(os.path.join(d, "model.safetensors"), _unique_tensors(t.model))
        atomic_torch_save(os.path.join(d, "optimizer.pt"), t.opt.state_dict())
        # one process: the format it always had; N: rank 0's on top, every rank's in "ranks"
        atomic_torch_save(os.path.join(d, "rng.pt"),
                          rng if t.dist.world == 1 else {**rng, "ranks": ranks})
        info = {"step": t.step, "epoch": t.epoch, "micro": t.micro,
                "best": t.best, "best_step": t.best_step, "bad_evals": t.bad_evals,
                "stopped": t.stopped,
                "seconds": t.seconds, "examples_seen": t.examples_seen,
                "n_events": len(t.run.events), "schedule": t.schedule.state_dict(),
                "world": t.dist.world}
        if t.scaler is not None:
            info["scaler"] = t.scaler.state_dict()
        atomic_write_json(os.path.join(d, "trainer.json"), info)
    t.run.save_dir("state", write)


# what trainer.json must hold (the scaler's state too, in an fp16 run)
KEYS = ("step", "epoch", "micro", "best", "best_step", "bad_evals", "seconds", "examples_seen",
        "n_events", "schedule")


def load(t):
    """Restore trainer `t` from RUN/state/ (or state.old/, left by a kill between renames)."""
    d = t.run.find_dir("state")
    if d is None:
        raise UserError(f"{t.run.path}: no state/ to resume from (the run was killed before "
                        "its first save: start it again without --resume)")
    try:
        info = load_json(os.path.join(d, "trainer.json"))
        opt_state = torch.load(os.path.join(d, "optimizer.pt"), weights_only=True)
        rng = torch.load(os.path.join(d, "rng.pt"), weights_only=True)
        model_state = read_safetensors(os.path.join(d, "model.safetensors"))
        missing = [k for k in KEYS if k not in info]
        if missing:
            raise KeyError(f"trainer.json lacks {missing[0]!r}")
    except Exception as e:  # noqa: BLE001 (whatever a damaged file raises, it is damaged)
        why = (str(e).splitlines() or [""])[0][:160]
        raise UserError(f"{d}: damaged resume state ({type(e).__name__}: {why}); resume from a "
                        "copy, or start the run again") from None
    t.step, t.epoch, t.micro = info["step"], info["epoch"], info["micro"]
    t.best, t.best_step, t.bad_evals = info["best"], info["best_step"], info["bad_evals"]
    t.seconds, t.examples_seen = info["seconds"], info["examples_seen"]
    t.stopped = info.get("stopped", False)  # absent from states saved before it was kept
    # save() stores each tied tensor once; the other names of it are the only keys allowed to be
    # missing, and nothing may be unexpected
    own = t.model.state_dict()
    shapes = [k for k, v in model_state.items() if k in own and own[k].shape != v.shape]
    if shapes:
        raise UserError(f"{d}/model.safetensors: {shapes[0]} has shape "
                        f"{tuple(model_state[shapes[0]].shape)}, the model's is "
                        f"{tuple(own[shapes[0]].shape)}: this state belongs to another model")
    result = t.model.load_state_dict(model_state, strict=False)
    stored = {own[k].data_ptr() for k in own if k not in result.missing_keys}
    lost = [k for k in result.missing_keys if own[k].data_ptr() not in stored]
    if lost or result.unexpected_keys:
        raise UserError(f"{d}/model.safetensors does not fit the model: missing {lost}, "
                        f"unexpected {result.unexpected_keys}: this state belongs to another "
                        "model")
    # the param groups of the saved unfreezing stage first, then their state, then the schedule
    # (which checks that it sees the groups it saved)
    t._update_stage()
    try:
        t.opt.load_state_dict(opt_state)
    except ValueError as e:
        raise UserError(f"{d}/optimizer.pt does not fit this run's parameter groups ({e}): was "
                        "the state saved by another version or configuration?") from None
    t.schedule.load_state_dict(info["schedule"])
    if t.scaler is not None:
        t.scaler.load_state_dict(info["scaler"])
    ranks = rng["ranks"] if "ranks" in rng else [rng]  # a one-process state has no "ranks"
    if len(ranks) == t.dist.world:
        mine = ranks[t.dist.rank]
        torch.set_rng_state(mine["torch"])
        if "cuda" in mine:
            torch.cuda.set_rng_state(mine["cuda"], t.device)
    else:
        # data order and weights continue exactly; dropout draws afresh, distinct per rank and
        # a function of seed and step
        torch.manual_seed(torch.initial_seed() * 1_000_003 + 7919 * t.step + t.dist.rank)
        t._say(f"resume: state saved by {len(ranks)} process(es), now {t.dist.world}: data "
               "order and weights continue exactly; dropout masks are drawn afresh")
    t.run.load_events(info["n_events"])
