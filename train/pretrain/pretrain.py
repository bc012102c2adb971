"""`minibert pretrain`: masked-language-model pretraining, from scratch or continued.

Reads top to bottom: device and seed -> tokenizer (given, the checkpoint's, or trained on the
corpus) -> token cache and packing (train/pretrain/corpus.py) -> model (a size from
train/pretrain/config.py, or --init-from a checkpoint) -> AdamW and warm-up + decay -> the generic
Trainer (train/loop/trainer.py) -> results with the best checkpoint.

The objective is BERT's masked LM without next-sentence prediction (RoBERTa showed NSP does not
help), with dynamic masking and sparse prediction (pretrain/masking.py). `RUN/best/` is a Hugging
Face `BertForMaskedLM` checkpoint, so `transformers`, `minibert finetune` and `minibert fill-mask`
read it as is.

Precision and scale as in fine-tuning: `--precision auto` is bf16 autocast on CUDA and on a CPU
with bf16 instructions, and `--nproc N` runs data-parallel. Model FLOPs utilisation counts 6 N
per token for the matmuls (N = non-embedding parameters, plus the decoder at masked positions
only) and leaves out attention's T^2 term, as the PaLM paper's simple form does, so it slightly
understates.
"""

import dataclasses
import functools
import math
import os
import sys

import torch
import torch.nn as nn

from minibert.checkpoint import check_vocabulary, has_pooler, load_model, save_model
from minibert.config import BertConfig
from minibert.errors import UserError
from minibert.model import BertForMLM
from minibert.tokenizer import Tokenizer
from train.command import add_dataclass_flags
from train.pretrain.masking import Masker, mlm_loss_sparse
from train.pretrain.corpus import BatchIndices, MLMData, load_corpus
from train.loop.optim import AdamW
from train.loop.params import decays
from train.pretrain.config import (SIZES, PretrainConfig, check_positions, config_file,
                                   model_config)
from train.loop.rundir import RunDir
from train.loop.schedules import LambdaSchedule, lr_multiplier
from train.pretrain.tokenizer import train_tokenizer
from train.loop.device import OutOfMemory, autocast, grad_scaler
from train.loop.launch import command, open_run, run_in_state
from train.loop.trainer import Diverged, LoopSettings, Trainer, plan_steps

# Dense bf16 peak of the GPUs we expect, TFLOP/s (vendor datasheets, without sparsity).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0}


class MLMObjective(nn.Module):
    """What the trainer calls: `objective(batch)` -> {"loss"}, the masked-LM loss of a batch.

    It wraps a BertForMLM and knows nothing of the trainer. Precision is not its business: the
    trainer runs every forward under the run's autocast (train/loop/device.py)."""

    def __init__(self, mlm: BertForMLM):
        super().__init__()
        self.mlm = mlm

    def forward(self, batch):
        loss, correct, n = mlm_loss_sparse(self.mlm, batch["input_ids"], batch["attention_mask"],
                                           batch["labels"])
        return {"loss": loss, "correct": correct, "n_predicted": n}


@torch.no_grad()
def evaluate(objective, batches, device):
    """Masked-LM loss (mean over every masked token), perplexity and accuracy on fixed batches."""
    objective.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for b in batches:
        out = objective({k: v.to(device) for k, v in b.items()})
        loss_sum += out["loss"].item() * out["n_predicted"]
        correct += int(out["correct"])
        n += out["n_predicted"]
    loss = loss_sum / max(n, 1)
    return {"loss": loss, "mlm_loss": loss, "perplexity": math.exp(min(loss, 50.0)),
            "mlm_accuracy": correct / max(n, 1), "n_predicted": n}


def fixed_eval_batches(data: MLMData, max_sequences, batch_size):
    """Valid batches masked once (the data's seed, 'epoch' -1): every evaluation of the run sees
    the same masked positions and replacements, so its numbers compare across steps."""
    n = min(len(data), max_sequences)
    return [data.collate(BatchIndices(range(i, min(i + batch_size, n)), -1, b))
            for b, i in enumerate(range(0, n, batch_size))]


