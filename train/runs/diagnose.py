"""Read a run's learning curves and name what happened: healthy, overfitting, underfitting,
diverging (including catastrophic forgetting) or stalled, with the numbers and what to try next.

`minibert finetune` calls `write_diagnosis(RUN)` when it ends (also when it diverged): the text
goes to stderr, the same content as JSON to RUN/diagnosis.json. `minibert diagnose RUN` prints
it again (`--json`: the JSON on stdout). Everything is read from RUN/metrics.jsonl (the events
written by train/loop/trainer.py), RUN/config.json and RUN/best/task.json, so pretraining runs that
log the same events are diagnosed by the same code.

The rules follow the usual reading of learning curves (e.g. Goodfellow et al., "Deep Learning",
ch. 11.4; Karpathy, "A Recipe for Training Neural Networks", 2019). Each rule is a function that
returns a Finding or None; they are tried in order of severity and the first one that fires is
the verdict, the others are listed as "also". The thresholds are the constants below, each with
its reason. Known limits: a curve with fewer than 3 train logs or 3 evaluations says little, and
the rules that need it then stay silent; "chance level" needs the number of labels, which a
pretraining run does not record, and a per-example loss, which a CRF's sentence NLL is not, so the
chance-based rules are skipped there. A distillation run is judged on its hard term (see curves).
"""

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field

from minibert.commands import int_at_least
from train.runs.curves import (at_chance_on_dev, backbone_peak_lr, best_eval, dev_vs_chance,
                               late_mean, load_curves, metric_noise, smooth, warmup_end)

# A train loss >= 85% of chance (ln K for K labels) means the model barely beats guessing the
# label prior: after a full run that is either forgetting (high lr) or no learning at all.
NEAR_CHANCE = 0.85
# Underfitting by "high and flat": still above half of chance and improving < 5% over the second
# half of the run. A fitted binary classifier on sentences ends well below 0.35 nats.
HIGH_LOSS = 0.5
FLAT_IMPROVEMENT = 0.05
# Loss rising without NaN: the smoothed train loss ends >= 1.3x its smoothed minimum and at least
# 0.05 nats above it (so that a loss going from 0.01 to 0.02 is not called divergence).
RISE_FACTOR = 1.3
RISE_MIN_NATS = 0.05
# A backbone lr >= 3e-4 is 6x the top of BERT's recipe (2e-5..5e-5, Devlin et al. 2019, A.3);
# at such rates pretrained features are overwritten (Mosbach et al. 2021, "On the stability of
# fine-tuning BERT"). Only used to tell forgetting from plain underfitting.
HIGH_BACKBONE_LR = 3e-4
# Overfitting: the dev loss ends >= 10% above its minimum while the train loss kept falling, and
# the dev metric also got worse by more than its noise; or the dev loss rose by >= 50%, which
# is overfitting whatever the metric does (the model is confidently wrong on more examples).
OVERFIT_RISE = 0.10
OVERFIT_SEVERE_RISE = 0.50
# Stalled: the lr stayed below 5% of its peak for >= 20% of the run and the dev metric did not
# improve there. A linear decay to 0 spends only the last ~5% below that line, so it passes.
TINY_LR = 0.05
STALL_FRACTION = 0.2


@dataclass
class Finding:
    verdict: str  # healthy, overfitting, underfitting, diverging or stalled
    headline: str
    evidence: list = field(default_factory=list)
    advice: list = field(default_factory=list)


# ------------------------------------------------------------------------------ the rules
def rule_nonfinite(c):
    if c.diverged is None:
        return None
    d = c.diverged
    lr = max(d["lr"].values()) if d.get("lr") else float("nan")
    ev = [f"loss became {d.get('loss')} at step {d['step']} (largest group lr {lr:.2e})"]
    if c.train_loss:
        ev.append(f"last logged train loss {c.train_loss[-1]:.4f} at step {c.train_steps[-1]}")
    if c.eval_steps:
        b = best_eval(c)
        ev.append(f"best dev {c.metric} {c.dev_metric[b]:.4f} at step {c.eval_steps[b]} "
                  "(kept in best/)")
    advice = ["lower the learning rate (3-10x)", "use a longer warm-up (--warmup-ratio 0.1+)"]
    if not c.config.get("clip_grad_norm"):
        advice.append("clip gradients (--clip-grad-norm 1.0)")
    return Finding("diverging", f"the loss became non-finite at step {d['step']}", ev, advice)


