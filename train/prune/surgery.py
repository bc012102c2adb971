"""Remove attention heads and FFN neurons physically: smaller matrices, not zeroed ones.

A head h of block i owns hs rows in each of the q, k and v parts of `attn.qkv` (3 nh hs, C) and
the same hs columns of `attn.proj` (C, nh hs). An FFN neuron j owns row j of `mlp.fc_in`
(ffn, C) with its bias, and column j of `mlp.fc_out` (C, ffn). Removing them leaves every other
output unchanged, up to the order of float additions: the pruned model equals the gated model
of importance.py with those gates at 0 (tests/test_prune.py, within 1e-6). `attn.proj`'s bias
belongs to no head and stays.

The new config records what is gone: `pruned_heads` numbers heads as in the unpruned model
(Hugging Face's convention, so transformers rebuilds the same shapes), and `intermediate_sizes`
gives each layer's FFN width. Pruning a pruned model adds to both.
"""

import dataclasses

import torch

from minibert.model import BertEncoder


def _head_rows(hs, keep):
    """Indices of the kept heads' features in a (nh hs) axis, head by head."""
    return torch.cat([torch.arange(h * hs, (h + 1) * hs) for h in keep])


def pruned(bert, heads=None, neurons=None):
    """A new BertEncoder without `heads` {layer: [head index in the layer now]} and `neurons`
    {layer: [FFN index]}; all other weights copied. The original is left untouched."""
    heads, neurons = heads or {}, neurons or {}
    cfg = bert.config
    L = cfg.num_hidden_layers
    removed = {i: set(cfg.pruned_heads.get(i, ())) for i in range(L)}
    sizes = [cfg.ffn_size(i) for i in range(L)]
    state = {k: v.detach().clone() for k, v in bert.state_dict().items()}
    for i, block in enumerate(bert.blocks):
        nh, hs = block.attn.nh, block.attn.hs
        drop_h, drop_n = set(heads.get(i, ())), set(neurons.get(i, ()))
        if drop_h - set(range(nh)) or drop_n - set(range(sizes[i])):
            raise ValueError(f"layer {i}: heads {sorted(drop_h)} / neurons out of range "
                             f"(it has {nh} heads, {sizes[i]} neurons)")
        if drop_h:
            now = cfg.heads(i)  # index in the layer now -> number in the unpruned model
            removed[i] |= {now[h] for h in drop_h}
            rows = _head_rows(hs, [h for h in range(nh) if h not in drop_h])  # (nh' hs,)
            qkv_rows = torch.cat([rows + part * nh * hs for part in range(3)])  # q, k, v parts
            p = f"blocks.{i}.attn."
            state[p + "qkv.weight"] = state[p + "qkv.weight"][qkv_rows]  # (3 nh' hs, C)
            state[p + "qkv.bias"] = state[p + "qkv.bias"][qkv_rows]
            state[p + "proj.weight"] = state[p + "proj.weight"][:, rows]  # (C, nh' hs)
        if drop_n:
            keep = torch.tensor([j for j in range(sizes[i]) if j not in drop_n])  # (ffn',)
            p = f"blocks.{i}.mlp."
            state[p + "fc_in.weight"] = state[p + "fc_in.weight"][keep]  # (ffn', C)
            state[p + "fc_in.bias"] = state[p + "fc_in.bias"][keep]
            state[p + "fc_out.weight"] = state[p + "fc_out.weight"][:, keep]  # (C, ffn')
            sizes[i] = len(keep)
    new_cfg = dataclasses.replace(
        cfg, pruned_heads={i: sorted(r) for i, r in removed.items() if r},
        intermediate_sizes=None if all(n == cfg.intermediate_size for n in sizes) else sizes)
    small = BertEncoder(new_cfg)
    small.load_state_dict(state)  # strict: every shape must now fit the new config
    return small.to(next(bert.parameters()).device).train(bert.training)


def size_report(bert):
    """Heads and FFN neurons left, and encoder parameters, for logs and results.json."""
    cfg = bert.config
    L = cfg.num_hidden_layers
    return {"heads": sum(b.attn.nh for b in bert.blocks), "heads_of": L * cfg.num_attention_heads,
            "neurons": sum(cfg.ffn_size(i) for i in range(L)),
            "neurons_of": L * cfg.intermediate_size,
            "parameters": sum(p.numel() for p in bert.parameters())}
