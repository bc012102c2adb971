"""AdamW, written as its math, with a multi-tensor fast path beside it.

Follows Loshchilov & Hutter, "Decoupled Weight Decay Regularization" (2019), in the form that
`torch.optim.AdamW` computes it, so that the two agree to float rounding (tests/test_optim.py):

    p  <- p - lr * wd * p                     decoupled: the decay never enters m or v
    m  <- b1 * m + (1 - b1) * g
    v  <- b2 * v + (1 - b2) * g^2
    m_hat = m / (1 - b1^t),  v_hat = v / (1 - b2^t)
    p  <- p - lr * m_hat / (sqrt(v_hat) + eps)

eps is added after the bias correction of v, as torch and the paper do (not to sqrt(v) before
it): early in training, when 1 - b2^t is small, the two placements differ by a large factor.

Two paths compute the same thing, picked by the constructor flag `foreach`:
- `_adamw_readable`: one parameter at a time, five lines of math. The reference.
- `_adamw_foreach`: the same lines as `torch._foreach_*` ops over all of a group's parameters,
  which on CUDA launch one kernel per op per group rather than per parameter.
`foreach=None` resolves, once, at construction: True when every parameter is on CUDA, else False.
Fine-tuning passes foreach=True on every device: on a CPU too its fused element-wise ops beat
the per-parameter loop (MiniLM, one thread: ~110 ms against ~135 ms a step). The resolved choice
is in `optimizer.foreach`.

State per parameter: `step` (a plain int), `exp_avg` (m) and `exp_avg_sq` (v). A parameter whose
`.grad` is None is skipped and gets no state at all: a frozen layer costs no optimizer memory,
and the trainer may rely on `optimizer.state` holding only the parameters that have trained.
Groups added later with `add_param_group` (gradual unfreezing) start with fresh state.

Limits: no amsgrad, maximize, capturable (CUDA graphs) or fused kernel; lr is a float, not a
tensor; sparse gradients are refused. The foreach path assumes a group's parameters share one
device and dtype (true for minibert); otherwise torch runs its foreach ops tensor by tensor.
"""

import torch


class AdamW(torch.optim.Optimizer):
    """Same constructor arguments and defaults as `torch.optim.AdamW`, plus `foreach`.

    `params` is an iterable of tensors or of param-group dicts; a group may carry extra keys
    (a `name`, say) which are kept, saved in `state_dict()` and restored by `load_state_dict()`.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 foreach: bool | None = None):
        # the same checks as torch, so a bad config fails here and not as NaNs 1000 steps later
        if not lr >= 0.0:
            raise ValueError(f"AdamW: invalid learning rate {lr} (must be >= 0)")
        if not eps >= 0.0:
            raise ValueError(f"AdamW: invalid eps {eps} (must be >= 0)")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"AdamW: invalid betas {betas} (each must be in [0, 1))")
        if not weight_decay >= 0.0:
            raise ValueError(f"AdamW: invalid weight_decay {weight_decay} (must be >= 0)")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        if foreach is None:
            foreach = all(p.is_cuda for g in self.param_groups for p in g["params"])
        # an attribute of the optimizer, not a group key: it describes how this process computes,
        # so it must not travel inside a checkpoint from a CPU run to a GPU run
        self.foreach = bool(foreach)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue  # frozen or unused this step: no update and, above all, no state
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                # t counts this parameter's own updates: one unfrozen mid-run, or one that gets
                # no grad on some steps, is bias-corrected for the steps it has actually seen
                state["step"] += 1
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if not params:
                continue
            update = _adamw_foreach if self.foreach else _adamw_readable
            beta1, beta2 = group["betas"]
            update(params, grads, exp_avgs, exp_avg_sqs, steps, lr=group["lr"], beta1=beta1,
                   beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        return loss


def _adamw_readable(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
                    weight_decay):
    """The reference: the math of the module docstring, one parameter at a time, in place."""
    for p, g, m, v, t in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        # p -= lr * wd * p, as one multiply. Applied to p before the Adam step, as torch does
        p.mul_(1 - lr * weight_decay)
        m.mul_(beta1).add_(g, alpha=1 - beta1)                 # m = b1 m + (1 - b1) g
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)          # v = b2 v + (1 - b2) g^2
        bias_correction1 = 1 - beta1 ** t
        bias_correction2 = 1 - beta2 ** t
        # sqrt(v_hat) + eps = sqrt(v) / sqrt(1 - b2^t) + eps: torch's order of operations, so
        # that we round the way it does
        denom = v.sqrt() / bias_correction2 ** 0.5 + eps
        # p -= lr * m_hat / (sqrt(v_hat) + eps), with m_hat's 1 / (1 - b1^t) folded into the scalar
        p.addcdiv_(m, denom, value=-lr / bias_correction1)


def _adamw_foreach(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
                   weight_decay):
    """The same lines as `_adamw_readable`, each applied to the whole list of tensors at once."""
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    # the bias corrections are per parameter (steps may differ inside a group), so they go in as
    # lists of Python scalars: one per tensor, no device tensors and no syncs
    bias_correction2_sqrt = [(1 - beta2 ** t) ** 0.5 for t in steps]
    step_sizes = [-lr / (1 - beta1 ** t) for t in steps]
    denoms = torch._foreach_sqrt(exp_avg_sqs)   # one temporary the size of the group's params
    torch._foreach_div_(denoms, bias_correction2_sqrt)
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)
