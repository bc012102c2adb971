"""Training memory: what a fine-tuning step holds, estimated by formula and measured; and batch
planning (`--effective-batch-size`, `--batch-size auto`).

`minibert memory --model M --batch-size B --max-len T` prints, for fp32 training with AdamW:

    weights       4 bytes x every parameter
    gradients     4 bytes x trainable parameters (frozen ones get none)
    optimizer     2 x 4 bytes x trainable parameters (AdamW's m and v; train/loop/optim.py)
    activations   what autograd saves for backward, per block of post-LN BERT (below)
    peak          the larger of two moments of a step:
                  backward starts: weights + optimizer + activations + backward temporaries
                  optimizer step:  weights + optimizer + gradients + one param group's size

Gradients and activations are never all alive at once: gradients are allocated during backward
while activations are being freed, and set to None after each optimizer step. The backward
temporaries are the gradients of the top block's largest tensors; the optimizer's is the
`sqrt(v)` that the foreach AdamW (train/loop/optim.py) computes for a whole param group at once.

Activations per block, B x T tokens, C hidden, H = intermediate size, nh heads, fp32, derived
from what each op saves (checked op by op with torch.autograd.graph.saved_tensors_hooks):
    8 BTC  block input (qkv matmul), q/k/v (3, the matmuls' operands), attention output (proj
           input), residual sum before each LayerNorm (2), LayerNorm output (MLP input)
    2 BTH  GELU input and output (fc_out's input)
    attention, explicit softmax ("eager", and "sdpa" when torch falls back to its math kernel,
           which it does on CPU whenever attention dropout is on): the probabilities (B nh T T),
           plus with dropout the mask and the dropped probabilities: 3 (T, T) tensors per head
    attention, fused sdpa kernel: no (T, T) tensor, only a log-sum-exp per row (B nh T)
    dropout masks: 2 of (B, T, C) per block. On CPU torch multiplies by a float noise tensor
           (4 bytes per element); on CUDA it keeps a bool mask (1 byte).
plus the embeddings (LayerNorm input, dropout mask, the int64 ids). A frozen block keeps
none of it when nothing below it trains, and all but its linear layers' inputs (block input,
attention output unless a fused kernel keeps it, LayerNorm output, GELU output) when the
embeddings train: their gradient flows back through it.
Assumptions: fp32 everywhere, every sequence padded to T (the worst case), no activation
checkpointing; small tensors (LayerNorm statistics, the head's (B, C) vectors) are left out.

`--measure` runs two real training steps (forward, backward, AdamW step) on random tokens and
reports the peak of the second one (the first allocates AdamW's state, as every later step has
it). The measurement is exact, not RSS: on CUDA, torch.cuda.max_memory_allocated; on CPU, the
profiler's allocation events (profile_memory=True), summed in time order, give the live bytes
after each allocation and free; the peak of that sum plus what was alive before the step
(weights and optimizer state) is the step's peak. RSS would add the allocator's caching and the
Python heap, and only ever grows.
"""

import dataclasses
import math
import sys
from dataclasses import dataclass

import torch

from minibert.config import BertConfig
from minibert.model import BertEncoder
from train.command import check_range
from train.tasks.classification import ClassificationHead
from train.loop.device import run_state
from train.loop.optim import AdamW
from train.loop.params import LrPolicy, frozen_units, param_groups, set_trainable, units_top_down
from train.tasks.task import TaskModel

FP32 = 4


@dataclass
class Estimate:
    weights: int  # bytes
    gradients: int
    optimizer: int
    activations: int
    transient: int  # backward's largest temporaries, on top of the activations
    step_temp: int  # the optimizer step's temporary: the largest param group

    @property
    def peak(self):
        return self.weights + self.optimizer + max(self.activations + self.transient,
                                                   self.gradients + self.step_temp)


