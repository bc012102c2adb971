"""The training loop. Like minGPT's trainer it knows nothing about BERT: it sees

- a model whose `model(batch)` returns a dict with a scalar `loss` (mean over the batch's items)
  and, optionally, `terms`: named scalar parts of that loss, logged beside it as `train_terms`;
- data with `batches(epoch)` (lists of example indices, a pure function of the epoch),
  `collate(indices)` (a dict of tensors) and, when its items are not examples, `count_items`;
- `evaluate(model)`, returning dev metrics that include `loss`; or None when there is no dev
  set, and then every evaluation point simply saves the model: the last checkpoint is `best/`;
- a schedule from train/loop/schedules.py, stepped after each update; a `WarmupThenPlateau`
  also sees each evaluation's metric;
- optional hooks: `unfreezer.update(schedule, step, epoch)` and `save_best(dir)`.

It adds: gradient accumulation that equals one big batch (train/loop/accumulate.py), gradient
clipping, evaluation every N steps and at each epoch end, early stopping, keeping the best
checkpoint, a divergence guard, a clean stop on out-of-memory, metrics.jsonl, and exact resume
from `state/` (train/loop/state.py). It prints nothing unless given a stream (`log`): the
commands pass stderr, a library caller gets silence.

Data parallelism and precision come in through three optional arguments, so the loop stays
one loop: `dist` (train/loop/distributed.py: each rank's share of a global batch, the all-reduce
of logged numbers, rank-0-only writes), `net` (DDP and/or torch.compile around `model`, to train
through; evaluation and checkpoints use `model`) and `scaler` (a GradScaler, for fp16).
`LoopSettings.autocast` is the dtype of the forward.

The step loop does not wait for the GPU: the running loss is a device tensor, read at log
intervals only, and on CUDA (or with several processes) a non-finite loss is recorded on the
device and acted on at the next log, evaluation or save, before anything is written. On one CPU
process, where reading a value costs nothing, each loss is checked as it comes.
"""

import math
import time
from dataclasses import dataclass

import torch

from train.loop import state
from train.loop.accumulate import micro_batches
from train.loop.best import better
from train.loop.device import OutOfMemory, autocast, is_out_of_memory, memory_stats
from train.loop.distributed import single
from train.loop.progress import Progress
from train.loop.schedules import WarmupThenPlateau


@dataclass
class LoopSettings:
    epochs: int
    max_steps: int | None
    grad_accum: int
    clip_grad_norm: float | None
    eval_every: int | None
    log_every: int
    metric: str
    metric_mode: str  # "max" or "min"
    early_stopping_patience: int | None
    save_every: int | None
    max_minutes: float | None = None  # wall-time budget: stop, then evaluate and save as usual
    autocast: torch.dtype | None = None  # bf16/fp16 forward under torch.autocast; None: fp32


def plan_steps(n_micro_batches, grad_accum, epochs, max_steps):
    """(optimizer steps per epoch, total steps): the one place both are computed. The last
    accumulation group of an epoch may be short; it is still a step."""
    per_epoch = math.ceil(n_micro_batches / grad_accum)
    return per_epoch, max_steps if max_steps is not None else epochs * per_epoch


class Diverged(RuntimeError):
    pass


