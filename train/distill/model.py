"""The student with its distillation loss: what the trainer trains in `minibert distill`.

`DistillModel` is a TaskModel (the student's `bert` and `head`), so everything fine-tuning does
with a TaskModel applies unchanged: freezing and layer-wise learning rates, best/ (its `bert` and
`head`, the layout `minibert predict` and `export` read), evaluation. Only its training forward
differs: the head's own loss on the gold labels becomes the `hard` term of the distillation loss
(train/distill/loss.py), and the returned `terms` (hard, soft, hidden_mse, attention_kl) are
logged by the trainer beside the loss. In eval mode it is the student alone, so dev metrics and
dev loss are the student's own, comparable with a fine-tuned model's.

The teacher's soft targets arrive in the batch (`teacher_targets`, and `teacher_mask` for
tagging) when they were cached before training (train/distill/teacher.py). When the hidden-state
or attention loss is on, the teacher runs here instead, on the same batch, under no_grad. The
teacher is kept outside the module tree, so its weights are neither trained nor saved in state/,
and `.train()` never turns its dropout on. The projection of the hidden-state loss is a
submodule named `project`: it trains with the head's learning rate (train/loop/params.py counts
every parameter outside `bert` as head) and is saved in state/ for resume, but not in best/.
"""

import torch

from train.distill.loss import (attention_kl, attention_log_probs, hidden_mse, mix, soft_loss,
                                soft_outputs)
from train.tasks.classification import new_linear
from train.tasks.task import TaskModel


class Taps:
    """Forward hooks on an encoder: its output, the last hidden states (B, T, C), and its last
    block's qkv projection (B, T, 3 nh hs), from which the attention probabilities follow."""

    def __init__(self, bert):
        self.got = {}
        self.attn = bert.blocks[-1].attn  # its nh and hs say how to split qkv
        bert.register_forward_hook(lambda mod, args, out: self.got.__setitem__("hidden", out))
        self.attn.qkv.register_forward_hook(lambda mod, args, out: self.got.__setitem__("qkv", out))

    def pop(self):
        got, self.got = self.got, {}
        return got

    def attention(self, got, key_mask):
        return attention_log_probs(got["qkv"], self.attn.nh, self.attn.hs, key_mask)


class DistillModel(TaskModel):
    def __init__(self, bert, head, kind, alpha, temperature, teacher=None, hidden_weight=0.0,
                 attention_weight=0.0):
        """`kind`: the task name; `teacher`: the teacher TaskModel when it runs on the fly, None
        when the batches carry its cached soft targets."""
        super().__init__(bert, head)
        self.kind, self.alpha, self.temperature = kind, alpha, temperature
        self.hidden_weight, self.attention_weight = hidden_weight, attention_weight
        # Stored past nn.Module's __setattr__, so that it is no submodule (see the docstring).
        self.__dict__["teacher"] = teacher
        self.project = self.taps = self.teacher_taps = None
        if teacher is not None and (hidden_weight or attention_weight):
            self.taps, self.teacher_taps = Taps(bert), Taps(teacher.bert)
            c_s, c_t = bert.config.hidden_size, teacher.bert.config.hidden_size
            if hidden_weight and c_s != c_t:  # TinyBERT's W_h: student width -> teacher width
                self.project = new_linear(c_s, c_t)

    def forward(self, batch):
        out = self.head(self.bert, batch)  # the student's outputs, and its loss on gold labels
        taps = self.taps.pop() if self.taps is not None else None
        if not self.training:  # evaluation and prediction: the student alone
            return out
        if self.teacher is None:
            teacher, teacher_mask = batch["teacher_targets"], batch.get("teacher_mask")
        else:
            inputs = {k: v for k, v in batch.items() if k != "labels"}  # no teacher loss needed
            with torch.no_grad():
                teacher, teacher_mask = soft_outputs(self.kind, self.teacher(inputs))
        terms = {"hard": out["loss"],
                 "soft": soft_loss(self.kind, out, teacher, teacher_mask, self.temperature)}
        loss = mix(terms["hard"], terms["soft"], self.alpha)
        if taps is not None:
            got = self.teacher_taps.pop()
            key_mask = batch["attention_mask"].bool()  # (B, T) real tokens
            if self.hidden_weight:
                h = taps["hidden"] if self.project is None else self.project(taps["hidden"])
                terms["hidden_mse"] = hidden_mse(h, got["hidden"], key_mask)
                loss = loss + self.hidden_weight * terms["hidden_mse"]
            if self.attention_weight:
                terms["attention_kl"] = attention_kl(self.teacher_taps.attention(got, key_mask),
                                                     self.taps.attention(taps, key_mask),
                                                     key_mask)
                loss = loss + self.attention_weight * terms["attention_kl"]
        return {**out, "loss": loss, "terms": {k: v.detach() for k, v in terms.items()}}
