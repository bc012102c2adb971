"""The pretraining config: every flag of `minibert pretrain`, each default with its reason, and
the table of model sizes `--config` names.

The sizes are Google's compact BERTs (Turc et al. 2019, "Well-Read Students Learn Better",
github.com/google-research/bert): heads = hidden / 64 and an MLP 4x the hidden size, as in BERT.
The recipe is BERT's masked-LM objective (Devlin et al. 2019) with two later findings: RoBERTa's
dynamic masking and FULL-SENTENCES packing (Liu et al. 2019), and no next-sentence prediction.

Limits: the defaults are tuned for a tiny model on a few million words on a CPU in under half an
hour (see the lr comment); a base-size model wants a lower lr and far more steps.
"""

import os
from dataclasses import dataclass

from train.command import absolute, check_ranges, option

from minibert.config import BertConfig
from minibert.errors import UserError



# name -> (layers, hidden). nh = hidden / 64 keeps BERT's head size of 64 at every width.
SIZES = {
    "tiny": (2, 128),
    "mini": (4, 256),
    "small": (4, 512),
    "medium": (8, 512),
    "base": (12, 768),
}


def model_config(name_or_path, vocab_size, max_len, attention, pad_token_id):
    """A BertConfig from a size name or a config.json path; the vocabulary always comes from the
    tokenizer, so a config.json whose vocab_size disagrees is an error, not a silent resize."""
    if name_or_path in SIZES:
        layers, hidden = SIZES[name_or_path]
        return BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=hidden // 64, intermediate_size=4 * hidden,
                          # positions up to 512 as in BERT, even when we train at 128: the
                          # checkpoint then accepts longer inputs at fine-tuning time
                          max_position_embeddings=max(512, max_len), attention=attention,
                          pad_token_id=pad_token_id)
    cfg = config_file(name_or_path, max_len)
    if cfg.vocab_size != vocab_size:
        raise ValueError(f"{name_or_path}: vocab_size={cfg.vocab_size} but the tokenizer has "
                         f"{vocab_size} tokens")
    return BertConfig(**{**cfg.__dict__, "attention": attention})


def config_file(path, max_len):
    """The BertConfig of a --config that names a config.json (not a size), with positions for
    --max-len tokens; checked before the tokenizer and the token cache are made."""
    if not os.path.isfile(path):
        raise ValueError(f"--config {path!r}: neither a size ({', '.join(SIZES)}) nor an "
                         "existing config.json")
    cfg = BertConfig.from_json(path)
    check_positions(max_len, cfg, path)
    return cfg


def check_positions(max_len, config, where):
    """--max-len must fit the positions of the model `where` (a config.json, a checkpoint)."""
    if max_len > config.max_position_embeddings:
        raise UserError(f"--max-len {max_len}: {where} has positions for "
                        f"{config.max_position_embeddings} tokens (max_position_embeddings); "
                        "give at most that")


