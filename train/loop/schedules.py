"""Learning-rate schedules: warm-up then linear, cosine or constant; and reduce-on-plateau.

Two kinds of schedule, because they answer different questions:
- A function of the step alone (`lr_multiplier`): the lr of a run whose length is known in
  advance, as in BERT's fine-tuning recipe (Devlin et al. 2019: linear warm-up, linear decay).
  The formulas are those of transformers' `get_linear_schedule_with_warmup`,
  `get_cosine_schedule_with_warmup` and `get_constant_schedule_with_warmup`, step for step.
  `LambdaSchedule` applies one to an optimizer.
- A reaction to the evaluation metric (`ReduceLROnPlateau`): cut the lr when the metric stops
  improving. Same arguments and behaviour as `torch.optim.lr_scheduler.ReduceLROnPlateau`.
  `WarmupThenPlateau` puts a linear warm-up in front of it.

Every scheduler scales each param group from its own base lr, kept in the group as
`group["initial_lr"]` (the key torch's schedulers use), because groups differ: layer-wise lr decay
gives every layer its own. Keeping it in the group means it is saved with the optimizer's
state_dict. A group added during the run (gradual unfreezing) must come in through the
scheduler's `add_param_group`, which records its base lr and sets its lr for the current step;
a group that bypassed it is an error the next time the schedule sets the lrs, not a group
left at a wrong lr.

Convention, as in torch and transformers: build the scheduler before training (it sets the lr
of step 0), call `scheduler.step()` after each `optimizer.step()`.
"""

import math

import torch

# ----------------------------------------------------------------------------------------------
# the schedules that are functions of the step


