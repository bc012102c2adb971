"""BERT, written out: embeddings, post-LN transformer blocks, pooler and masked-LM head.

Follows Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding" (https://arxiv.org/abs/1810.04805), and matches Hugging Face's `BertModel` /
`BertForMaskedLM` numerically (tests/test_model.py), so published checkpoints load unchanged.

The file builds bottom-up: attention functions -> self-attention -> MLP -> block -> embeddings ->
encoder -> MLM head. Shapes use B (batch), T (sequence length), C (hidden size), nh (heads),
hs (head size = C // nh), V (vocabulary).

Known limits: absolute position embeddings only (no relative/rotary variants); no NSP head (a
checkpoint's NSP weights are reported and dropped by minibert/checkpoint.py); no cross-attention.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minibert.config import BertConfig

# -----------------------------------------------------------------------------------------------
# Attention, two ways. Both take q, k, v of shape (B, nh, T, hs) and a key mask (B, T) that is
# True at real tokens, and return (B, nh, T, hs). Padded *query* rows get whatever the math gives;
# the caller ignores them. The Triton kernels (minibert/kernels/) are a third way, checked against
# `attention_eager`, which is the reference for all of them.


def attention_eager(q, k, v, key_mask, dropout_p=0.0):
    """The reference: softmax(q k^T / sqrt(hs)) v, every intermediate materialised.

    Memory traffic is O(B nh T^2): the (T, T) score matrix is written and read several times, which
    is exactly what fused kernels avoid.
    """
    hs = q.size(-1)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, T)
    if key_mask is not None:
        # The most negative finite number, not -inf: a row with every key masked then gives a
        # uniform average instead of NaN, as transformers does.
        att = att.masked_fill(~key_mask[:, None, None, :], torch.finfo(att.dtype).min)
    att = F.softmax(att, dim=-1)
    if dropout_p > 0.0:
        att = F.dropout(att, p=dropout_p)  # BERT drops whole attention links, not outputs
    return att @ v  # (B, nh, T, T) x (B, nh, T, hs) -> (B, nh, T, hs)


def attention_sdpa(q, k, v, key_mask, dropout_p=0.0):
    """The same math through torch's fused scaled_dot_product_attention. One difference: a row
    whose every key is masked gives 0 here, eager's uniform average there; no input of minibert's
    has one ([CLS] and [SEP] are always real)."""
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, T) bool
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


class SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig, nh: int):
        super().__init__()
        # nh is cfg.num_attention_heads unless heads were pruned (train/prune/); the head size
        # stays C // num_attention_heads, so the heads span nh * hs = C features, or fewer.
        self.nh, self.hs = nh, cfg.head_size
        # One (C -> 3 nh hs) projection for q, k and v: one matmul instead of three. Checkpoints
        # store them separately; minibert/checkpoint.py concatenates and splits them.
        self.qkv = nn.Linear(cfg.hidden_size, 3 * nh * self.hs)
        self.proj = nn.Linear(nh * self.hs, cfg.hidden_size)
        self.impl = cfg.attention
        self.dropout_p = cfg.attention_probs_dropout_prob

    def forward(self, x, key_mask):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(self.nh * self.hs, dim=-1)  # 3 x (B, T, nh * hs)
        q = q.view(B, T, self.nh, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.nh, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.nh, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        p = self.dropout_p if self.training else 0.0
        if self.impl == "eager":
            y = attention_eager(q, k, v, key_mask, p)
        elif self.impl == "sdpa":
            y = attention_sdpa(q, k, v, key_mask, p)
        else:  # "triton" (BertConfig admits no other name; BertEncoder checked triton is usable)
            from minibert.kernels import flash_attention
            y = flash_attention(q, k, v, key_padding_mask=key_mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, self.nh * self.hs)  # re-assemble heads
        return self.proj(y)  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: BertConfig, width: int):
        super().__init__()
        self.fc_in = nn.Linear(cfg.hidden_size, width)  # width: intermediate_size, or pruned
        self.fc_out = nn.Linear(width, cfg.hidden_size)
        # "gelu" is the exact 0.5 x (1 + erf(x / sqrt 2)); "gelu_new" the tanh approximation.
        self.approximate = "none" if cfg.hidden_act == "gelu" else "tanh"

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        return self.fc_out(F.gelu(self.fc_in(x), approximate=self.approximate))


class Block(nn.Module):
    """Post-LN, as in the original Transformer and BERT: LayerNorm *after* each residual add.

    (GPT-2 and most newer models are pre-LN; BERT checkpoints only work with post-LN.)
    """

    def __init__(self, cfg: BertConfig, layer: int):
        super().__init__()
        self.attn = SelfAttention(cfg, len(cfg.heads(layer)))
        self.ln_attn = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg, cfg.ffn_size(layer))
        self.ln_mlp = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x, key_mask):  # (B, T, C) -> (B, T, C)
        x = self.ln_attn(x + self.drop(self.attn(x, key_mask)))
        x = self.ln_mlp(x + self.drop(self.mlp(x)))
        return x


class Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.hidden_dropout_prob)
        self.max_len = cfg.max_position_embeddings

    def forward(self, input_ids, token_type_ids):  # (B, T) -> (B, T, C)
        T = input_ids.size(1)
        if T > self.max_len:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings={self.max_len}")
        pos = torch.arange(T, device=input_ids.device)  # (T,)
        x = self.word(input_ids) + self.position(pos) + self.token_type(token_type_ids)
        return self.drop(self.ln(x))


class BertEncoder(nn.Module):
    """input ids -> contextual vectors (B, T, C); `pool` gives BERT's [CLS] sentence vector."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        if cfg.attention.startswith("triton"):
            from minibert.kernels import check_triton_usable
            check_triton_usable(cfg)
        self.embeddings = Embeddings(cfg)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.num_hidden_layers)])
        # The pooler is a dense + tanh on the [CLS] vector, trained by next-sentence prediction.
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.apply(init_weights)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        key_mask = attention_mask.bool()  # (B, T), True at real tokens
        if self.config.attention == "triton-varlen":
            from minibert.kernels.unpad import forward_unpadded
            return forward_unpadded(self, input_ids, key_mask, token_type_ids)
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, C)
        for block in self.blocks:
            x = block(x, key_mask)
        return x  # (B, T, C)

    def pool(self, hidden):  # (B, T, C) -> (B, C)
        return torch.tanh(self.pooler(hidden[:, 0]))


