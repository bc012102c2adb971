"""The fine-tuning config: every flag of `minibert finetune`, each default with its reason.

The defaults are BERT's fine-tuning recipe (Devlin et al. 2019, appendix A.3: lr in 2e-5..5e-5,
batch 16/32, 2-4 epochs, linear warm-up over 10% then linear decay, weight decay 0.01) plus what
the field learned since (Mosbach et al. 2021: bias-corrected AdamW and warm-up make fine-tuning
stable; Sun et al. 2019: a higher lr for the new head, layer-wise decay).
"""

import os
from dataclasses import dataclass, fields

from minibert.io import load_json
from train.command import absolute, check_ranges, option
from train.loop.best import metric_mode
from train.tasks.registry import SINGLE_TASKS



# --task NAME; --metric's default is the task's own (multitask: "combined", its heads' mean)
DEFAULT_METRIC = {**{n: t.default_metric for n, t in SINGLE_TASKS.items()},
                  "multitask": "combined"}
TASKS = tuple(DEFAULT_METRIC)

# flags that only some tasks read: given (not at their default) with another task, they are
# ignored, and the run says so at its start (unused_flags). The tagging reader always reads
# `tokens`/`tags` (train/tasks/tagging.py), QA its SQuAD fields. A multi-task run's values are
# its heads' defaults, given to the heads that read them.
TASK_FLAGS = {"text_field": ("classification", "regression"),
              "pair_field": ("classification", "regression"),
              "label_field": ("classification",),
              "target_field": ("regression",), "standardize_targets": ("regression",),
              "pooling": ("classification", "regression"),
              "crf": ("tokens",), "bio_constraints": ("tokens",), "doc_stride": ("qa",),
              "max_answer_len": ("qa",)}
# the data of one task, and the flags of several: each read by one kind of run only
SINGLE_TASK_FLAGS = ("train", "dev", "test")
MULTITASK_FLAGS = ("tasks", "tasks_file", "sampling", "sampling_temperature")


def check_metric(metric, names, task):
    """--metric must be one of `names`, the scores that --task `task` reports: a typo would
    otherwise train until the first evaluation and stop there."""
    if metric not in names:
        raise ValueError(f"--metric {metric}: not a metric of --task {task}; one of "
                         f"{', '.join(names)}")


def flag_applies(name, task):
    """None, or why --NAME does not apply to --task `task` (a TASK_FLAGS field)."""
    tasks = TASK_FLAGS.get(name, (task,))
    return None if task in tasks else \
        f"--{name.replace('_', '-')} applies to --task {' or '.join(tasks)} only"


def flag_defaults():
    """{field: default} of FinetuneConfig: what a flag is when it is not given."""
    return {f.name: f.default for f in fields(FinetuneConfig)}


def unused_flags(cfg):
    """Why each flag given (not at its default) goes unread in this run: another task's flag, a
    plateau flag without --schedule plateau, --stage-lrs without --unfreeze-every. Said at the
    start of a run rather than refused, so that a sweep over --schedule or --task with such a
    flag in common, and a run saved with one, still run."""
    defaults = flag_defaults()
    given = [k for k in defaults if getattr(cfg, k) != defaults[k]]
    why = [flag_applies(k, cfg.task) for k in given if cfg.task != "multitask"]
    if cfg.task == "multitask":
        why += [f"--{k} applies to a single --task; a multi-task run reads its data from --tasks"
                for k in SINGLE_TASK_FLAGS if k in given]
    else:
        why += [f"--{k.replace('_', '-')} applies to --task multitask only"
                for k in MULTITASK_FLAGS if k in given]
    if cfg.unfreeze_every is None:
        why += [f"--{k.replace('_', '-')} applies with --unfreeze-every only"
                for k in ("stage_lrs", "unfreeze_unit") if k in given]
    if cfg.schedule != "plateau":
        why += [f"--{k.replace('_', '-')} applies to --schedule plateau only"
                for k in given if k.startswith("plateau_")]
    if cfg.skip_bad_rows and cfg.task in ("tokens", "qa"):  # their readers stop at the first
        why.append("--skip-bad-rows applies to --task classification or regression only")
    return [w for w in why if w]


def head_spec(spec):
    """An --init-heads entry: 'NAME=DIR' -> (NAME, DIR); 'DIR' -> (None, DIR). A directory may hold
    '=' itself (a sweep's trial 'sweep/lr=1e-3/best'): a NAME never holds a path separator."""
    name, sep, src = spec.partition("=")
    return (name, src) if sep and name and "/" not in name else (None, spec)


def abs_head_spec(spec):
    """An --init-heads entry with its directory made absolute."""
    name, src = head_spec(spec)
    return f"{name}={absolute(src)}" if name else absolute(src)


