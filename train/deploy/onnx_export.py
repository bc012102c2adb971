"""`minibert export --to onnx`: the whole fine-tuned model, encoder, pooling and task head, as one
ONNX graph for onnxruntime.

Exporter: `torch.onnx.export(..., dynamo=True)`, the one torch recommends and, since torch 2.9,
its default (`dynamo=False`, the TorchScript-based exporter, raises a DeprecationWarning in torch
2.13). It traces with torch.export, so batch and sequence are
declared dynamic through `dynamic_shapes` (torch.export.Dim), and `check_dynamic` then reads the
graph back: every input and output must keep a symbolic batch dimension, and a symbolic sequence
dimension where it has one; a dimension frozen at the example's size is an error. The example is
3 x 11, sizes no test or user batch is tied to. The dynamo exporter handled every task here, so the
legacy exporter is not used.

Inputs (int64): input_ids and attention_mask (B, T), and token_type_ids (B, T) only for tasks that
read text pairs (QA; classification or regression with a pair field). A single-text task's graph
fills segment A (zeros) itself, so callers omit token_type_ids; a pair task's graph requires it,
since leaving it out would silently read the second text as the first.

Outputs, named as transformers names them:
    classification  logits (B, K): class scores; label names in task.json
    regression      logits (B, 1): the prediction in the data's units (the run's target
                    standardisation, if any, is folded into the graph)
    tokens          logits (B, T, K): per-piece emission scores. Reading each word's first piece,
                    BIO repair and, with a CRF, Viterbi decoding run outside the graph
                    (onnx_run.py), with the CRF's transitions in crf.safetensors
    qa              start_logits, end_logits (B, T); padding at -1e4, as the head gives them
    multitask       each head's outputs, named "NAME.logits" etc.; one encoder pass feeds all

Beside model.onnx: the tokenizer, task.json (the run's own: labels, fields, max length) and
model.json (inputs, outputs and what each means, opset, exporter, fusions, int8).

`--optimize` runs onnxruntime.transformers' BERT optimizer and reports its fused-operator counts.
On dynamo graphs (torch 2.13, onnxruntime 1.32) it fuses SkipLayerNormalization and BiasGelu; its
Attention and EmbedLayerNormalization patterns are those of TorchScript-exported graphs and do not
match, which the report shows as zero.

Limits: one file, so under protobuf's 2 GB (BERT-large is 1.3 GB); CPU float32 only.
"""

import os

import torch
import torch.nn as nn

from minibert.errors import CheckpointError
from minibert.io import (atomic_save_safetensors, atomic_write_bytes, atomic_write_json,
                         load_json_object)

EXAMPLE_B, EXAMPLE_T = 3, 11  # the export example; tests check other sizes


def reads_pairs(meta):
    """Does this task (any head of it) put a second text in segment B?"""
    if meta["task"] == "multitask":
        return any(reads_pairs(h["meta"]) for h in meta["heads"])
    return meta["task"] == "qa" or meta.get("pair_field") is not None


def heads_of(meta, head):
    """[(output name prefix, task meta, head module)]: one entry, or one per multitask head."""
    if meta["task"] == "multitask":
        return [(h["name"] + ".", h["meta"], head[h["name"]]) for h in meta["heads"]]
    return [("", meta, head)]


class _Encoded:
    """Stands for the encoder inside a head's forward: returns the hidden states computed once,
    so that several heads share one encoder pass; `pool` is the encoder's own pooler."""

    def __init__(self, bert, hidden):
        self.bert, self.hidden = bert, hidden

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.hidden  # (B, T, C)

    def pool(self, hidden):
        return self.bert.pool(hidden)


def head_outputs(meta, head, encoded, batch):
    """[(name, tensor, meaning)]: what the graph outputs for one head, computed by the head's own
    forward wherever the head's answer is a tensor."""
    kind = meta["task"]
    if kind == "classification":
        return [("logits", head(encoded, batch)["logits"],  # (B, K)
                 "(batch, labels) class scores; softmax gives probabilities")]
    if kind == "regression":
        z = head(encoded, batch)["predictions"]  # (B,) in standardised units
        y = z * meta["target_std"] + meta["target_mean"]  # (B,) in the data's units
        return [("logits", y.unsqueeze(-1), f"(batch, 1) {meta['target_field']} in the data's "
                 "units")]
    if kind == "tokens":
        emissions = head.out(encoded.hidden)  # (B, T, C) -> (B, T, K); dropout is off in eval
        return [("logits", emissions, "(batch, sequence, tags) emission scores per piece; a "
                 "word's tag is read at its first piece" + (", by CRF Viterbi outside the graph"
                                                            if meta["crf"] else ""))]
    if kind == "qa":
        out = head(encoded, batch)
        return [("start_logits", out["start_logits"], "(batch, sequence) answer start scores"),
                ("end_logits", out["end_logits"], "(batch, sequence) answer end scores")]
    raise ValueError(f"task {kind!r} has no ONNX form")


class GraphModel(nn.Module):
    """A TaskModel as the exporter traces it: tensors in, a tuple of tensors out."""

    def __init__(self, model, meta):
        super().__init__()
        self.bert, self.head, self.meta = model.bert, model.head, meta

    def outputs(self, input_ids, attention_mask, token_type_ids=None):
        """[(name, tensor, meaning)] for every head."""
        if token_type_ids is None:  # a single-text task: every token is in segment A
            token_type_ids = torch.zeros_like(input_ids)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "token_type_ids": token_type_ids}
        encoded = _Encoded(self.bert, self.bert(input_ids, attention_mask, token_type_ids))
        return [(prefix + name, t, meaning)
                for prefix, meta, head in heads_of(self.meta, self.head)
                for name, t, meaning in head_outputs(meta, head, encoded, batch)]

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return tuple(t for _, t, _ in self.outputs(input_ids, attention_mask, token_type_ids))


