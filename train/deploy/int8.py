"""int8 Linear layers for CPU inference: dynamic quantisation written as the math, beside the
fast path that serves it (`minibert quantize`).

The reference, `int8_linear` (Jacob et al. 2018, "Quantization and Training of Neural Networks
for Efficient Integer-Arithmetic-Only Inference", with per-channel weights and per-token dynamic
activations as in LLM.int8() and SmoothQuant's W8A8 baseline):

    weights   per output channel, symmetric, once:  s_w[n] = max_k |W[n, k]| / q,
              Wq[n, k] = round(W[n, k] / s_w[n]) in [-q, q]   (q = 127, or 64: see reduce_range)
    inputs    per token, symmetric, at every call ("dynamic"): s_x[t] = max_k |x[t, k]| / 127,
              xq[t, k] = round(x[t, k] / s_x[t]) in [-127, 127]
    product   acc[t, n] = sum_k xq[t, k] Wq[n, k] in int32, which is exact: |acc| <= K 127^2 < 2^31
              for K < 133,000
    rescale   y[t, n] = s_x[t] s_w[n] acc[t, n] + b[n]

Which layers: the four Linear layers of every encoder block (qkv, attention output, MLP in and
out), which hold nearly all of BERT's multiply-adds. The embedding tables are stored in uint8
too (`quantize_table`, one asymmetric scale per table, as onnxruntime quantises a Gather): they
cost no compute but hold most of a small BERT's bytes (MiniLM-L6's word table is 44.7 of its
86.7 MB). LayerNorms, softmax(QK^T)V, the pooler and the task head stay fp32: they are a small
share of the work, and the head's error would land on the output undamped.

The fast path is onnxruntime's `quantize_dynamic` on the exported graph (onnx_export.py): its
MatMulInteger kernels (MLAS) do the same integer product. Why this one, in torch 2.13 (2026):
- `torch.ao.quantization.quantize_dynamic` still runs in torch 2.13, but with a
  DeprecationWarning that sends users to torchao ("deprecated and will be removed in 2.10", a
  date already passed), and the quantized tensor types it builds on warn that they are deprecated
  too (pytorch#184982). Its packed weights can only be saved by pickling, which minibert never
  does, so it could not write `quantize --out DIR` anyway.
- torchao's int8-dynamic-activation/int8-weight config is this reference scheme exactly (per-
  token activations), but it is one more dependency and its CPU kernels are not what onnxruntime
  users run; not used.
- onnxruntime is maintained, writes a file that `minibert predict --backend onnx` serves, and
  runs wherever the fp32 export runs. Which one is *fastest* is bench/latency.py's question.

onnxruntime differs from the reference in one respect: it quantises activations per tensor,
asymmetric uint8 (ONNX DynamicQuantizeLinear: s = (max(x, 0) - min(x, 0)) / 255, zero point
z = round(-min(x, 0) / s)). `quantize_activations(x, "tensor")` is that scheme, so a test holds
onnxruntime to the same math up to float rounding, layer by layer; the per-token reference is
the more accurate scheme (one outlier token does not coarsen every other token's step).

reduce_range: on x86 without VNNI, onnxruntime's uint8 x int8 kernel (vpmaddubsw) adds pairs of
products in int16, which saturates (2 x 255 x 127 > 32767); onnxruntime's advice is then 7-bit
weights, |Wq| <= 64. `weight_qmax()` gives 127 on CPUs with VNNI (and off x86), else 64.

Limits: CPU only; the dynamic activation scale costs a pass over x per layer; no static
(calibrated) activations; no int8 attention scores.
"""

import copy
import logging
import os
import platform
import tempfile

import torch
import torch.nn as nn

ENCODER_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc_in", "mlp.fc_out")
EMBEDDINGS = ("word", "position", "token_type")