def build(cfg: BertConfig, n_labels, freeze_embeddings=False, freeze_layers=0,
          freeze_backbone=False, device="meta"):
    """A classification model laid out as `minibert finetune` builds it, with its trainable set.
    On the meta device it holds no memory: enough to count parameters."""
    with torch.device(device):
        bert = BertEncoder(cfg)
        model = TaskModel(bert, ClassificationHead(cfg.hidden_size, n_labels, "mean",
                                                   cfg.hidden_dropout_prob))
    n = cfg.num_hidden_layers
    trainable = set(units_top_down(n)) - frozen_units(n, freeze_embeddings, freeze_layers,
                                                      freeze_backbone)
    set_trainable(model, trainable)
    model.bert.pooler.requires_grad_(False)  # mean pooling never uses it, as in finetune
    return model, trainable


def activation_bytes(cfg: BertConfig, B, T, device_type="cpu", frozen_layers=0,
                     embeddings_frozen=False):
    """Bytes autograd saves for one training forward pass of B sequences of T tokens.

    Nothing below the lowest trainable parameter needs a gradient, so frozen bottom blocks under
    frozen embeddings save nothing; `frozen_layers` = L with them is a linear probe. Under
    trainable embeddings (--freeze-layers alone) the gradient flows back through the frozen
    blocks, which keep all but the inputs of their linear layers (only their weights' gradients
    need those; a fused attention kernel keeps its output, proj's input, for itself)."""
    C = cfg.hidden_size
    mask = FP32 if device_type == "cpu" else 1  # dropout mask element: float noise vs bool
    p_hid, p_att = cfg.hidden_dropout_prob > 0, cfg.attention_probs_dropout_prob > 0
    fused = cfg.attention != "eager" and (device_type == "cuda" or not p_att)
    BTC = B * T * C

    def block(layer):  # (all it saves, the inputs of its linear layers); a pruned layer is narrower
        nh, H = len(cfg.heads(layer)), cfg.ffn_size(layer)
        BTA, BTH, att = B * T * nh * cfg.head_size, B * T * H, B * nh * T * T
        saved = FP32 * (4 * BTC + 4 * BTA + 2 * BTH) + (2 * mask * BTC if p_hid else 0)  # q k v y
        if fused:
            saved += FP32 * B * nh * T  # log-sum-exp of each query row
        else:
            saved += FP32 * att + ((FP32 + mask) * att if p_att else 0)  # probs [+ mask, dropped]
        return saved, FP32 * (2 * BTC + (0 if fused else BTA) + BTH)  # qkv, fc_in, [proj,] fc_out
    embeddings = 0 if embeddings_frozen else \
        FP32 * BTC + (mask * BTC if p_hid else 0) + 2 * 8 * B * T  # + the int64 ids
    # the head keeps only (B, C)-sized tensors: mean pooling multiplies by a mask that needs no
    # gradient, so autograd saves the mask, not the last hidden state
    total = embeddings
    for layer in range(cfg.num_hidden_layers):
        saved, linear_inputs = block(layer)
        if layer >= frozen_layers:
            total += saved
        elif not embeddings_frozen:  # a frozen block the gradient still flows back through
            total += saved - linear_inputs
    return total


def transient_bytes(cfg: BertConfig, B, T):
    """The top block's backward allocates gradients of its largest tensors while all saved
    activations are still alive: two (B, T, H) in the MLP, or in the softmax backward the
    gradients of the probabilities and of the scores, two (B, nh, T, T)."""
    top = cfg.num_hidden_layers - 1
    fused = cfg.attention != "eager" and cfg.attention_probs_dropout_prob == 0
    att = 0 if fused else 2 * B * len(cfg.heads(top)) * T * T
    return FP32 * max(2 * B * T * cfg.ffn_size(top), att)