def get_tokenizer(cfg: PretrainConfig, run: RunDir, fresh=False):
    """The checkpoint's, --tokenizer's, or one trained on the corpus into RUN/tokenizer/: trained
    anew by a `fresh` run (one a killed attempt left there belongs to another config), read back
    on resume and by the other ranks."""
    if cfg.init_from:
        return Tokenizer.from_dir(cfg.init_from)
    if cfg.tokenizer:
        return Tokenizer.from_dir(cfg.tokenizer)
    d = run.file("tokenizer")
    if fresh or not os.path.exists(os.path.join(d, "tokenizer.json")):
        print(f"training a {cfg.vocab_size}-token WordPiece tokenizer on the corpus -> {d}",
              file=sys.stderr)
        train_tokenizer(cfg.corpus, cfg.vocab_size).save(d)
    return Tokenizer.from_dir(d)  # read back, so a resumed run uses the same file


def build_model(cfg: PretrainConfig, tok):
    if cfg.init_from:
        # a checkpoint without an MLM head (MiniLM) gets a fresh one, and the notes say so
        notes = []
        mlm = load_model(cfg.init_from, with_head=True, allow_missing_head=True, notes=notes,
                         attention=cfg.attention, hidden_dropout_prob=cfg.dropout,
                         attention_probs_dropout_prob=cfg.dropout)
        for n in notes:
            print(f"init: {n}", file=sys.stderr)
        check_vocabulary(mlm.config, tok, cfg.init_from)
        check_positions(cfg.max_len, mlm.config, cfg.init_from)
        return mlm
    mc = model_config(cfg.config, tok.vocab_size, cfg.max_len, cfg.attention, tok.pad_id)
    mc = dataclasses.replace(mc, hidden_dropout_prob=cfg.dropout,
                             attention_probs_dropout_prob=cfg.dropout)
    return BertForMLM(mc)  # BERT's init: N(0, 0.02), zero biases, unit LayerNorm, tied decoder


def param_groups(model, weight_decay):
    """Two groups, by the weight-decay rule of fine-tuning (`decays`). parameters() lists the
    tied decoder weight once."""
    decay = [p for p in model.parameters() if decays(p)]
    no_decay = [p for p in model.parameters() if not decays(p)]
    return [{"params": decay, "name": "decay", "weight_decay": weight_decay},
            {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}]


def flops_per_token(mlm: BertForMLM, mask_prob):
    """6 N: 2 for the forward multiply-add and 4 for the backward, per matmul weight per token."""
    c = mlm.config
    emb = sum(p.numel() for p in mlm.bert.embeddings.parameters())  # lookups: no matmul
    n_dense = sum(p.numel() for p in mlm.parameters()) - emb  # decoder weight is counted in emb
    return 6 * (n_dense + mask_prob * c.vocab_size * c.hidden_size)


def run_pretrain(cfg: PretrainConfig, resume=False, dist=None):
    """Pretrain as `cfg` says; returns results.json's content (None on ranks other than 0).

    `dist` is this process's place in a data-parallel job (train/loop/distributed.py); None:
    one process. The run seeds torch and sets its thread count for its own duration only."""
    return run_in_state(_pretrain, cfg, resume, dist)


