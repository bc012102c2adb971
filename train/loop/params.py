"""Which parameters train, at which learning rate, with which weight decay.

This is where the fine-tuning recipes of the field live:
- No weight decay on biases and LayerNorm weights (every 1-D tensor). Decay pulls weights towards
  zero; for a bias or a LayerNorm gain that is a change of function, not regularisation.
- Discriminative (layer-wise) learning rates (Howard & Ruder 2018, ULMFiT; Sun et al. 2019, "How
  to Fine-Tune BERT for Text Classification?"): the top block gets the base lr, each block below
  D times the one above, the embeddings last. Lower layers hold general features worth keeping.
- A separate, usually higher, learning rate for the freshly initialised head.
- Freezing the embeddings, the bottom N blocks, or the whole backbone.
- Gradual unfreezing (ULMFiT): stage 0 trains the head only, each later stage unfreezes one more
  block from the top, the embeddings last; newly unfrozen parameters join the optimizer as new
  param groups, so they start with fresh Adam state.

Parameters are grouped by *unit*: "head", "layer.i" (block i, 0 = bottom) and "embeddings". A
unit gives two param groups, "<unit>" (decayed) and "<unit>.no_decay". The model it works on has
`.bert` (a BertEncoder) and `.head`; the pooler counts as part of the head, since BERT's
classification head is pooler -> dropout -> linear.
"""

import sys
from dataclasses import dataclass


@dataclass
class LrPolicy:
    lr: float  # base lr: the top block's
    lr_head: float | None = None  # None: same as lr
    layer_lr_decay: float = 1.0  # D
    lr_embeddings: float | None = None  # absolute override
    lr_encoder: float | None = None  # absolute override for every block (no decay)
    weight_decay: float = 0.01

    def unit_lr(self, unit, n_layers):
        if unit == "head":
            return self.lr_head if self.lr_head is not None else self.lr
        if unit == "embeddings":
            if self.lr_embeddings is not None:
                return self.lr_embeddings
            if self.lr_encoder is not None:  # a flat encoder lr: the embeddings take it too
                return self.lr_encoder
            return self.lr * self.layer_lr_decay ** n_layers
        i = int(unit.split(".")[1])
        if self.lr_encoder is not None:
            return self.lr_encoder
        return self.lr * self.layer_lr_decay ** (n_layers - 1 - i)


def unit_of(name):
    """The unit of a parameter name of a model with `.bert` and `.head`."""
    if name.startswith("bert.embeddings."):
        return "embeddings"
    if name.startswith("bert.blocks."):
        return f"layer.{int(name.split('.')[2])}"
    return "head"  # bert.pooler.* and head.*


def units_top_down(n_layers):
    """Unfreezing order: head, top block ... bottom block, embeddings."""
    return ["head"] + [f"layer.{i}" for i in reversed(range(n_layers))] + ["embeddings"]


def frozen_units(n_layers, freeze_embeddings=False, freeze_layers=0, freeze_backbone=False):
    if freeze_layers > n_layers:
        raise ValueError(f"--freeze-layers {freeze_layers} but the model has {n_layers} blocks")
    frozen = set()
    if freeze_embeddings or freeze_backbone:
        frozen.add("embeddings")
    n = n_layers if freeze_backbone else freeze_layers
    frozen.update(f"layer.{i}" for i in range(n))
    return frozen


def decays(p):
    """The weight-decay rule: matrices (Linear and Embedding weights) decay; biases, LayerNorm
    and other 1-D parameters never do (Loshchilov & Hutter 2019; BERT's recipe)."""
    return p.ndim >= 2