def estimate(cfg: BertConfig, B, T, n_labels=2, device_type="cpu", **freeze):
    model, trainable = build(cfg, n_labels, **freeze)
    frozen = set(units_top_down(cfg.num_hidden_layers)) - trainable
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    groups = param_groups(model, trainable, LrPolicy(1e-5))
    biggest = max(sum(p.numel() for p in g["params"]) for g in groups)
    return Estimate(weights=FP32 * n_all, gradients=FP32 * n_train, optimizer=2 * FP32 * n_train,
                    activations=activation_bytes(
                        cfg, B, T, device_type,
                        frozen_layers=sum(u.startswith("layer.") for u in frozen),
                        embeddings_frozen="embeddings" in frozen),
                    # a linear probe has no backward through the blocks
                    transient=transient_bytes(cfg, B, T) if trainable - {"head"} else 0,
                    step_temp=FP32 * biggest)


def _step(model, opt, batch):
    loss = model(batch)["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(cfg: BertConfig, B, T, n_labels=2, device="cpu", **freeze):
    """Peak bytes of one steady-state training step (see the module docstring). The random
    weights and batch come from a seeded generator; the caller's random state is left alone."""
    device = torch.device(device)
    with run_state(0, device=device):
        return _measure(cfg, B, T, n_labels, device, **freeze)


def _measure(cfg, B, T, n_labels, device, **freeze):
    model, trainable = build(cfg, n_labels, device=device, **freeze)
    model.train()
    # foreach=True as `minibert finetune` builds it: the step's temporaries depend on it
    opt = AdamW(param_groups(model, trainable, LrPolicy(1e-5)), lr=1e-5, foreach=True)
    batch = {"input_ids": torch.randint(1, cfg.vocab_size, (B, T), device=device),
             "attention_mask": torch.ones(B, T, dtype=torch.long, device=device),
             "token_type_ids": torch.zeros(B, T, dtype=torch.long, device=device),
             "labels": torch.randint(0, n_labels, (B,), device=device)}
    _step(model, opt, batch)  # allocates AdamW's state
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        _step(model, opt, batch)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    from torch.profiler import ProfilerActivity, profile
    before = sum(t.untyped_storage().nbytes() for t in model.parameters()) + sum(
        v.untyped_storage().nbytes() for s in opt.state.values() for v in s.values()
        if torch.is_tensor(v)) + sum(v.untyped_storage().nbytes() for v in batch.values())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(model, opt, batch)
    # kineto_results holds every [memory] event (prof.events() keeps only those it can attach
    # to an op); nbytes is + for an allocation and - for a free.
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return before + peak


def _mb(n):
    return f"{n / 2**20:10.1f} MB"


def cmd_memory(args):
    cfg = BertConfig.from_json(f"{args.model}/config.json")
    if args.attention:
        cfg = dataclasses.replace(cfg, attention=args.attention)
    freeze = dict(freeze_embeddings=args.freeze_embeddings, freeze_layers=args.freeze_layers,
                  freeze_backbone=args.freeze_backbone)
    dev = "cuda" if args.device == "cuda" else "cpu"
    for flag, n, low in (("--batch-size", args.batch_size, 1), ("--max-len", args.max_len, 1),
                         ("--labels", args.labels, 1)):
        if n is not None and n < low:
            raise SystemExit(f"minibert memory: {flag} {n} must be at least {low}")
    try:  # finetune's own check of the flag
        check_range("freeze_layers", args.freeze_layers)
    except ValueError as e:
        raise SystemExit(f"minibert memory: {e}") from None
    if args.max_len > cfg.max_position_embeddings:
        raise SystemExit(f"minibert memory: --max-len {args.max_len}: {args.model} has positions "
                         f"for {cfg.max_position_embeddings} tokens (max_position_embeddings)")
    if (args.freeze_layers or 0) > cfg.num_hidden_layers:
        raise SystemExit(f"minibert memory: --freeze-layers {args.freeze_layers}: {args.model} "
                         f"has {cfg.num_hidden_layers} blocks")
    if args.measure and dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("minibert memory: --measure --device cuda: no CUDA device here; drop "
                         "--measure for the estimate alone")
    if args.measure and cfg.attention.startswith("triton") and dev != "cuda":
        raise SystemExit(f"minibert memory: --measure --attention {cfg.attention} runs Triton "
                         "kernels, which need a CUDA GPU; drop --measure for the estimate alone")
    est = estimate(cfg, args.batch_size, args.max_len, args.labels, dev, **freeze)
    print(f"memory of one fp32 AdamW training step: {args.model}, batch {args.batch_size} x "
          f"{args.max_len} tokens, attention {cfg.attention}, {dev}", file=sys.stderr)
    rows = [("weights", est.weights), ("gradients", est.gradients),
            ("optimizer (AdamW m, v)", est.optimizer), ("activations", est.activations),
            ("backward temporaries", est.transient), ("optimizer temporaries", est.step_temp),
            ("estimated peak", est.peak)]
    if args.measure:
        rows.append(("measured peak", measure(cfg, args.batch_size, args.max_len, args.labels,
                                              dev, **freeze)))
    for name, n in rows:
        print(f"{name:24s} {_mb(n)}")
    if args.measure:
        print(f"{'estimate / measured':24s} {est.peak / rows[-1][1]:13.3f}")


# ---------------------------------------------------------------------------- batch planning
def plan_accumulation(effective, max_batch):
    """(micro-batch, accumulation) with micro-batch x accumulation == effective exactly: the
    largest micro-batch <= max_batch that divides `effective`. (A remainder would make the last
    micro-batch smaller, and the trainer weights micro-batches by size, so it would still be
    correct; an exact split keeps every step the same shape.)"""
    if effective < 1 or max_batch < 1:
        raise ValueError("--effective-batch-size and --batch-size must be at least 1")
    batch = max(d for d in range(1, min(effective, max_batch) + 1) if effective % d == 0)
    return batch, effective // batch


def largest_fitting(fits, limit):
    """The largest n in [1, limit] with fits(n), for a fits() that is monotone (fits for all n
    below some threshold): double until it fails, then bisect. 0 if even n = 1 fails."""
    lo, hi = 0, 1  # fits(lo) is known true (0 trivially); hi is the next candidate
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)  # fits(hi) false, or past the limit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# Keep 10% below the largest batch that fitted: later batches can be longer in padding, and the
# allocator fragments over a run.
AUTO_MARGIN = 0.9