class MLMHead(nn.Module):
    """dense + GELU + LayerNorm, then a decoder whose weight *is* the word embedding matrix."""

    def __init__(self, cfg: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.approximate = "none" if cfg.hidden_act == "gelu" else "tanh"
        self.word_embeddings = word_embeddings  # tied: (V, C), shared, not a copy
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h):  # (..., C) -> (..., V)
        h = self.ln(F.gelu(self.dense(h), approximate=self.approximate))
        return F.linear(h, self.word_embeddings.weight, self.bias)


class BertForMLM(nn.Module):
    """The encoder plus the MLM head. Calling it gives logits over the vocabulary at every position;
    pretraining calls `self.bert` and `self.head` separately to decode only masked positions."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.bert = BertEncoder(cfg)
        self.head = MLMHead(cfg, self.bert.embeddings.word)
        init_weights(self.head.dense)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        hidden = self.bert(input_ids, attention_mask, token_type_ids)  # (B, T, C)
        return self.head(hidden)  # (B, T, V)


@torch.no_grad()
def init_weights(module):
    """BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm, zero pad vector."""
    if isinstance(module, nn.Linear):
        module.weight.normal_(0.0, 0.02)
        if module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, nn.Embedding):
        module.weight.normal_(0.0, 0.02)
        if module.padding_idx is not None:
            module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        module.weight.fill_(1.0)
        module.bias.zero_()


def mean_pool(hidden, attention_mask):
    """Average the vectors of real tokens: (B, T, C), (B, T) -> (B, C). sentence-transformers'
    pooling, and `--pooling mean` in fine-tuning."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