@dataclass
class PretrainConfig:
    # data
    corpus: list[str] = option(None, "training text files, one document per line", path=True)
    valid: str | None = option(None, "validation text (same format): loss, perplexity, accuracy",
                               path=True)
    out: str = option("runs/pretrain", "run directory", path=True)
    cache_dir: str | None = option(None, "where token caches go (default: $MINIBERT_CACHE/tokens, "
                                         "else ~/.cache/minibert/tokens)", path=True)
    max_len: int = option(128, "tokens per packed sequence, [CLS] and [SEP] included (BERT spent "
                          "90% of its steps at 128)")
    # tokenizer and model
    tokenizer: str | None = option(None, "reuse this tokenizer directory (e.g. "
                                   "weights/minilm-l6); default: train a WordPiece one on the "
                                   "corpus into RUN/tokenizer", path=True)
    vocab_size: int = option(16384, "size of the tokenizer trained when --tokenizer is not given; "
                             "a small model spends fewer parameters on a small vocabulary")
    config: str | None = option(None, "model size (tiny, mini, small, medium, base) or a "
                                "config.json; required unless --init-from",
                                path=lambda s: s if s in SIZES else absolute(s))
    init_from: str | None = option(None, "continue pretraining this checkpoint (and its "
                                   "tokenizer), e.g. weights/minilm-l6 for domain adaptation",
                                   spelled="--model", path=True)
    attention: str = option("sdpa", "attention implementation",
                            choices=("eager", "sdpa", "triton", "triton-varlen"))
    # masking
    mask_prob: float = option(0.15, "fraction of tokens to predict; BERT's 0.15 (MosaicBERT, "
                              "Portes et al. 2023, found 0.30 better for BERT-base)")
    whole_word_mask: bool = option(False, "mask every piece of a word together (pieces starting "
                                   "with ## belong to the word before)")
    # optimisation
    max_steps: int | None = option(None, "stop after this many optimizer steps (overrides epochs)")
    max_minutes: float | None = option(None, "wall-time budget: stop, evaluate and save after M "
                                       "min")
    epochs: int = option(10, "passes over the packed corpus, when --max-steps is not given")
    batch_size: int = option(64, "sequences per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(1e-3, "peak learning rate; small BERTs take large ones (tiny/mini: 1e-3 "
                       "trains fast and stably with warm-up; BERT-base used 1e-4)")
    weight_decay: float = option(0.01, "decoupled weight decay (BERT's); never on 1-D params")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.98, "AdamW beta2: RoBERTa's 0.98 is steadier than 0.999 at large "
                               "lr")
    adam_eps: float = option(1e-6, "AdamW epsilon (BERT and RoBERTa: 1e-6)")
    schedule: str = option("linear", "lr after warm-up: linear or cosine decay to 0",
                           choices=("linear", "cosine"))
    warmup_steps: int | None = option(None, "warm-up steps (overrides --warmup-ratio)")
    warmup_ratio: float = option(0.06, "warm-up as a fraction of the steps (RoBERTa: 6%)")
    clip_grad_norm: float | None = option(1.0, "clip the global gradient norm ('none': off)")
    dropout: float = option(0.1, "hidden and attention dropout (BERT's)")
    seed: int = option(0, "seeds the weights, the data order, the masking and dropout")
    # evaluation and bookkeeping
    eval_every: int | None = option(500, "evaluate on --valid every N steps (and at each epoch "
                                    "end)")
    eval_max_sequences: int = option(1024, "evaluate on at most this many packed valid sequences "
                                     "(the first ones: the same every time)")
    eval_batch_size: int = option(128, "sequences per evaluation batch")
    log_every: int = option(50, "log loss, lr, tokens/s and memory every N steps")
    save_every: int | None = option(None, "also save resume state every N steps (always at evals)")
    precision: str = option("auto", "autocast dtype: auto = bf16 on CUDA and on CPUs with bf16 "
                            "instructions (AVX512-BF16, AMX), where it pays most with --compile; "
                            "else fp32; fp16 adds a gradient scaler",
                            choices=("auto", "fp32", "bf16", "fp16"))
    peak_tflops: float | None = option(None, "peak dense TFLOP/s of the GPU for model FLOPs "
                                       "utilisation (default: looked up from the GPU's name)")
    device: str = option("auto", "cpu, cuda, or auto")
    threads: int | None = option(None, "CPU threads for torch (default: torch's choice)")
    nproc: int = option(1, "data-parallel processes: N > 1 relaunches the command under torchrun "
                        "(one per GPU; gloo on CPU); --batch-size is per process")
    compile: bool = option(False, "torch.compile the model for training (the first steps compile)")

    def __post_init__(self):
        if self.epochs < 1 or self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--epochs {self.epochs}, --max-steps {self.max_steps}: each must be "
                             "at least 1")
        if isinstance(self.corpus, str):
            self.corpus = [self.corpus]
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"--mask-prob {self.mask_prob} must be in (0, 1)")
        if self.max_len < 8:
            raise ValueError(f"--max-len {self.max_len} is too short to hold [CLS] text [SEP]")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("--batch-size and --grad-accum must be at least 1")
        if self.log_every < 1:
            raise ValueError(f"--log-every {self.log_every} must be at least 1")
        if self.eval_batch_size < 1 or self.eval_max_sequences < 1:
            raise ValueError("--eval-batch-size and --eval-max-sequences must be at least 1")
        check_ranges(self)  # lr, weight decay, AdamW, warm-up, clipping (train/command.py)
        if self.init_from and self.config:
            raise ValueError("--init-from takes the architecture from its checkpoint; "
                             "drop --config")
        if self.init_from and self.tokenizer:
            raise ValueError("--init-from uses the checkpoint's own tokenizer; drop --tokenizer")
