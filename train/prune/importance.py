"""Which attention heads and FFN neurons a fine-tuned model needs: gates, and their gradients.

Michel, Levy and Neubig 2019, "Are Sixteen Heads Really Better than One?"
(https://arxiv.org/abs/1905.10650), section 4: multiply the output of each head h by a gate
xi_h = 1 and score the head by I_h = E_x |dL/dxi_h|, a first-order estimate of how much the loss
would move if the head were removed (xi_h = 0). The scores of each layer are divided by their
L2 norm before heads of different layers are ranked together (their code's default). An FFN
neuron is scored the same way, with a gate on its GELU output (the Taylor criterion of Molchanov
et al. 2017, https://arxiv.org/abs/1611.06440, at the granularity of one neuron).

The gates are not part of the model. `gates(bert, ...)` puts them in with forward pre-hooks on
two Linear layers whose inputs are exactly what is gated:
- `attn.proj` reads the heads side by side, (B, T, nh * hs): gating head h multiplies its hs
  columns, which is Michel's sum_h xi_h Att_h(x) W_o^h;
- `mlp.fc_out` reads the GELU output, (B, T, ffn): gating neuron j multiplies column j.
A gate of 0 is the reference that physical pruning (surgery.py) must equal.
"""

import contextlib

import torch


@contextlib.contextmanager
def gates(bert, head_gates=None, ffn_gates=None):
    """Inside the block, block i's heads are scaled by head_gates[i] (nh_i,) and its FFN neurons
    by ffn_gates[i] (ffn_i,). Gates may require grad; the hooks are removed on exit."""
    handles = []
    try:
        for i, block in enumerate(bert.blocks):
            if head_gates is not None:
                per_feature = head_gates[i].repeat_interleave(block.attn.hs)  # (nh * hs,)
                handles.append(block.attn.proj.register_forward_pre_hook(_scale(per_feature)))
            if ffn_gates is not None:
                handles.append(block.mlp.fc_out.register_forward_pre_hook(_scale(ffn_gates[i])))
        yield
    finally:
        for h in handles:
            h.remove()


def _scale(g):
    def hook(module, args):  # args[0]: (..., features); g: (features,)
        return (args[0] * g.to(args[0].dtype),)
    return hook


def importance(model, batches):
    """Michel et al.'s scores: (heads, neurons), each a list over layers of (n_i,) tensors holding
    sum over batches of |dL/dxi|. `model` is a TaskModel (its forward gives {"loss"}); `batches`
    yields labelled batches already on the model's device. Dropout is off (eval mode), and only
    the gates get gradients: the model's own .grad fields are left as they were."""
    bert = model.bert
    dev = next(model.parameters()).device
    head_g = [torch.ones(b.attn.nh, device=dev, requires_grad=True) for b in bert.blocks]
    ffn_g = [torch.ones(b.mlp.fc_in.out_features, device=dev, requires_grad=True)
             for b in bert.blocks]
    scores = [torch.zeros_like(g) for g in head_g + ffn_g]
    was_training = model.training
    model.eval()
    try:
        with gates(bert, head_g, ffn_g):
            for batch in batches:
                loss = model(batch)["loss"]
                for s, g in zip(scores, torch.autograd.grad(loss, head_g + ffn_g)):
                    s += g.abs()
    finally:
        model.train(was_training)
    n = len(head_g)
    return scores[:n], scores[n:]


def normalise(scores):
    """Each layer's scores divided by their L2 norm (Michel et al.), so layers compare."""
    return [s / s.norm().clamp(min=1e-20) for s in scores]


def least_important(scores, fraction, keep=1):
    """{layer: [unit indices]} to remove: the `fraction` of all units (rounded to a count) with
    the lowest layer-normalised score, ranked across layers, leaving at least `keep` units in
    every layer (an attention layer with no head, or an FFN with no neuron, is not a layer)."""
    norm = normalise(scores)
    ranked = sorted((float(s), layer, j) for layer, row in enumerate(norm)
                    for j, s in enumerate(row))
    budget = round(fraction * len(ranked))
    left = [len(row) for row in norm]
    remove = {}
    for _, layer, j in ranked:
        if budget == 0:
            break
        if left[layer] > keep:
            remove.setdefault(layer, []).append(j)
            left[layer] -= 1
            budget -= 1
    return {layer: sorted(js) for layer, js in sorted(remove.items())}
