"""The distillation config: `minibert finetune`'s flags, plus the teacher, the student and the
weights of the distillation losses, each default with its reason.

What the student must share with its teacher is not a flag: the task, the label set, the pooling,
the CRF, the text fields and the length limit come from the teacher's best/task.json, so that the
teacher's outputs and the student's mean the same thing, and the student's best/ answers
`minibert predict` as the teacher's does. `model` (where the student's tokenizer is read) becomes
the teacher's best/, or the student's own checkpoint when that holds a tokenizer.

--student takes three forms (`student_spec` parses them, once, for everyone):
    layers=0,2,4     the teacher's own backbone keeping these blocks (DistilBERT's initialisation)
    DIR              a checkpoint directory (config.json + model.safetensors)
    random:NAME|DIR  random weights of a named size (train/pretrain/config.py) or of DIR/config.json

Limits: classification, regression and tagging teachers only (QA and multi-task are refused).
"""

import os
from dataclasses import dataclass

from minibert.config import BertConfig
from minibert.errors import UserError
from minibert.io import load_json
from train.command import absolute, option
from train.finetune.config import FinetuneConfig, flag_defaults
from train.finetune.predict import task_model_dir
from train.pretrain.config import SIZES

DISTILLABLE = ("classification", "regression", "tokens")

# finetune flags that distill does not offer: the teacher decides them (see the docstring), or
# they belong to another way of building the model (--init, --init-heads, multi-task)
FROM_TEACHER = ("model", "task", "pooling", "crf", "bio_constraints", "standardize_targets",
                "max_length", "text_field", "pair_field", "target_field")
NOT_FOR_DISTILL = FROM_TEACHER + ("init", "init_heads", "tasks", "tasks_file", "sampling",
                                  "sampling_temperature", "freeze_head", "doc_stride",
                                  "max_answer_len")


def teacher_best(run):
    """The teacher's checkpoint: RUN's best/, or the model a `minibert prune` DIR ended with,
    as predict and export read them."""
    best = task_model_dir(run)
    if best is None:
        raise UserError(f"--teacher {run}: no best/ with a task.json; give the directory of a "
                        "finished `minibert finetune` (or `minibert prune`) run")
    return best


def student_spec(spec):
    """--student -> ("layers", [i, ...]) | ("checkpoint", DIR) | ("random", NAME or config.json).
    Checks the form only; the layer indices are checked against the teacher by the config."""
    if spec.startswith("layers="):
        try:
            layers = [int(x) for x in spec[len("layers="):].split(",")]
        except ValueError:
            raise UserError(f"--student {spec}: give block indices, e.g. layers=0,2,4") from None
        if any(b <= a for a, b in zip(layers, layers[1:])) or layers[0] < 0:
            raise UserError(f"--student {spec}: block indices must be >= 0 and strictly "
                            "increasing, e.g. layers=0,2,4")
        return "layers", layers
    if spec.startswith("random:"):
        name = spec[len("random:"):]
        path = os.path.join(name, "config.json") if os.path.isdir(name) else name
        if name not in SIZES and not os.path.isfile(path):
            raise UserError(f"--student {spec}: neither a size ({', '.join(SIZES)}) nor a "
                            "directory holding config.json")
        return "random", name if name in SIZES else path
    if not os.path.isfile(os.path.join(spec, "config.json")):
        raise UserError(f"--student {spec}: not layers=..., random:NAME|DIR, nor a checkpoint "
                        f"directory (no {os.path.join(spec, 'config.json')})")
    return "checkpoint", spec


def abs_student(spec):
    """--student with its directory made absolute; layers=... and random:NAME hold none."""
    if spec.startswith("layers="):
        return spec
    if spec.startswith("random:"):
        name = spec[len("random:"):]
        return spec if name in SIZES else "random:" + absolute(name)
    return absolute(spec)


def has_tokenizer(path):
    # the two files Tokenizer.from_dir reads
    return any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.txt"))