def _pretrain(cfg, resume, dist):
    device = dist.device
    cfg, run, precision, amp = open_run(cfg, dist, resume, "pretrain config")

    with dist.main_first():  # rank 0 may train and save the tokenizer; the others read it
        tok = get_tokenizer(cfg, run, fresh=not resume and dist.is_main)
    print(f"tokenizer: {tok.source} ({tok.vocab_size} tokens)", file=sys.stderr)
    given = cfg.vocab_size != PretrainConfig.vocab_size  # the size of a tokenizer trained here
    if (cfg.init_from or cfg.tokenizer) and given and cfg.vocab_size != tok.vocab_size:
        print(f"note: --vocab-size {cfg.vocab_size} sizes a tokenizer trained on the corpus; "
              f"{'--init-from' if cfg.init_from else '--tokenizer'} brings its own; it is ignored",
              file=sys.stderr)
    vocab = [tok.id_to_token(i) for i in range(tok.vocab_size)]
    masker = Masker(vocab, tok.special_ids, tok.mask_id, cfg.mask_prob, cfg.whole_word_mask)
    with dist.main_first():  # rank 0 writes the token caches; the others read them
        train = MLMData(load_corpus(cfg.corpus, tok, cfg.max_len, cfg.cache_dir, sys.stderr),
                        cfg.batch_size, cfg.seed, masker, tok.pad_id)
    # the order is drawn in global micro-batches, batch x processes; each rank takes its share
    train.batch_size = cfg.batch_size * dist.world
    print(f"train: {len(train):,} packed sequences of {cfg.max_len}", file=sys.stderr)
    eval_batches = []
    if cfg.valid:
        with dist.main_first():
            valid = MLMData(load_corpus([cfg.valid], tok, cfg.max_len, cfg.cache_dir,
                                        sys.stderr),
                            cfg.eval_batch_size, cfg.seed, masker, tok.pad_id, shuffle=False)
        eval_batches = fixed_eval_batches(valid, cfg.eval_max_sequences, cfg.eval_batch_size)
        if not any(MLMData.count_items(b) for b in eval_batches):  # loss 0, perplexity 1: nonsense
            raise UserError(f"--valid {cfg.valid}: no token was chosen for prediction in it; give "
                            "a longer validation text (or a larger --mask-prob)")

    mlm = build_model(cfg, tok)
    n_params = sum(p.numel() for p in mlm.parameters())
    c = mlm.config
    print(f"model: {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} "
          f"heads, vocab {c.vocab_size}: {n_params:,} parameters", file=sys.stderr)
    objective = MLMObjective(mlm).to(device)
    optimizer = AdamW(param_groups(objective, cfg.weight_decay), lr=cfg.lr,
                      betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, foreach=None)
    print(f"optimizer: AdamW, foreach={optimizer.foreach}", file=sys.stderr)

    _, total = plan_steps(len(train.batches(0)), cfg.grad_accum, cfg.epochs, cfg.max_steps)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * total)
    print(f"schedule: {warmup} warm-up steps, then {cfg.schedule} decay to step {total}",
          file=sys.stderr)
    schedule = LambdaSchedule(optimizer, functools.partial(
        lr_multiplier, kind=cfg.schedule, warmup_steps=warmup, total_steps=total))

    settings = LoopSettings(cfg.epochs, cfg.max_steps, cfg.grad_accum, cfg.clip_grad_norm,
                            cfg.eval_every, cfg.log_every, "loss", "min", None, cfg.save_every,
                            max_minutes=cfg.max_minutes, autocast=amp)
    # no --valid: the trainer keeps the last model as best/
    evaluate_fn = functools.partial(evaluate, batches=eval_batches, device=device) \
        if eval_batches else None
    if dist.world > 1:
        # the MLM loss never reaches the pooler; DDP insists that every trained parameter gets
        # a gradient in each step (one process simply never updates it)
        mlm.bert.pooler.requires_grad_(False)
    net = dist.wrap(objective, compile=cfg.compile)
    dist.seed_per_rank(cfg.seed)
    # best/ keeps a pooler only where one was loaded: MLM never trains it
    keep_pooler = bool(cfg.init_from) and has_pooler(cfg.init_from)
    trainer = Trainer(objective, optimizer, schedule, train, evaluate_fn, run, settings, device,
                      save_best=lambda d: save_model(mlm, d, tok, pooler=keep_pooler),
                      dist=dist, net=net,
                      scaler=grad_scaler(precision, device), log=sys.stderr)
    if resume:
        trainer.load_state()
    try:
        summary = trainer.fit()
    except (Diverged, OutOfMemory) as e:
        if isinstance(e, OutOfMemory) and not dist.is_main:
            raise  # one rank's own failure, which the others did not share: named by session()
        raise SystemExit(f"minibert pretrain: {e}") from None
    if not dist.is_main:
        return None  # the final evaluation and results.json are rank 0's

    # throughput: the mean of the trainer's logged intervals (each a wall-clock window)
    speeds = [e["tokens_per_second"] for e in run.events
              if e.get("event") == "train" and "tokens_per_second" in e]
    tps = sum(speeds) / len(speeds) if speeds else 0.0
    results = {"steps": summary["steps"], "best_step": summary["best_step"],
               "train_seconds": summary["train_seconds"], "tokens_per_second": round(tps, 1)}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = cfg.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        if peak:
            results["mfu"] = round(flops_per_token(mlm, cfg.mask_prob) * tps / (peak * 1e12), 4)
            print(f"model FLOPs utilisation: {100 * results['mfu']:.1f}% of {peak} TFLOP/s "
                  f"({name})", file=sys.stderr)
        else:
            print(f"model FLOPs utilisation: unknown peak for {name}; pass --peak-tflops",
                  file=sys.stderr)
    best_dir = run.find_dir("best")
    if best_dir and eval_batches:
        # re-read what was written: the numbers describe the checkpoint a user will load
        best = MLMObjective(load_model(best_dir, with_head=True, attention=cfg.attention))
        with autocast(device, amp):  # as the evaluations during training
            m = evaluate(best.to(device), eval_batches, device)
        results["valid"] = {k: m[k] for k in ("mlm_loss", "perplexity", "mlm_accuracy")}
        print(f"valid (best checkpoint, step {summary['best_step']}): " + ", ".join(
            f"{k} {v:.4f}" for k, v in results["valid"].items()), file=sys.stderr)
    print(f"tokens/s: {tps:,.0f}, train seconds: {summary['train_seconds']}", file=sys.stderr)
    run.write_json("results.json", results)
    print(f"results: {run.file('results.json')}; checkpoint: {best_dir}", file=sys.stderr)
    return results