def weight_qmax():
    """127 (int8) where onnxruntime's int8 product cannot saturate, 64 (7 bits) where it can:
    x86 without VNNI. Read from /proc/cpuinfo; where that does not exist, assume no VNNI."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return 127
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return 64
    return 127 if ("avx512_vnni" in flags or "avx_vnni" in flags) else 64


# ---------------------------------------------------------------- the reference math

def quantize_weight(w, qmax=127):
    """(N, K) float -> (Wq (N, K) int8, s_w (N,) fp32): symmetric, one scale per output channel.
    The scale is max|W| / qmax computed in float64 then rounded to fp32, as onnxruntime does."""
    absmax = w.detach().abs().amax(dim=1).double()  # (N,)
    scale = (absmax / qmax).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale
    wq = torch.round(w.detach().float() / scale[:, None]).clamp(-qmax, qmax)
    return wq.to(torch.int8), scale


def quantize_activations(x, scheme):
    """x (..., K) float -> (xq int32 (..., K), scale, zero point), recomputed at every call.
    "token":  symmetric int8, one scale per row (token): scale (..., 1), zero point 0.
    "tensor": asymmetric uint8 over the whole tensor, ONNX DynamicQuantizeLinear (onnxruntime's
              dynamic quantisation): scalar scale and zero point."""
    if scheme == "token":
        scale = x.abs().amax(dim=-1, keepdim=True) / 127  # (..., 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return torch.round(x / scale).clamp(-127, 127).to(torch.int32), scale, 0
    if scheme == "tensor":
        lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)  # the range always holds 0
        scale = (hi - lo) / 255
        if scale == 0:
            scale = torch.ones_like(scale)
        zero = torch.round(-lo / scale).clamp(0, 255)
        xq = (torch.round(x / scale) + zero).clamp(0, 255)
        return xq.to(torch.int32), scale, zero.to(torch.int32)
    raise ValueError(f"activation scheme {scheme!r}: choose 'token' or 'tensor'")


def int8_linear(x, wq, w_scale, bias, scheme="token"):
    """y = x W^T + b with int8 weights and dynamically quantised int8 inputs, int32 products.
    x (..., K) float, wq (N, K) int8, w_scale (N,), bias (N,) or None -> (..., N) float."""
    xq, x_scale, zero = quantize_activations(x.float(), scheme)  # (..., K) int32
    acc = (xq - zero) @ wq.to(torch.int32).t()  # (..., K) x (K, N) -> (..., N) int32, exact
    y = acc.float() * (x_scale * w_scale)  # rescale: s_x (..., 1) or (), s_w (N,)
    return (y if bias is None else y + bias).to(x.dtype)


class Int8Linear(nn.Module):
    """An nn.Linear's int8 stand-in (inference only): weights quantised once, inputs per call."""

    def __init__(self, linear: nn.Linear, qmax=127, scheme="token"):
        super().__init__()
        wq, scale = quantize_weight(linear.weight, qmax)
        self.register_buffer("wq", wq)  # (N, K) int8
        self.register_buffer("w_scale", scale)  # (N,)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.scheme = scheme

    def forward(self, x):  # (..., K) -> (..., N)
        return int8_linear(x, self.wq, self.w_scale, self.bias, self.scheme)


def quantize_table(w):
    """An embedding table (V, C) -> (q uint8 (V, C), scale, zero point): one asymmetric uint8
    scale for the whole table, as onnxruntime quantises a Gather's weights:
    s = (max(w, 0) - min(w, 0)) / 255, z = round(-min(w, 0) / s), q = clip(round(w / s) + z)."""
    w = w.detach().float()
    # the range (always holding 0), its scale and the zero point in float64, the scale then
    # stored in fp32: onnxruntime's arithmetic, so that the tables agree to the last bit
    lo, hi = w.min().clamp(max=0).double(), w.max().clamp(min=0).double()
    scale64 = (hi - lo) / 255 if hi > lo else torch.ones((), dtype=torch.float64)
    zero = torch.round(-lo / scale64).clamp(0, 255)
    scale = scale64.float()
    q = (torch.round(w / scale) + zero.float()).clamp(0, 255)
    return q.to(torch.uint8), scale, zero.to(torch.uint8)


class Int8Embedding(nn.Module):
    """An nn.Embedding's uint8 stand-in: rows are looked up in uint8, then dequantised."""

    def __init__(self, emb: nn.Embedding):
        super().__init__()
        q, scale, zero = quantize_table(emb.weight)
        self.register_buffer("q", q)  # (V, C) uint8
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)

    def forward(self, ids):  # (B, T) -> (B, T, C)
        return (self.q[ids].to(torch.int32) - self.zero.to(torch.int32)).float() * self.scale