def split_files(path):
    """The train/dev/test files a multi-task PATH with {split} names, those that exist."""
    return [p for p in (path.replace("{split}", s) for s in ("train", "dev", "test"))
            if os.path.isfile(p)]


def tasks_file_path(tasks_file, path):
    """A task's PATH in a --tasks-file: a relative one is read from the file's folder."""
    return os.path.join(os.path.dirname(tasks_file), path)


def spec_files(spec):
    """The data files of a --tasks spec (NAME:TYPE:PATH...), for RUN/inputs.json."""
    parts = spec.split(":")
    return split_files(parts[2]) if len(parts) >= 3 else []


def tasks_file_files(tasks_file):
    """The data files a --tasks-file names, for RUN/inputs.json (a bad file: none; the
    multi-task reader says what is wrong with it)."""
    try:
        rows = load_json(tasks_file)
    except (OSError, ValueError):
        return []
    paths = [r.get("path") for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []
    return [f for p in paths if isinstance(p, str)
            for f in split_files(tasks_file_path(tasks_file, p))]


def abs_task_spec(spec):
    """A --tasks spec with its PATH made absolute; a malformed one is left for multitask's
    reader to refuse."""
    parts = spec.strip().split(":")
    if len(parts) < 3 or not parts[2]:
        return spec
    return ":".join(parts[:2] + [absolute(parts[2])] + parts[3:])


@dataclass
class FinetuneConfig:
    # what to train on
    model: str = option(None, "checkpoint directory (Hugging Face layout), e.g. weights/minilm-l6",
                        path=True)
    task: str = option("classification", "task type", choices=TASKS)
    train: str = option(None, "training data (.jsonl, .csv or .tsv)", path=True)
    dev: str | None = option(None, "dev data: evaluation, early stopping, best checkpoint",
                             path=True)
    test: str | None = option(None, "test data, evaluated once with the best checkpoint",
                              path=True)
    out: str = option("runs/finetune", "run directory", path=True)
    text_field: str = option("text", "field holding the text")
    pair_field: str | None = option(None, "field holding the second text of a pair")
    label_field: str = option("label", "field holding the label")
    target_field: str = option("score", "regression: field holding the real-valued target")
    standardize_targets: bool = option(False, "regression: train on (y - mean) / std of the train "
                                       "targets; predictions are mapped back")
    crf: bool = option(False, "tokens: a linear-chain CRF over the words' tag scores")
    bio_constraints: bool = option(False, "tokens with --crf: forbid O->I-X, B-X->I-Y, I-X->I-Y, "
                                   "start->I-X")
    # None: max length // 3, the proportion of BERT's SQuAD runs (stride 128 at length 384); a
    # fixed 128 would not fit the default --max-length 128
    doc_stride: int | None = option(None, "qa: tokens shared by consecutive windows of a long "
                                    "context (default: --max-length // 3)")
    max_answer_len: int = option(30, "qa: longest answer span, in tokens")
    tasks: list[str] | None = option(None, "multitask: comma-separated specs "
                                     "NAME:TYPE:PATH_WITH_{split}[:key=value...] "
                                     "(train/tasks/multitask.py)", path=abs_task_spec,
                                     inputs=spec_files)
    tasks_file: str | None = option(None, "multitask: a JSON list of {name, type, path, "
                                    "options...}; a relative path in it is read from the "
                                    "file's folder", path=True, inputs=tasks_file_files)
    sampling: str = option("proportional", "multitask: which task the next batch comes from",
                           choices=("proportional", "round-robin", "temperature"))
    sampling_temperature: float = option(2.0, "multitask, --sampling temperature: p_i ~ n_i^(1/T)")
    freeze_head: list[str] | None = option(None, "multitask: names of heads not to train "
                                           "(comma-separated)")
    init_heads: list[str] | None = option(None, "start heads from a finetune run's best/ instead "
                                          "of fresh: DIR (the whole head) or, multitask, NAME=DIR "
                                          "(head NAME; from DIR's head NAME if DIR is "
                                          "multi-task), comma-separated", path=abs_head_spec)
    skip_bad_rows: bool = option(False, "classification, regression: skip (and count) bad rows "
                                 "instead of stopping at the first")
    max_length: int = option(128, "tokens per example after truncation (longest-first for "
                             "pairs; tokens: later words are predicted O; qa: the window size)")
    init: str = option("pretrained", "'random' trains the same architecture from scratch, to show "
                       "what pretraining is worth", choices=("pretrained", "random"))
    # the head
    pooling: str = option("mean", "sentence vector: 'cls' is BERT's pooler on [CLS]; 'mean' "
                          "averages tokens, as MiniLM was trained (its pooler never was)",
                          choices=("cls", "mean"))
    # optimisation
    epochs: int = option(3, "passes over the training data (BERT: 2-4)")
    max_steps: int | None = option(None, "stop after this many optimizer steps (overrides epochs)")
    # int, or "auto": the largest that fits in GPU memory, less 10% (runs/memory.py; CUDA only)
    batch_size: int | str = option(32, "examples per micro-batch, or 'auto' (CUDA only)")
    grad_accum: int = option(1, "micro-batches per optimizer step: a bigger batch in the same "
                             "memory")
    effective_batch_size: int | None = option(None, "examples per optimizer step: sets "
                                              "--grad-accum (and lowers --batch-size to the "
                                              "largest divisor of N that is not above it)")
    eval_batch_size: int = option(128, "examples per evaluation batch (no gradients: can be "
                                  "larger)")
    lr: float = option(1e-4, "base learning rate: the top block's. BERT's flat recipe is "
                       "2e-5..5e-5; with layer-wise decay the top may go higher, the lower blocks "
                       "stay in range")
    lr_head: float | None = option(1e-3, "learning rate of the new head; a random layer needs a "
                                   "larger step than pretrained ones")
    layer_lr_decay: float = option(0.9, "each block below the top gets this times the lr above it; "
                                   "embeddings last (0.8-0.95 is common; 1 turns it off). With lr "
                                   "1e-4 and 6 blocks the bottom block trains at 5.9e-5")
    lr_embeddings: float | None = option(None, "explicit lr for the embeddings (overrides decay)")
    lr_encoder: float | None = option(None, "explicit lr for every block and the embeddings "
                                      "(overrides decay; --lr-embeddings still sets theirs)")
    weight_decay: float = option(0.01, "decoupled weight decay; never on biases or LayerNorm")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    schedule: str = option("linear", "lr after warm-up: decay to 0 linearly or by cosine, "
                           "constant, or reduce on plateau of the dev metric",
                           choices=("linear", "cosine", "constant", "plateau"))
    warmup_ratio: float = option(0.1, "warm-up as a fraction of all steps (BERT: 10%)")
    warmup_steps: int | None = option(None, "warm-up in steps (overrides warmup-ratio)")
    plateau_factor: float = option(0.5, "plateau: multiply the lr by this when the metric stalls")
    plateau_patience: int = option(1, "plateau: evaluations without improvement before a cut")
    plateau_cooldown: int = option(0, "plateau: evaluations to wait after a cut")
    plateau_threshold: float = option(1e-4, "plateau: relative change that counts as improvement")
    plateau_min_lr: float = option(0.0, "plateau: lower bound of the lr")
    clip_grad_norm: float | None = option(1.0, "clip the global gradient norm to this ('none': "
                                          "off)")
    seed: int = option(42, "seeds weights of the head, dropout and data order")
    hidden_dropout: float | None = option(None, "override the checkpoint's hidden dropout (BERT "
                                          "0.1)")
    attention_dropout: float | None = option(None, "override the checkpoint's attention dropout")
    classifier_dropout: float | None = option(None, "dropout before the head (default: hidden "
                                              "dropout)")
    # freezing
    freeze_embeddings: bool = option(False, "do not train the embeddings")
    freeze_layers: int = option(0, "do not train the bottom N blocks")
    freeze_backbone: bool = option(False, "train the head only (a linear probe on frozen features)")
    unfreeze_every: float | None = option(None, "gradual unfreezing: stage 0 trains the head, then "
                                          "one more block from the top every this many units "
                                          "(whole epochs with --unfreeze-unit epoch)")
    unfreeze_unit: str = option("epoch", "unit of --unfreeze-every", choices=("epoch", "step"))
    stage_lrs: list[float] | None = option(None, "base lr of each unfreezing stage, "
                                           "comma-separated, e.g. 1e-3,1e-4 (the last repeats)")
    # evaluation and bookkeeping
    eval_every: int | None = option(100, "evaluate on dev every N steps (and at each epoch end)")
    log_every: int = option(20, "log train loss, lr, speed and memory every N steps")
    metric: str | None = option(None, "dev metric for early stopping and the best checkpoint "
                                "(default: the task's, see DEFAULT_METRIC; multitask: combined, "
                                "loss or NAME/METRIC of a head)")
    early_stopping_patience: int | None = option(None, "stop after N evaluations without a better "
                                                 "dev metric ('none': never)")
    save_every: int | None = option(None, "also save resume state every N steps (always at evals)")
    group_by_length: bool = option(True, "batch examples of similar length: less padding, faster")
    attention: str = option("sdpa", "attention implementation",
                            choices=("eager", "sdpa", "triton", "triton-varlen"))
    device: str = option("auto", "cpu, cuda, or auto")
    threads: int | None = option(None, "CPU threads for torch (default: torch's choice)")
    # scale (train/loop/distributed.py)
    nproc: int = option(1, "data-parallel processes: N > 1 relaunches the command under torchrun "
                        "(one per GPU; gloo on CPU); --batch-size is per process")
    precision: str = option("auto", "autocast dtype of the forward, fp32 master weights and "
                            "optimizer state: auto = bf16 on CUDA and on CPUs with bf16 "
                            "instructions (AVX512-BF16, AMX), else fp32; fp16 adds a gradient "
                            "scaler", choices=("auto", "fp32", "bf16", "fp16"))
    compile: bool = option(False, "torch.compile the model for training (the first steps compile)")

    def __post_init__(self):
        if self.epochs < 1 or self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--epochs {self.epochs}, --max-steps {self.max_steps}: each must be "
                             "at least 1")
        check_ranges(self)  # every numeric flag in its range (train/command.py)
        # stages advance at whole epochs: 0.5 would round to stage 0, then jump past stage 1
        if self.unfreeze_unit == "epoch" and self.unfreeze_every is not None and \
                not float(self.unfreeze_every).is_integer():
            raise ValueError(f"--unfreeze-every {self.unfreeze_every:g}: must be a whole number "
                             "of epochs; use --unfreeze-unit step for less")
        if self.metric is None:
            self.metric = DEFAULT_METRIC[self.task]
        if self.task == "qa":
            if self.doc_stride is None:
                self.doc_stride = self.max_length // 3
            # a window is [CLS] question [SEP] context [SEP]: the shared part must leave room
            if not 0 <= self.doc_stride < self.max_length - 3:
                raise ValueError(f"--doc-stride {self.doc_stride} must be below --max-length "
                                 f"{self.max_length} minus 3 special tokens; leave it out for "
                                 f"{self.max_length // 3}")
        if self.log_every < 1:
            raise ValueError(f"--log-every must be a positive number of steps, not "
                             f"{self.log_every}")
        if self.nproc < 1:
            raise ValueError("--nproc must be at least 1")
        if self.bio_constraints and not self.crf:
            raise ValueError("--bio-constraints forbids transitions of the CRF: add --crf")
        if self.freeze_head and self.task != "multitask":
            raise ValueError("--freeze-head names heads of --task multitask")
        if any(head_spec(s)[0] for s in self.init_heads or []) and self.task != "multitask":
            raise ValueError("--init-heads NAME=DIR names heads of --task multitask; "
                             "give DIR alone")
        if self.init_heads and self.init == "random":
            raise ValueError("--init-heads with --init random: a trained head on a random "
                             "backbone; drop one of them")
        if self.schedule == "plateau" and self.dev is None and self.task != "multitask":
            raise ValueError("--schedule plateau follows the dev metric; give --dev, or another "
                             "--schedule")
        if self.early_stopping_patience is not None and self.dev is None and \
                self.task != "multitask":
            raise ValueError("--early-stopping-patience watches the dev metric; give --dev")
        if self.freeze_head and self.unfreeze_every is not None:
            raise ValueError("--freeze-head and --unfreeze-every contradict each other")
        if self.freeze_backbone and self.unfreeze_every is not None:
            raise ValueError("--freeze-backbone and --unfreeze-every contradict each other")
        if self.batch_size != "auto" and not (isinstance(self.batch_size, int)
                                               and self.batch_size >= 1):
            raise ValueError(f"--batch-size must be a positive integer or 'auto', "
                             f"not {self.batch_size!r}")
        if self.eval_batch_size < 1:
            raise ValueError(f"--eval-batch-size {self.eval_batch_size} must be at least 1")
        if self.grad_accum < 1:
            raise ValueError("--grad-accum must be at least 1")
        if self.effective_batch_size is not None:
            if self.effective_batch_size < 1:
                raise ValueError("--effective-batch-size must be at least 1")
            # a resolved config (RUN/config.json) holds all three, consistent; a user who gives
            # --grad-accum too must give a consistent one
            if self.grad_accum != 1 and self.batch_size != "auto" and \
                    self.batch_size * self.grad_accum * self.nproc != self.effective_batch_size:
                raise ValueError(f"--batch-size {self.batch_size} x --grad-accum "
                                 f"{self.grad_accum} x --nproc {self.nproc} != "
                                 f"--effective-batch-size "
                                 f"{self.effective_batch_size}; give --grad-accum or "
                                 "--effective-batch-size, not both")

    @property
    def metric_mode(self):
        return metric_mode(self.metric)


def batch_size_arg(s):
    """argparse type of --batch-size: a positive integer or the word 'auto'."""
    return "auto" if s == "auto" else int(s)