def example_inputs(config, pairs):
    """{name: (EXAMPLE_B, EXAMPLE_T) int64}: random ids, the last row padded, segment B in the
    second half when the task reads pairs."""
    g = torch.Generator().manual_seed(0)
    B, T = EXAMPLE_B, min(EXAMPLE_T, config.max_position_embeddings)
    ids = torch.randint(0, config.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[-1, T // 2:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if pairs:
        out["token_type_ids"] = (torch.arange(T) >= T // 2).long().expand(B, T).clone()
    return out


def export_graph(model, meta):
    """(ModelProto, {output name: meaning}) of a TaskModel in eval mode, dynamic in batch and
    sequence."""
    graph = GraphModel(model, meta).eval()
    example = example_inputs(model.bert.config, reads_pairs(meta))
    names = list(example)
    with torch.no_grad():
        meanings = {n: m for n, _, m in graph.outputs(**example)}
        batch = torch.export.Dim("batch")
        seq = torch.export.Dim("sequence", max=model.bert.config.max_position_embeddings)
        dynamic = {n: {0: batch, 1: seq} for n in names}
        program = torch.onnx.export(graph, tuple(example.values()), dynamo=True,
                                    input_names=names, output_names=list(meanings),
                                    dynamic_shapes=dynamic, verbose=False, report=False)
    proto = program.model_proto
    check_dynamic(proto, names, meanings)
    return proto, meanings


def check_dynamic(proto, inputs, meanings):
    """Fail if an input or output lost its symbolic batch or sequence dimension."""
    got_in = [v.name for v in proto.graph.input]
    if got_in != inputs:
        raise ValueError(f"exported graph has inputs {got_in}, expected {inputs}")
    for v in list(proto.graph.input) + list(proto.graph.output):
        dims = v.type.tensor_type.shape.dim
        per_token = v.name in inputs or meanings.get(v.name, "").startswith("(batch, sequence")
        for axis, what in [(0, "batch"), (1, "sequence")][:2 if per_token else 1]:
            if not dims[axis].dim_param:
                raise ValueError(f"exported graph: {v.name} has its {what} dimension frozen at "
                                 f"{dims[axis].dim_value} (the example is {EXAMPLE_B} x "
                                 f"{EXAMPLE_T})")


def optimize_graph(proto, config):
    """onnxruntime.transformers' BERT optimizer: (optimized ModelProto, {fused op: count})."""
    from onnxruntime.transformers.optimizer import optimize_model

    # a pruned model's layers differ in heads: 0, 0 makes the fusion read each layer's own
    # head count and width from its Reshape nodes
    pruned = bool(config.pruned_heads)
    opt = optimize_model(proto, model_type="bert", opt_level=0,
                         num_heads=0 if pruned else config.num_attention_heads,
                         hidden_size=0 if pruned else config.hidden_size)
    return opt.model, opt.get_fused_operator_statistics()


def opset_of(proto):
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def write_onnx_dir(out_dir, proto, meanings, tok, meta, head, notes):
    """model.onnx, tokenizer, task.json, model.json (and crf.safetensors for a CRF), each file
    atomically. model.json goes first and comes back last: an export killed part-way over an
    earlier one has none, and predict refuses the folder instead of pairing one export's graph
    with the other's task."""
    os.makedirs(out_dir, exist_ok=True)
    for stale in ("model.json", "crf.safetensors"):
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    atomic_write_bytes(os.path.join(out_dir, "model.onnx"), proto.SerializeToString())
    # what the run read, as predict reads it (a multi-task model: its heads' longest)
    tok.save(out_dir, model_max_length=meta.get("max_length") or max(
        h["meta"]["max_length"] for h in meta.get("heads", [])))
    atomic_write_json(os.path.join(out_dir, "task.json"), meta)
    # the CRF's transitions: Viterbi decoding runs outside the graph and needs them
    crf = {k: v for k, v in head.state_dict().items() if "crf" in k.split(".")}
    if crf:
        atomic_save_safetensors(os.path.join(out_dir, "crf.safetensors"), crf)
    inputs = {"input_ids": "(batch, sequence) int64 token ids",
              "attention_mask": "(batch, sequence) int64, 1 at real tokens, 0 at padding"}
    if reads_pairs(meta):
        inputs["token_type_ids"] = "(batch, sequence) int64, 0 for the first text, 1 the second"
    card = {"format": "onnx", "exporter": f"torch.onnx.export(dynamo=True), torch "
                                          f"{torch.__version__.split('+')[0]}",
            "opset": opset_of(proto), "inputs": inputs, "outputs": meanings, **notes}
    atomic_write_json(os.path.join(out_dir, "model.json"), card)
    return card


def read_card(export_dir):
    """model.json of an export directory, checked to be an ONNX export."""
    path = os.path.join(export_dir, "model.json")
    if not os.path.exists(path) or not os.path.exists(os.path.join(export_dir, "model.onnx")):
        raise CheckpointError(f"{export_dir}: no model.onnx and model.json (make one with "
                              "`minibert export RUN --to onnx --out DIR`)")
    card = load_json_object(path, CheckpointError)
    if not isinstance(card.get("outputs"), dict):
        raise CheckpointError(f"{path}: no outputs listed: not a model.json minibert wrote; "
                              "export it again")
    return card