def auto_batch_size(model, optimizer, make_batch, device, limit):
    """Largest micro-batch that survives a real training step (worst-case batch from
    make_batch(n)), times AUTO_MARGIN. The probe steps run with lr 0, so the weights do not move;
    AdamW's state and the RNG are reset afterwards, so training starts as it would have."""
    if device.type != "cuda":
        raise ValueError("--batch-size auto measures GPU memory and needs a CUDA device; on CPU "
                         "choose --batch-size yourself (`minibert memory` estimates it)")
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0

    def fits(n):
        try:
            _step(model, optimizer, {k: v.to(device) for k, v in make_batch(n).items()})
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    model.train()
    with torch.random.fork_rng(devices=[device]):  # dropout in the probes draws nothing of ours
        n = largest_fitting(fits, limit)
    optimizer.state.clear()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    torch.cuda.reset_peak_memory_stats(device)
    if n == 0:
        raise ValueError("--batch-size auto: not even one example fits in GPU memory")
    return max(1, math.floor(AUTO_MARGIN * n))


def register(sub):
    p = sub.add_parser("memory", help="estimate (and measure) the memory of a training step")
    p.add_argument("--model", required=True, help="checkpoint directory (its config.json)")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--max-len", type=int, required=True, help="tokens per sequence (padded)")
    p.add_argument("--labels", type=int, default=2, help="classes of the head")
    p.add_argument("--attention", default=None, choices=("eager", "sdpa", "triton"),
                   help="attention implementation (default: the checkpoint's)")
    p.add_argument("--freeze-embeddings", action="store_true")
    p.add_argument("--freeze-layers", type=int, default=0)
    p.add_argument("--freeze-backbone", action="store_true")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="where it runs: sets the dropout mask size and --measure's device")
    p.add_argument("--measure", action="store_true",
                   help="also run real training steps and print the measured peak")
    p.set_defaults(func=cmd_memory)
