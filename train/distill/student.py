"""The student of `minibert distill`, built from --student (train/distill/config.py parses it).

- `layers=0,2,4`: the teacher's own backbone keeping those blocks, DistilBERT's initialisation
  (Sanh et al. 2019, section 3: "taking one layer out of two" of the teacher): the embeddings,
  the chosen blocks and the pooler are copied from the teacher bit for bit. The head is copied
  too (see `layers_student` for why).
- a checkpoint directory: its backbone (minibert.checkpoint.load_model), a new head.
- `random:NAME|DIR`: a size of `minibert pretrain --config` (train/pretrain/config.py) or a
  config.json, with random weights and the teacher's vocabulary; a new head.

The flags that set the backbone's attention code and dropouts apply to every kind.
"""

import dataclasses
import re
import sys

from minibert.errors import UserError
from minibert.model import BertEncoder
from train.distill.config import student_spec
from train.finetune.finetune import load_backbone, model_overrides, with_new_head
from train.pretrain.config import model_config


def keep_layers(cfg, layers):
    """The BertConfig of an encoder that keeps blocks `layers` of one built from `cfg`. The fields
    that hold one entry per layer (heads pruned from it, its MLP width) follow their blocks."""
    pruned = {new: cfg.pruned_heads[old] for new, old in enumerate(layers)
              if old in cfg.pruned_heads}
    widths = None if cfg.intermediate_sizes is None else \
        [cfg.intermediate_sizes[old] for old in layers]
    return dataclasses.replace(cfg, num_hidden_layers=len(layers), pruned_heads=pruned,
                               intermediate_sizes=widths)


def layers_student(teacher, layers, cfg, task):
    """The teacher's backbone with blocks `layers` only, renumbered 0..n-1, and its head.

    The head is copied rather than made fresh: the student's embeddings, blocks and pooler are
    the teacher's, so its sentence vectors (or token vectors) start near the teacher's, and the
    teacher's head maps them to nearly the teacher's outputs; a random head would throw that
    start away and begin the soft loss far from its minimum. With a CRF the copy also keeps the
    teacher's transition scores, which the soft loss never teaches (train/distill/loss.py)."""
    src = teacher.bert
    bert = BertEncoder(keep_layers(dataclasses.replace(src.config, **model_overrides(cfg)),
                                   layers))
    renumber = {old: new for new, old in enumerate(layers)}
    state = {}
    for k, v in src.state_dict().items():
        m = re.match(r"blocks\.(\d+)\.(.*)", k)
        if m is None:  # embeddings and pooler
            state[k] = v
        elif int(m.group(1)) in renumber:
            state[f"blocks.{renumber[int(m.group(1))]}.{m.group(2)}"] = v
    bert.load_state_dict(state)  # strict: every tensor of the student comes from the teacher
    model = with_new_head(bert, cfg, task)  # its own dropout, the teacher's weights
    model.head.load_state_dict(teacher.head.state_dict())
    print(f"student: the teacher's embeddings, blocks {layers} (of "
          f"{src.config.num_hidden_layers}), pooler and head", file=sys.stderr)
    return model


def build_student(cfg, task, teacher, tok):
    """The student TaskModel on the CPU, as --student says; `tok` is the teacher's tokenizer
    (a random student's vocabulary)."""
    kind, arg = student_spec(cfg.student)
    if kind == "layers":
        return layers_student(teacher, arg, cfg, task)
    overrides = model_overrides(cfg)
    if kind == "checkpoint":
        bert = load_backbone(arg, overrides)
        print(f"student: the backbone of {arg}, a new head", file=sys.stderr)
    else:
        try:
            mc = model_config(arg, tok.vocab_size, cfg.max_length, cfg.attention,
                              teacher.bert.config.pad_token_id)
        except ValueError as e:  # a config.json whose vocabulary is not the teacher's
            raise UserError(f"--student {cfg.student}: {e}") from None
        bert = BertEncoder(dataclasses.replace(mc, **overrides))
        print(f"student: random weights (BERT's N(0, 0.02)) of {arg} ({mc.num_hidden_layers} "
              f"layers, width {mc.hidden_size}), the teacher's vocabulary, a new head",
              file=sys.stderr)
    return with_new_head(bert, cfg, task)