def param_groups(model, units, policy, lr_scale=1.0):
    """Param groups for the trainable parameters of `units` (params with requires_grad=False are
    never included). Each group carries its `name` and `initial_lr`, the base lr that
    train/loop/schedules.py scales."""
    n_layers = model.bert.config.num_hidden_layers
    by_group = {}
    for name, p in model.named_parameters():
        unit = unit_of(name)
        if unit not in units or not p.requires_grad:
            continue
        decay = decays(p)
        key = unit if decay else unit + ".no_decay"
        by_group.setdefault(key, (unit, decay, []))[2].append(p)
    order = units_top_down(n_layers)
    groups = []
    for key, (unit, decay, params) in sorted(by_group.items(),
                                             key=lambda kv: (order.index(kv[1][0]), kv[0])):
        lr = policy.unit_lr(unit, n_layers) * lr_scale
        groups.append({"params": params, "name": key, "lr": lr, "initial_lr": lr,
                       "weight_decay": policy.weight_decay if decay else 0.0})
    return groups


def set_trainable(model, trainable_units, pooler=True):
    """requires_grad=True exactly for the parameters of `trainable_units`; the pooler (of the
    head unit) only with `pooler`, i.e. when a head reads it (pooling "cls")."""
    for name, p in model.named_parameters():
        on = pooler or not name.startswith("bert.pooler.")
        p.requires_grad_(on and unit_of(name) in trainable_units)


def print_groups(groups, model, file=None):
    file = sys.stderr if file is None else file  # the stream of the moment, not of import
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"parameters: {trainable:,} trainable of {total:,} "
          f"({100 * trainable / total:.1f}%)", file=file)
    print(f"  {'group':20s} {'params':>12s} {'lr':>10s} {'weight decay':>12s}", file=file)
    for g in groups:
        n = sum(p.numel() for p in g["params"])
        print(f"  {g['name']:20s} {n:12,d} {g['lr']:10.2e} {g['weight_decay']:12g}", file=file)
    file.flush()


class GradualUnfreezer:
    """Stage s trains the head plus the top s units below it (blocks, then the embeddings).

    The stage advances every `every` epochs or steps. `stage_lrs[s]` (the last value repeats) is
    the base lr of stage s; every group keeps its ratio to the base (layer-wise decay, head lr).
    """

    def __init__(self, model, policy, every, unit, stage_lrs, always_frozen=(), pooler=True):
        self.model, self.policy, self.pooler = model, policy, pooler  # pooler: see set_trainable
        self.every, self.unit = every, unit  # unit: "epoch" or "step"
        self.stage_lrs = list(stage_lrs) if stage_lrs else [policy.lr]
        self.order = [u for u in units_top_down(model.bert.config.num_hidden_layers)
                      if u not in always_frozen]
        self.stage = -1

    def stage_at(self, step, epoch):
        t = epoch if self.unit == "epoch" else step
        return min(int(t // self.every), len(self.order) - 1)

    def lr_scale(self, stage):
        return self.stage_lrs[min(stage, len(self.stage_lrs) - 1)] / self.policy.lr

    def update(self, schedule, step, epoch):
        """Advance to the stage for (step, epoch); new groups enter through the schedule so that
        it scales them like the rest. Returns what changed, as a line to print, or None."""
        stage = self.stage_at(step, epoch)
        if stage == self.stage:
            return None
        active = set(self.order[:stage + 1])
        set_trainable(self.model, active, self.pooler)
        optimizer = schedule.optimizer
        ratio = self.lr_scale(stage) / self.lr_scale(max(self.stage, 0))
        for g in optimizer.param_groups:  # the groups already there move to this stage's lr
            g["initial_lr"] *= ratio
            g["lr"] *= ratio
        have = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for g in param_groups(self.model, active, self.policy, self.lr_scale(stage)):
            g["params"] = [p for p in g["params"] if id(p) not in have]
            if g["params"]:
                schedule.add_param_group(g)  # no Adam state yet: it starts fresh
        self.stage = stage
        return (f"unfreezing: stage {stage} trains {', '.join(self.order[:stage + 1])} "
                f"(base lr {self.policy.lr * self.lr_scale(stage):.2e})")