def required_inputs(cfg):
    if not cfg.corpus:
        raise ValueError("--corpus is required")
    if not cfg.config and not cfg.init_from:
        raise ValueError("give --config (tiny, mini, small, medium, base or a config.json) "
                         "or --init-from a checkpoint")
    # before the tokenizer and the token cache are made, which take minutes on a real corpus
    for flag, path in [("--corpus", p) for p in cfg.corpus] + [("--valid", cfg.valid)]:
        if path is not None and os.path.isdir(path):
            raise ValueError(f"{flag} {path}: a directory; give its files, e.g. {path}/*.txt")
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"{flag} {path}: no such file")
    if cfg.config and cfg.config not in SIZES:
        config_file(cfg.config, cfg.max_len)
    if cfg.init_from and os.path.isfile(os.path.join(cfg.init_from, "config.json")):
        check_positions(cfg.max_len, BertConfig.from_json(os.path.join(cfg.init_from,
                                                                        "config.json")),
                        cfg.init_from)


def cmd_pretrain(args):
    return command(args, "pretrain", PretrainConfig, run_pretrain, check=required_inputs)


def register(sub):
    p = sub.add_parser("pretrain", help="masked-language-model pretraining on your own text")
    add_dataclass_flags(p, PretrainConfig, skip=("corpus",))
    p.add_argument("--corpus", nargs="+", default=None, help="text files, one document a line")
    p.add_argument("--resume", metavar="RUN", default=None,
                   help="continue the killed run in RUN with its saved config and state")
    p.set_defaults(func=cmd_pretrain)