def _flat_gain(xs):
    """Relative improvement of the train loss over the second half of the run."""
    half = xs[len(xs) // 2:]
    return (half[0] - late_mean(xs)) / max(abs(half[0]), 1e-12)


def rule_forgetting(c):
    """A pretrained backbone trained at a high lr loses what it knew: the loss goes up to (or
    stays at) chance after warm-up; or, partly, it stays high and flat. (At a moderate lr the
    same curves are underfitting, see rule_underfitting.)"""
    if c.chance_loss is None or len(c.train_loss) < 3:
        return None
    w = warmup_end(c)
    late = late_mean(c.train_loss[w:] or c.train_loss[-1:])
    lowest = min(c.train_loss)
    went_up = lowest < NEAR_CHANCE * late  # it had learned something, then lost it
    lr = backbone_peak_lr(c)
    high_lr = lr >= HIGH_BACKBONE_LR and c.config.get("init", "pretrained") == "pretrained"
    ev = [f"train loss {late:.4f} over the end of the run vs chance ln {c.n_labels} = "
          f"{c.chance_loss:.4f} ({late / c.chance_loss:.0%}); warm-up ended at step "
          f"{c.train_steps[w]}",
          f"lowest train log {lowest:.4f} at step {c.train_steps[c.train_loss.index(lowest)]}",
          f"backbone peak lr {lr:.2e} (BERT's recipe: 2e-5..5e-5)"]
    if c.dev_metric:
        ev.append(dev_vs_chance(c))
    if late >= NEAR_CHANCE * c.chance_loss and at_chance_on_dev(c) is not False \
            and (went_up or high_lr):
        how = "went up to" if went_up else "stayed at"
        headline = f"the loss {how} chance level after warm-up: catastrophic forgetting"
    elif high_lr and late >= HIGH_LOSS * c.chance_loss and \
            _flat_gain(c.train_loss) < FLAT_IMPROVEMENT:
        headline = (f"the train loss is stuck at {late / c.chance_loss:.0%} of chance with a "
                    "backbone lr far above the recipe: partial catastrophic forgetting")
    else:
        return None
    return Finding("diverging", headline, ev, [
        f"lower the learning rate of the backbone (--lr 2e-5..5e-5; it was {lr:.0e})",
        "keep a higher lr only for the new head (--lr-head)",
        "or freeze the lower layers (--freeze-layers) to protect pretrained features"])


def rule_rising(c):
    """Train loss going up (after warm-up) without becoming NaN. A log that averages far fewer
    steps than the others (an epoch's last few, cut short) cannot be the minimum the loss rose
    from: on a short run one such log, low by chance, passed for it."""
    if len(c.train_loss) < 3:
        return None
    off = warmup_end(c)
    idx = list(range(off, len(c.train_loss))) or list(range(len(c.train_loss)))
    spans = [b - a for a, b in zip([0] + c.train_steps, c.train_steps)]  # steps each log averages
    typical = sorted(spans)[len(spans) // 2]
    sm = smooth([c.train_loss[i] for i in idx])
    w = len(idx) - len(sm) + 1  # smooth's window
    full = [(j, v) for j, v in sm if any(2 * spans[idx[k]] >= typical for k in range(j - w + 1,
                                                                                   j + 1))]
    j_min, lo = min(full or sm, key=lambda t: t[1])
    end = sm[-1][1]
    if end < RISE_FACTOR * lo or end - lo < RISE_MIN_NATS:
        return None
    return Finding("diverging", "the train loss is rising", [
        f"smoothed train loss rose from {lo:.4f} (around step {c.train_steps[idx[j_min]]}) to "
        f"{end:.4f} at the end (x{end / lo:.2f})"],
        ["lower the learning rate", "use a longer warm-up or gradient clipping"])


def rule_underfitting(c):
    if len(c.train_loss) < 3:
        return None
    late, gain = late_mean(c.train_loss), _flat_gain(c.train_loss)
    ev, why = [], None
    if c.chance_loss is not None:
        ev.append(f"train loss {late:.4f} at the end vs chance ln {c.n_labels} = "
                  f"{c.chance_loss:.4f} ({late / c.chance_loss:.0%} of chance)")
        if late >= NEAR_CHANCE * c.chance_loss:
            why = "the train loss is near chance level"
        elif late >= HIGH_LOSS * c.chance_loss and gain < FLAT_IMPROVEMENT:
            why = "the train loss is high and flat"
    if why is None and at_chance_on_dev(c):
        why = "the dev metric is at chance level"
    if why is None:
        return None
    how = f"fell {gain:.1%}" if gain > 0 else f"rose {-gain:.1%}" if gain < 0 else "stayed flat"
    ev.append(f"train loss {how} over the second half of the run")
    if c.dev_metric:
        ev.append(dev_vs_chance(c))
    cfg, advice = c.config, ["train longer (more --epochs or --max-steps)"]
    if cfg.get("freeze_backbone") or cfg.get("freeze_layers") or cfg.get("freeze_embeddings"):
        advice.append("unfreeze more layers (drop --freeze-backbone, lower --freeze-layers)")
    if backbone_peak_lr(c) < 1e-5:
        advice.append("raise the learning rate (BERT's recipe: 2e-5..5e-5)")
    if cfg.get("init") == "random":
        advice.append("start from pretrained weights (--init pretrained)")
    return Finding("underfitting", why, ev, advice)


def rule_overfitting(c):
    losses = [x for x in c.dev_loss if math.isfinite(x)]
    if len(losses) < 3 or len(losses) != len(c.dev_loss):
        return None
    i = min(range(len(losses)), key=lambda k: losses[k])
    rise = (losses[-1] - losses[i]) / max(losses[i], 1e-12)
    if i == len(losses) - 1 or rise < OVERFIT_RISE:
        return None
    step = c.eval_steps[i]
    # the train loss logged at or just before the dev minimum, and at the end
    j = max([k for k, s in enumerate(c.train_steps) if s <= step] or [0])
    tr_then = c.train_loss[j] if c.train_loss else float("nan")
    tr_end = late_mean(c.train_loss) if c.train_loss else float("nan")
    if not tr_end < tr_then:
        return None  # dev loss up with train loss up too: not overfitting (see rule_rising)
    b = best_eval(c)
    last, best = c.dev_metric[-1], c.dev_metric[b]
    worse = c.better(best, last) and abs(best - last) > metric_noise(c, best)
    if not (worse or rise >= OVERFIT_SEVERE_RISE):
        return None
    ev = [f"best dev loss {losses[i]:.4f} at step {step} (eval {i + 1} of {len(losses)}); "
          f"{losses[-1]:.4f} at the last eval, step {c.eval_steps[-1]} (+{rise:.0%})",
          f"train loss meanwhile fell from {tr_then:.4f} to {tr_end:.4f}; train-dev gap at the "
          f"end {losses[-1] - tr_end:.4f} nats",
          f"best dev {c.metric} {best:.4f} at step {c.eval_steps[b]}, last {last:.4f}"]
    return Finding("overfitting", f"overfitting from eval {i + 1} (step {step}) on", ev, [
        f"best dev loss at step {step}; early stopping would have stopped there "
        "(--early-stopping-patience 2 --metric loss)",
        "add dropout or weight decay (--hidden-dropout 0.2, --weight-decay 0.1)",
        "train on more data, or for fewer epochs"])


def rule_stalled(c):
    if len(c.eval_steps) < 2 or not c.lr:
        return None
    group = max(c.lr, key=lambda g: max(c.lr[g]))
    lrs, peak = c.lr[group], max(c.lr[group])
    w = warmup_end(c)
    tiny = next((k for k in range(w, len(lrs)) if all(v <= TINY_LR * peak for v in lrs[k:])), None)
    if tiny is None:
        return None
    t_step, last_step = c.train_steps[tiny], c.train_steps[-1]
    if (last_step - t_step) / max(last_step, 1) < STALL_FRACTION:
        return None
    b = best_eval(c)
    if c.eval_steps[b] > t_step:
        return None  # it still improved with the small lr
    return Finding("stalled", "no improvement while the learning rate was tiny", [
        f"lr of {group} below {TINY_LR:.0%} of its peak {peak:.2e} from step {t_step} to "
        f"{last_step} ({(last_step - t_step) / last_step:.0%} of the run)",
        f"best dev {c.metric} {c.dev_metric[b]:.4f} at step {c.eval_steps[b]}, none better after"],
        [f"stop at about step {t_step}: the steps after it bought nothing",
         "with --schedule plateau: raise --plateau-min-lr or --plateau-patience"])


RULES = (rule_nonfinite, rule_forgetting, rule_rising, rule_underfitting, rule_overfitting,
         rule_stalled)


def healthy(c):
    ev = []
    if len(c.train_loss) == 1:  # no trend to tell from one point
        ev.append(f"a single train log: loss {c.train_loss[0]:.4f} at step {c.train_steps[0]}")
    elif c.train_loss:
        first, last = c.train_loss[0], c.train_loss[-1]
        verb = "fell" if last < first else "rose" if last > first else "stayed"
        ev.append(f"train loss {verb} from {first:.4f} to {last:.4f}")
    if c.eval_steps:
        b = best_eval(c)
        i = min(range(len(c.dev_loss)), key=lambda k: c.dev_loss[k])
        ev.append(f"best dev {c.metric} {c.dev_metric[b]:.4f} at step {c.eval_steps[b]} "
                  f"(last {c.dev_metric[-1]:.4f}); lowest dev loss {c.dev_loss[i]:.4f} at step "
                  f"{c.eval_steps[i]}")
        advice = ["the dev metric was still improving at the last eval: training longer may help"] \
            if b == len(c.eval_steps) - 1 and len(c.eval_steps) > 1 else []
        rise = (c.dev_loss[-1] - c.dev_loss[i]) / max(c.dev_loss[i], 1e-12)
        if rise >= OVERFIT_RISE:  # below the overfitting verdict, but worth a look
            best, last = c.dev_metric[b], c.dev_metric[-1]
            if c.metric == "loss":  # the metric is the loss itself: nothing else to set beside
                said = ""
            elif abs(last - best) <= metric_noise(c, best):
                said = f" while the dev {c.metric} held"
            else:
                said = f"; the dev {c.metric} went from {best:.4f} (best) to {last:.4f}"
            advice.append(f"dev loss ended {rise:.0%} above its minimum{said}: watch for "
                          "overfitting in a longer run")
    else:
        advice = ["no dev evaluations: pass --dev to see generalisation"]
    return Finding("healthy", "training looks healthy", ev, advice)


def diagnose(run, n_labels=None):
    """The diagnosis of RUN as a dict: verdict, headline, evidence, advice, also (other rules)."""
    c = load_curves(run, n_labels)
    found = [f for f in (rule(c) for rule in RULES) if f is not None]
    main = found[0] if found else healthy(c)
    out = asdict(main)
    out["also"] = [asdict(f) for f in found[1:]]
    return out


def format_diagnosis(d):
    lines = [f"diagnosis: {d['verdict'].upper()}: {d['headline']}"]
    lines += [f"  - {e}" for e in d["evidence"]]
    lines += [f"  advice: {a}" for a in d["advice"]]
    lines += [f"  also {f['verdict']}: {f['headline']}" for f in d["also"]]
    return "\n".join(lines)


def write_diagnosis(run, file=None):
    """Diagnose RUN, print it to `file` and save RUN/diagnosis.json. For the end of a run."""
    file = sys.stderr if file is None else file  # the stream of the moment, not of import
    d = diagnose(run)
    print(format_diagnosis(d), file=file)
    from minibert.io import atomic_write_json
    atomic_write_json(os.path.join(run, "diagnosis.json"), d)
    return d


def cmd_diagnose(args):
    try:
        d = diagnose(args.run, args.labels)
    except FileNotFoundError as e:
        raise SystemExit(f"minibert diagnose: {e}") from None
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        print(format_diagnosis(d))


def register(sub):
    p = sub.add_parser("diagnose", help="name what a run's learning curves show, with advice")
    p.add_argument("run", help="run directory (with metrics.jsonl)")
    p.add_argument("--labels", type=int_at_least(2), default=None,
                   help="number of labels, for chance level (default: from best/task.json or "
                        "the confusion matrix)")
    p.add_argument("--json", action="store_true", help="print the diagnosis as JSON")
    p.set_defaults(func=cmd_diagnose)
