"""The encoder on packed tokens: `attention="triton-varlen"`.

A padded batch (B, T) spends every matmul of the model on padding too: with 30% padding, 30% of
the QKV, projection and MLP work is thrown away. Here the padding is removed once, after the
embeddings (which need each token's position in its padded row), every block runs on the
(total, C) real tokens, with flash_attention_varlen keeping the sequences apart, and the output
is scattered back to (B, T, C) with zeros at padded positions. The idea is FlashAttention's
`unpad_input` / `pad_input` (https://github.com/Dao-AILab/flash-attention) and the "packed"
BERT of MLPerf; the code is ours.

`packed_block` is Block.forward (minibert/model.py) rewritten for (total, C): it uses the block's
own submodules and parameters, so a checkpoint runs unchanged under either mode. Post-LN,
LayerNorm and the MLP act per token, so only attention needs to know where sequences begin.

Limits: any mask works (the real tokens of a row, in order, form its sequence), but a row with no
real token gives an all-zero output; building cu_seqlens costs one host sync per forward.
"""

import torch
import torch.nn.functional as F

from minibert.kernels.flash import flash_attention_varlen


def packed_block(block, x, cu_seqlens, max_seqlen):
    """Block.forward for packed tokens: x (total, C) -> (total, C)."""
    attn = block.attn
    total = x.size(0)
    q, k, v = attn.qkv(x).split(attn.nh * attn.hs, dim=-1)  # 3 x (total, nh * hs)
    q = q.view(total, attn.nh, attn.hs)  # (total, nh, hs): no transpose, the kernel takes strides
    k = k.view(total, attn.nh, attn.hs)
    v = v.view(total, attn.nh, attn.hs)
    p = attn.dropout_p if attn.training else 0.0
    # cu_seqlens comes from forward_unpadded, valid by construction: no per-layer host check
    y = flash_attention_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p=p,
                               validate=False)  # (total, nh, hs)
    y = attn.proj(y.reshape(total, attn.nh * attn.hs))  # (total, C)
    x = block.ln_attn(x + block.drop(y))
    x = block.ln_mlp(x + block.drop(block.mlp(x)))
    return x


def forward_unpadded(encoder, input_ids, key_mask, token_type_ids):
    """BertEncoder.forward with padding removed: (B, T) ids and bool mask -> (B, T, C)."""
    B, T = input_ids.shape
    x = encoder.embeddings(input_ids, token_type_ids)  # (B, T, C), positions taken from the row
    C = x.size(-1)
    lengths = key_mask.sum(1, dtype=torch.int32)  # (B,)
    cu_seqlens = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))  # (B+1,), from 0
    max_seqlen = int(lengths.max()) if B > 0 else 0  # the host sync
    idx = key_mask.flatten().nonzero().squeeze(1)  # (total,) flat indices of real tokens, in order
    h = x.reshape(B * T, C).index_select(0, idx)  # (total, C): the gather, once
    for block in encoder.blocks:
        h = packed_block(block, h, cu_seqlens, max_seqlen)
    out = h.new_zeros(B * T, C).index_copy(0, idx, h)  # the scatter back, zeros at padding
    return out.view(B, T, C)