def teacher_settings(best, spec):
    """The FROM_TEACHER fields, as the teacher's best/task.json says."""
    meta = load_json(os.path.join(best, "task.json"))
    if meta["task"] not in DISTILLABLE:
        raise UserError(f"--teacher {best}: a {meta['task']} model; distill handles "
                        f"{', '.join(DISTILLABLE)}")
    kind, arg = student_spec(spec)
    out = {"task": meta["task"], "max_length": meta["max_length"],
           "model": arg if kind == "checkpoint" and has_tokenizer(arg) else best}
    out.update({k: meta[k] for k in ("pooling", "crf", "bio_constraints", "text_field",
                                     "pair_field", "target_field") if k in meta})
    if meta["task"] == "regression":  # unstandardised targets are saved as mean 0, std 1
        out["standardize_targets"] = (meta["target_mean"], meta["target_std"]) != (0.0, 1.0)
    return out


@dataclass
class DistillConfig(FinetuneConfig):
    teacher: str | None = option(None, "a finished `minibert finetune` run: its best/ teaches",
                                 path=True)
    student: str | None = option(None, "layers=0,2,4 (the teacher's blocks), a checkpoint DIR, "
                                 "or random:NAME|DIR (a size of `pretrain --config`, or "
                                 "DIR/config.json, with random weights)", path=abs_student)
    # an even mix to start from; Hinton et al. generally did best with a "considerably lower"
    # weight on the hard labels, so this is worth a sweep
    alpha: float = option(0.5, "weight of the hard-label loss; 1 - alpha weighs the teacher's "
                          "soft targets")
    # 2 softens a confident teacher enough to show which wrong labels it finds plausible; at
    # T = 1 its near one-hot outputs add little to the hard labels (Hinton et al. 2015: 2.5-4
    # suited a small student best, a larger one took anything above 8)
    temperature: float = option(2.0, "softmax temperature of the soft targets (classification "
                                "and tagging; regression has no distribution to soften)")
    # off by default: it needs the teacher beside the student at every step (no cache)
    hidden_mse: float = option(0.0, "weight of the MSE between the last hidden states (TinyBERT), "
                               "through a learned projection when the widths differ")
    attention_kl: float = option(0.0, "weight of the KL between the last layers' attention "
                                 "distributions (MiniLM); needs equal head counts")

    def __post_init__(self):
        if self.teacher is None or self.student is None:
            raise UserError(f"--{'teacher' if self.teacher is None else 'student'} is required")
        best = teacher_best(self.teacher)
        defaults = flag_defaults()
        for k, v in teacher_settings(best, self.student).items():
            # a value given that is not the teacher's is a contradiction, not a choice
            if getattr(self, k) not in (defaults[k], v):
                raise UserError(f"--{k.replace('_', '-')} {getattr(self, k)!r}: a student keeps "
                                f"its teacher's, which is {v!r} ({best}/task.json)")
            setattr(self, k, v)
        kind, arg = student_spec(self.student)
        n = BertConfig.from_json(os.path.join(best, "config.json")).num_hidden_layers
        if kind == "layers" and arg[-1] >= n:
            raise UserError(f"--student {self.student}: the teacher has {n} blocks, "
                            f"0..{n - 1}")
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"--alpha {self.alpha}: a weight in [0, 1]")
        if self.temperature <= 0:
            raise UserError(f"--temperature {self.temperature}: must be positive")
        for k in ("hidden_mse", "attention_kl"):
            if getattr(self, k) < 0:
                raise UserError(f"--{k.replace('_', '-')} {getattr(self, k)}: a weight >= 0")

    @property
    def teacher_on_the_fly(self):
        """The hidden-state and attention losses read the teacher's insides, which no cache of
        its outputs holds: then it runs beside the student at every step."""
        return self.hidden_mse > 0 or self.attention_kl > 0