class Trainer:
    def __init__(self, model, optimizer, schedule, data, evaluate, run, settings, device,
                 unfreezer=None, save_best=None, dist=None, net=None, scaler=None, log=None):
        self.model, self.opt, self.schedule, self.data = model, optimizer, schedule, data
        self.evaluate, self.run, self.s, self.device = evaluate, run, settings, device
        self.unfreezer, self.save_best = unfreezer, save_best
        self.dist = dist if dist is not None else single(device)
        self.net = net if net is not None else model  # what training forwards go through
        self.scaler = scaler
        self.log = log  # a text stream for progress and eval lines; None: print nothing
        # Reading a loss on the host waits for the device (and, across ranks, a collective);
        # on one CPU process it is free, so there the guard stops at once, as it always did.
        self.check_each_loss = device.type == "cpu" and self.dist.world == 1
        self.micro_per_epoch = len(data.batches(0))
        self.steps_per_epoch, self.total_steps = plan_steps(
            self.micro_per_epoch, settings.grad_accum, settings.epochs, settings.max_steps)
        # Everything below is saved in state/ and restored on resume.
        self.step, self.epoch, self.micro = 0, 0, 0  # optimizer steps; epoch; micro-batch in epoch
        self.best, self.best_step, self.bad_evals = None, None, 0
        self.seconds, self.examples_seen = 0.0, 0
        self.stopped = False  # early stopping said stop: a resume must not train on

    # ------------------------------------------------------------------ the loop
    def fit(self):
        # Out of memory mid-run (a long batch, a fragmented cache) stops like a divergence:
        # best/ and state/ of the last evaluation stay, and the message says what to change.
        try:
            return self._fit()
        except (MemoryError, RuntimeError) as e:
            if not is_out_of_memory(e):
                raise
            self._out_of_memory(e)

    def _fit(self):
        s = self.s
        self._say(f"training: {self.total_steps} steps ({self.steps_per_epoch} per epoch, "
                  f"accumulating {s.grad_accum} micro-batches)")
        if self.evaluate is None:
            self._say("no dev set: each evaluation point saves the model (best/ is the last one)")
        bar = Progress(self.total_steps, "train", file=self.log, start=self.step)
        t_start, t_log = time.time() - self.seconds, time.time()
        if s.max_minutes is not None and self.step and self.seconds >= 60 * s.max_minutes:
            self.total_steps = self.step  # resumed with its time budget spent: no more steps
        ex_log, tok_log, loss_n, terms = 0, 0, 0, {}  # terms: the loss's named parts
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # read at logs only
        # the step and loss of the first non-finite loss, kept on the device (inf: none yet)
        self._bad_step = torch.full((), math.inf, device=self.device)
        self._bad_loss = torch.zeros((), device=self.device)
        self._update_stage()
        while self.step < self.total_steps and not self.stopped:
            order = self.data.batches(self.epoch)
            while self.micro < len(order) and self.step < self.total_steps:
                group = order[self.micro:self.micro + s.grad_accum]
                n_group = sum(len(b) for b in group)
                self.model.train()
                # this rank's slices of the group's global batches, each with its share of the
                # step's items (train/loop/accumulate.py)
                shares, total = micro_batches(self.data, self.dist, group)
                for j, (cpu_batch, items, n_real) in enumerate(shares):
                    if "attention_mask" in cpu_batch and n_real:  # real tokens, for tokens/s;
                        tok_log += int(cpu_batch["attention_mask"].sum())  # counted on the host
                    batch = {k: v.to(self.device) for k, v in cpu_batch.items()}
                    with self.dist.no_sync(last=j == len(shares) - 1):  # all-reduce on the last
                        with self._autocast():
                            out = self.net(batch)
                        loss = out["loss"]
                        if n_real:
                            self._watch(loss)
                        self._backward(loss * (items / total * self.dist.world))
                    loss_sum += loss.detach() * items  # the logged loss: a mean over items too
                    loss_n += items
                    for k, v in out.get("terms", {}).items():  # x 0 too: every rank, same keys
                        terms[k] = terms.get(k, 0.0) + v.detach().double() * items
                if self.scaler is not None:
                    self.scaler.unscale_(self.opt)  # clip the true gradients, not scaled ones
                if s.clip_grad_norm:
                    params = [p for g in self.opt.param_groups for p in g["params"]]
                    torch.nn.utils.clip_grad_norm_(params, s.clip_grad_norm)
                if self.scaler is not None:
                    self.scaler.step(self.opt)  # skipped when a gradient is inf/nan
                    self.scaler.update()
                else:
                    self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                self.schedule.step()
                self.step += 1
                self.micro += len(group)
                self.examples_seen += n_group
                ex_log += n_group
                end_of_epoch = self.micro >= len(order)
                out_of_time = s.max_minutes is not None and \
                    time.time() - t_start >= 60 * s.max_minutes
                if s.max_minutes is not None and self.dist.world > 1:
                    late = out_of_time  # ranks' clocks differ; all stop when rank 0's says so
                    out_of_time = self.dist.on_main(lambda: late)
                if out_of_time:
                    self._say(f"time budget of {s.max_minutes} minutes reached at step {self.step}")
                    self.total_steps = self.step  # ends the loop; eval and save as at a normal end
                evaluating = (s.eval_every and self.step % s.eval_every == 0) or end_of_epoch \
                    or self.step == self.total_steps
                saving = evaluating or (s.save_every and self.step % s.save_every == 0)
                # a save logs too, so that no log interval straddles a resume
                if self.step % s.log_every == 0 or saving:
                    self._check_diverged()
                    # the loop's one host-device sync: loss and token sums of every rank
                    # (examples per step are known on every rank: the global group's size)
                    sums = torch.cat([loss_sum.view(1), *(t.view(1) for t in terms.values()),
                                      torch.tensor([loss_n, tok_log], dtype=torch.float64,
                                                   device=self.device)])
                    loss_total, *parts, n_total, tok_total = self.dist.all_reduce(sums).tolist()
                    train_loss = loss_total / max(n_total, 1)
                    parts = {k: v / max(n_total, 1) for k, v in zip(terms, parts)}
                    now = time.time()
                    self.seconds = now - t_start
                    eps = ex_log / max(now - t_log, 1e-9)
                    self.run.log({"event": "train", "step": self.step, "epoch": self._epoch_f(),
                                  "train_loss": train_loss, "lr": self._lrs(),
                                  "examples_per_second": round(eps, 1),
                                  "tokens_per_second": round(tok_total / max(now - t_log, 1e-9),
                                                             1),
                                  "time": self.seconds, "memory": memory_stats(self.device),
                                  **({"train_terms": parts} if parts else {})})
                    bar.update(self.step, loss=train_loss,
                               lr=self._lr_range(), ex_s=round(eps, 1),
                               rss_mb=memory_stats(self.device)["rss_peak_mb"])
                    t_log, ex_log, tok_log, loss_n, terms = now, 0, 0, 0, {}
                    loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
                if end_of_epoch:
                    self.epoch += 1
                    self.micro = 0
                # gradual unfreezing: the next update's stage, set before the save so that
                # state/ holds the param groups that a resume at this step rebuilds
                self._update_stage()
                if saving:
                    self.seconds = time.time() - t_start
                    self._check_diverged()  # never evaluate or save non-finite weights
                    if evaluating:
                        self.stopped = self._eval()
                    self.save_state()
                if self.stopped or end_of_epoch:
                    break
        bar.close()  # self.seconds: as at the last save, so a resumed finished run says the same
        return {"best_step": self.best_step, "best_" + s.metric: self.best, "steps": self.step,
                "train_seconds": round(self.seconds, 1),
                "examples_per_second": round(self.examples_seen / max(self.seconds, 1e-9), 1),
                "stopped_early": self.stopped}

    def _say(self, msg):
        if self.log is not None:
            print(msg, file=self.log, flush=True)

    def _epoch_f(self):
        return round(self.epoch + self.micro / max(self.micro_per_epoch, 1), 4)

    def _lr_range(self):
        """The lr for the progress bar: one number, or "high..low" when groups differ (a head lr,
        layer-wise decay)."""
        lrs = [g["lr"] for g in self.opt.param_groups]
        hi, lo = max(lrs), min(lrs)
        return f"{hi:.2e}" if hi == lo else f"{hi:.2e}..{lo:.2e}"

    def _lrs(self):
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.opt.param_groups)}

    def _autocast(self):
        return autocast(self.device, self.s.autocast)

    def _backward(self, loss):
        # fp16: scale the loss up so that small gradients do not underflow to zero
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def _watch(self, loss):
        """The divergence guard for one micro-batch's loss: stop now (one CPU process), or note
        the first non-finite loss on the device, to be acted on by _check_diverged."""
        if self.check_each_loss:
            if not torch.isfinite(loss):
                self._diverged(loss.item(), self.step)
            return
        loss = loss.detach().float()
        first = ~torch.isfinite(loss) & torch.isinf(self._bad_step)  # no host read: no sync
        self._bad_step = torch.where(first, float(self.step), self._bad_step)
        self._bad_loss = torch.where(first, loss, self._bad_loss)

    def _check_diverged(self):
        """Raise Diverged, on every rank alike, if any rank saw a non-finite loss."""
        if self.check_each_loss:
            return
        seen = self.dist.all_gather([self._bad_step.item(), self._bad_loss.item()])
        bad = sorted(s for s in seen if math.isfinite(s[0]))
        if bad:
            self._diverged(bad[0][1], int(bad[0][0]))

    def _update_stage(self):
        if self.unfreezer is not None:
            change = self.unfreezer.update(self.schedule, self.step, self.epoch)
            if change:
                self._say(change)

    def _eval(self):
        """Evaluate, log, keep the best model, step the plateau schedule; True to stop early.
        Without a dev set there is nothing to compare: the model is saved as best/ each time."""
        s = self.s
        if self.evaluate is None:
            self.best_step = self.step
            if self.save_best is not None:
                self.run.save_dir("best", self.save_best)
            self.run.log({"event": "checkpoint", "step": self.step, "epoch": self._epoch_f(),
                          "best_step": self.step, "time": self.seconds})
            return False

        def evaluate():
            with self._autocast():
                return self.evaluate(self.model)  # the plain model: no DDP hooks on one rank
        # rank 0 evaluates; every rank gets its metrics, so all decide early stopping, the
        # plateau schedule and the best step alike
        metrics = self.dist.on_main(evaluate)
        value = metrics[s.metric]
        improved = self.best_step is None or better(value, self.best, s.metric_mode)
        if improved:
            self.best, self.best_step, self.bad_evals = value, self.step, 0
            if self.save_best is not None:
                self.run.save_dir("best", self.save_best)
        else:
            self.bad_evals += 1
        if isinstance(self.schedule, WarmupThenPlateau):
            self.schedule.evaluate(value)
        self.run.log({"event": "eval", "step": self.step, "epoch": self._epoch_f(),
                      "dev": metrics, "lr": self._lrs(), "best_step": self.best_step,
                      "time": self.seconds, "memory": memory_stats(self.device)})
        self._say(f"eval step {self.step}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            + (" (best)" if improved else f" (best {self.best:.4f} at step {self.best_step})"))
        patience = s.early_stopping_patience
        if patience is not None and self.bad_evals >= patience:
            self._say(f"early stopping: no better dev {s.metric} for {patience} evaluations; "
                      f"best was {self.best:.4f} at step {self.best_step}")
            return True
        return False

    def _diverged(self, loss, step):
        lr = self.opt.param_groups[0]["lr"]
        msg = (f"training diverged: loss is {loss} at step {step} (lr {lr:.2e}). "
               "The likely cause is a learning rate that is too high; lower --lr, or add warm-up "
               "or gradient clipping. ")
        best = self.run.find_dir("best")
        msg += (f"The last good model is kept in {best} (step {self.best_step})."
                if best else "No checkpoint had been saved yet.")
        self.run.log({"event": "diverged", "step": step, "lr": self._lrs(), "loss": str(loss)})
        raise Diverged(msg)

    def _out_of_memory(self, err):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the failed step's blocks; lets the log below allocate
        first_line = (str(err).splitlines() or [""])[0][:300]
        self.run.log({"event": "oom", "step": self.step, "error": first_line,
                      "memory": memory_stats(self.device)})
        best, state = self.run.find_dir("best"), self.run.find_dir("state")
        msg = (f"out of memory in step {self.step + 1} ({type(err).__name__}). Use smaller "
               f"micro-batches with gradient accumulation: halve --batch-size and double "
               f"--grad-accum (now {self.s.grad_accum}), which keeps the batch the optimizer "
               "sees. ")
        msg += f"Kept: best model in {best} (step {self.best_step}). " if best else \
            "No best model had been saved yet. "
        msg += f"Resume state in {state}." if state else ""
        raise OutOfMemory(msg) from None

    # ------------------------------------------------------------------ resume
    def save_state(self):
        state.save(self)

    def load_state(self):
        state.load(self)
        self._say(f"resumed from {self.run.find_dir('state')}: step {self.step}, "
                  f"epoch {self._epoch_f()}")