def lr_multiplier(step, *, kind, warmup_steps, total_steps, min_ratio=0.0):
    """The factor on the base lr at optimizer step `step` (0 is the first step).

    Warm-up for every kind: step / warmup_steps, rising linearly from 0 (so the very first step
    takes lr 0, as in transformers). After it:
    - "linear": falls linearly to 0 at total_steps, and stays 0 after;
    - "cosine": half a cosine from 1 down to `min_ratio` at total_steps (transformers'
      `num_cycles=0.5`; `min_ratio` is its `min_lr_rate`). Past total_steps it stays at
      min_ratio, where transformers' curve would start to climb back;
    - "constant": 1.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant":
        return 1.0
    # max(1, ...): a run that is all warm-up must not divide by zero
    decay_steps = max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, (total_steps - step) / decay_steps)
    if kind == "cosine":
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))        # 1 -> 0 over the decay
        return max(0.0, cosine * (1.0 - min_ratio) + min_ratio)    # 1 -> min_ratio
    raise ValueError(f"unknown schedule kind {kind!r}: expected 'linear', 'cosine' or 'constant'")


def _record_base_lr(optimizer, group):
    """Add `group` to the optimizer and return it as the optimizer holds it, with its base lr."""
    optimizer.add_param_group(group)
    group = optimizer.param_groups[-1]
    group.setdefault("initial_lr", group["lr"])
    return group


def _check_base_lrs(optimizer, scheduler_name):
    for i, group in enumerate(optimizer.param_groups):
        if "initial_lr" not in group:
            raise RuntimeError(
                f"param group {i} ({group.get('name', 'unnamed')}) has no 'initial_lr': add groups "
                f"through {scheduler_name}.add_param_group, so that the schedule knows its base lr")


class LambdaSchedule:
    """Sets `group["lr"] = group["initial_lr"] * fn(step)` for every group, at every step.

    `fn` maps the step to a multiplier, e.g.
    `functools.partial(lr_multiplier, kind="linear", warmup_steps=100, total_steps=1000)`.
    The state is only the step count: `fn` is code, rebuilt from the config on resume, and the
    base lrs are in the optimizer's own state_dict.
    """

    def __init__(self, optimizer, fn):
        self.optimizer = optimizer
        self.fn = fn
        self.last_step = 0
        for group in optimizer.param_groups:
            # setdefault: an optimizer restored from a checkpoint already knows its base lrs
            group.setdefault("initial_lr", group["lr"])
        self._apply()

    def _apply(self):
        _check_base_lrs(self.optimizer, "LambdaSchedule")
        multiplier = self.fn(self.last_step)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * multiplier

    def step(self):
        self.last_step += 1
        self._apply()

    def add_param_group(self, group):
        """Add a group to the optimizer; its `lr` is its base lr, scaled from now on like the rest."""
        group = _record_base_lr(self.optimizer, group)
        group["lr"] = group["initial_lr"] * self.fn(self.last_step)

    def get_last_lr(self):
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self):
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict):
        self.last_step = state_dict["last_step"]
        self._apply()

# ----------------------------------------------------------------------------------------------
# reduce on plateau


class ReduceLROnPlateau:
    """Multiply every group's lr by `factor` once the metric has not improved for more than
    `patience` evaluations. Arguments, defaults, errors and results as torch's class:

    - improved means better than the best so far by more than `threshold`: relatively
      (best * (1 -/+ threshold), for mode min/max) or absolutely (best -/+ threshold);
    - after a cut, `cooldown` evaluations pass during which bad evaluations are not counted;
    - no lr goes below its `min_lr` (one for all groups, or a list with one per group), and a cut
      smaller than `eps` is skipped, so an lr already at its floor stays exactly there.
    """

    def __init__(self, optimizer, mode="min", factor=0.1, patience=10, threshold=1e-4,
                 threshold_mode="rel", cooldown=0, min_lr=0, eps=1e-8):
        if factor >= 1.0:
            raise ValueError(f"ReduceLROnPlateau: factor must be < 1.0 to reduce, got {factor}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"ReduceLROnPlateau: {type(optimizer).__name__} is not an Optimizer")
        self.optimizer = optimizer
        if isinstance(min_lr, (list, tuple)):
            if len(min_lr) != len(optimizer.param_groups):
                raise ValueError(f"ReduceLROnPlateau: expected {len(optimizer.param_groups)} "
                                 f"min_lrs (one per param group), got {len(min_lr)}")
            self.default_min_lr = None   # per-group floors: a group added later has none
            self.min_lrs = list(min_lr)
        else:
            self.default_min_lr = min_lr
            self.min_lrs = [min_lr] * len(optimizer.param_groups)
        self.factor = factor
        self.patience = patience
        self.cooldown = cooldown
        self.eps = eps
        self._check_mode(mode, threshold_mode)
        self.mode = mode
        self.threshold = threshold
        self.threshold_mode = threshold_mode
        self.last_epoch = 0       # evaluations seen
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_epochs = 0   # evaluations since the last improvement (or cut)
        self.cooldown_counter = 0
        self._last_lr = [group["lr"] for group in optimizer.param_groups]

    @staticmethod
    def _check_mode(mode, threshold_mode):
        if mode not in ("min", "max"):
            raise ValueError(f"ReduceLROnPlateau: mode {mode!r} is unknown, expected 'min' or 'max'")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"ReduceLROnPlateau: threshold mode {threshold_mode!r} is unknown, "
                             f"expected 'rel' or 'abs'")

    def _is_better(self, metric, best):
        if self.mode == "min" and self.threshold_mode == "rel":
            return metric < best * (1.0 - self.threshold)
        if self.mode == "min":
            return metric < best - self.threshold
        if self.threshold_mode == "rel":
            return metric > best * (1.0 + self.threshold)
        return metric > best + self.threshold

    def step(self, metric):
        """Call after each evaluation with its metric (a float or a 0-dim tensor)."""
        metric = float(metric)
        self.last_epoch += 1
        if self._is_better(metric, self.best):
            self.best = metric
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0   # the lr was just cut: give it time before judging it
        if self.num_bad_epochs > self.patience:
            self._reduce_lr()
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _reduce_lr(self):
        groups = self.optimizer.param_groups
        if len(groups) != len(self.min_lrs):   # a group was added since construction
            if self.default_min_lr is None:
                raise RuntimeError(
                    f"ReduceLROnPlateau: the optimizer has {len(groups)} param groups but "
                    f"{len(self.min_lrs)} min_lrs were given; a group was added: extend min_lrs")
            self.min_lrs = [self.default_min_lr] * len(groups)
        for group, min_lr in zip(groups, self.min_lrs):
            old_lr = float(group["lr"])
            new_lr = max(old_lr * self.factor, min_lr)
            if old_lr - new_lr > self.eps:
                group["lr"] = new_lr

    def get_last_lr(self):
        return list(self._last_lr)

    def state_dict(self):
        # plain numbers, strings and lists only, so that JSON and torch.load(weights_only=True)
        # read it; JSON has no infinity: the best before any evaluation is saved as None
        state = {key: value for key, value in self.__dict__.items() if key != "optimizer"}
        return {**state, "best": None if math.isinf(self.best) else self.best}

    def load_state_dict(self, state_dict):
        self._check_mode(state_dict["mode"], state_dict["threshold_mode"])
        self.__dict__.update(state_dict)
        if self.best is None:
            self.best = math.inf if self.mode == "min" else -math.inf


class WarmupThenPlateau:
    """A linear warm-up from 0 to each group's base lr over `warmup_steps` optimizer steps, then
    `ReduceLROnPlateau(optimizer, **plateau_args)` in charge.

    `step()` after each optimizer step; `evaluate(metric)` after each evaluation. Evaluations
    during warm-up are ignored: the metric of a model still warming up says nothing about
    whether the full lr has stopped helping, and must not count as a bad epoch nor set `best`.
    """

    def __init__(self, optimizer, warmup_steps, **plateau_args):
        self.optimizer = optimizer
        self.warmup_steps = warmup_steps
        self.last_step = 0
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.plateau = ReduceLROnPlateau(optimizer, **plateau_args)
        self._warm_up()

    @property
    def in_warmup(self):
        return self.last_step < self.warmup_steps

    def _warm_up(self):
        # the same ramp as lr_multiplier's; from the step that reaches the base lr on, the lrs
        # belong to the plateau and this scheduler never writes them again
        _check_base_lrs(self.optimizer, "WarmupThenPlateau")
        multiplier = self.last_step / self.warmup_steps if self.in_warmup else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * multiplier

    def step(self):
        self.last_step += 1
        if self.last_step <= self.warmup_steps:
            self._warm_up()

    def evaluate(self, metric):
        """Returns whether the plateau scheduler saw this evaluation."""
        if self.in_warmup:
            return False
        self.plateau.step(metric)
        return True

    def add_param_group(self, group):
        """Add a group; during warm-up it ramps with the others, after it starts at its own lr
        (earlier plateau cuts are not applied to it) and is cut with the others from then on."""
        group = _record_base_lr(self.optimizer, group)
        if self.in_warmup:
            group["lr"] = group["initial_lr"] * (self.last_step / self.warmup_steps)

    def get_last_lr(self):
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self):
        # the lrs too: after warm-up they are the plateau's state (the cuts so far), and this
        # way a resume does not depend on loading the optimizer before or after the scheduler
        return {"last_step": self.last_step, "warmup_steps": self.warmup_steps,
                "lrs": self.get_last_lr(), "plateau": self.plateau.state_dict()}

    def load_state_dict(self, state_dict):
        groups = self.optimizer.param_groups
        if len(state_dict["lrs"]) != len(groups):
            raise ValueError(f"WarmupThenPlateau: the saved state has {len(state_dict['lrs'])} "
                             f"param groups, the optimizer {len(groups)}: add the unfrozen "
                             f"groups before loading")
        self.last_step = state_dict["last_step"]
        self.warmup_steps = state_dict["warmup_steps"]
        self.plateau.load_state_dict(state_dict["plateau"])
        for group, lr in zip(groups, state_dict["lrs"]):
            group["lr"] = lr