def quantize_encoder(model, qmax=127, scheme="token"):
    """A copy of a TaskModel whose encoder blocks' Linear layers are Int8Linear and whose embedding
    tables are Int8Embedding; the original is left as it was. Returns (copy, [names replaced])."""
    q = copy.deepcopy(model).eval()
    names = []
    for i, block in enumerate(q.bert.blocks):
        for path in ENCODER_LINEARS:
            parent_name, attr = path.split(".")
            parent = getattr(block, parent_name)
            setattr(parent, attr, Int8Linear(getattr(parent, attr), qmax, scheme))
            names.append(f"bert.blocks.{i}.{path}")
    for table in EMBEDDINGS:
        setattr(q.bert.embeddings, table, Int8Embedding(getattr(q.bert.embeddings, table)))
        names.append(f"bert.embeddings.{table}")
    return q, names


# ---------------------------------------------------------------- the fast path: onnxruntime

def encoder_matmuls(proto, n_layers):
    """Names of the graph's MatMul nodes that are encoder blocks' Linear layers. The dynamo
    exporter records each node's module path in its metadata (`pkg.torch.onnx.name_scopes`);
    exactly 4 per block must be found, or the export is not what this code was written for."""
    wanted = {f"bert.blocks.{i}.{p}" for i in range(n_layers) for p in ENCODER_LINEARS}
    found = {}
    for node in proto.graph.node:
        if node.op_type != "MatMul":
            continue
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = meta.get("pkg.torch.onnx.name_scopes", "")
        hit = [w for w in wanted if f"'{w}'" in scopes]
        if hit and "aten.linear" in meta.get("pkg.torch.onnx.fx_node", ""):
            found[hit[0]] = node.name
    if set(found) != wanted:
        missing = sorted(wanted - set(found))[:3]
        raise ValueError(f"the exported graph's MatMul nodes do not name the encoder's Linear "
                         f"layers (missing {missing}...); was it exported by onnx_export.py?")
    return [found[w] for w in sorted(found)]


def embedding_gathers(proto):
    """Names of the graph's Gather nodes that look rows up in a weight table (an initializer):
    the word, position and token-type embeddings."""
    tables = {t.name for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node if n.op_type == "Gather" and n.input[0] in tables]


def quantize_graph(proto, nodes, qmax, gathers=()):
    """onnxruntime's dynamic int8 quantisation of the MatMul nodes `nodes` of an fp32 ONNX graph
    (per-channel symmetric int8 weights, 7-bit when qmax is 64; per-tensor uint8 activations),
    and of the embedding tables of the Gather nodes `gathers` (uint8, one scale per table).
    Returns the int8 ModelProto."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if qmax not in (127, 64):
        raise ValueError(f"qmax {qmax}: onnxruntime offers 127 (int8) or 64 (reduce_range)")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs advice on the root logger; keep quiet
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "int8.onnx")
            quantize_dynamic(proto, out, per_channel=True, reduce_range=qmax == 64,
                             weight_type=QuantType.QInt8,
                             nodes_to_quantize=list(nodes) + list(gathers),
                             op_types_to_quantize=["MatMul", "Gather"] if gathers else ["MatMul"],
                             extra_options={"MatMulConstBOnly": True})
            q = onnx.load(out)
    finally:
        root.setLevel(level)
    done = sum(n.op_type == "MatMulInteger" for n in q.graph.node)
    tables = sum(n.op_type == "DequantizeLinear" and n.name.startswith("embedding")
                 for n in q.graph.node)
    if done != len(nodes) or tables != len(gathers):
        raise ValueError(f"onnxruntime quantised {done} MatMul nodes and {tables} embedding "
                         f"tables; {len(nodes)} and {len(gathers)} were asked")
    return q


def int8_card(qmax, layers, tables):
    """What model.json says about an int8 graph."""
    return {"path": "onnxruntime.quantization.quantize_dynamic",
            "weights": "int8, symmetric, per output channel", "weight_qmax": qmax,
            "activations": "uint8, asymmetric, per tensor, at every call (DynamicQuantizeLinear)",
            "layers": layers, "embedding_tables": f"{tables}, uint8, one scale per table",
            "fp32": "LayerNorms, attention scores, pooler, task head"}
