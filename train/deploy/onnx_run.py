"""An exported graph (onnx_export.py, or its int8 form from int8.py) run by onnxruntime, standing
where minibert's TaskModel stands, so that `minibert predict --backend onnx` answers with the
task's own `read_inputs` and `predict`: the same tokenisation, windows, decoding and JSON lines as
the run the graph came from.

A TaskModel is `head(bert, batch)`. Here `bert` is `OnnxGraph`, which runs the whole graph on a
batch and returns its outputs by name, and the head is a `GraphHead`, which turns those outputs
back into the dict that the task's head returns in minibert:
    classification  {"logits": (B, K)}
    regression      {"predictions": (B,)} in standardised units, as the head gives them: the graph
                    answers in the data's units and the task maps predictions back itself
    tokens          {"word_logits", "word_mask"}: minibert's TokenHead gathers first pieces from
                    the graph's emissions, and decodes them (CRF Viterbi with crf.safetensors)
    qa              {"start_logits", "end_logits"}
A multitask graph gets one GraphHead per head, reading the outputs named "NAME.".

Limits: CPU (onnxruntime's CPUExecutionProvider); the whole graph runs for every batch, so a
multitask graph computes every head for each head's inputs.
"""

import os

import torch
import torch.nn as nn

from minibert.checkpoint import read_safetensors
from minibert.errors import CheckpointError
from train.deploy.onnx_export import read_card
from train.finetune.finetune import TASKS
from train.tasks.crf import CRF
from train.tasks.tagging import TokenHead
from train.tasks.task import TaskModel, load_head_state, task_from_file


class OnnxGraph:
    """model.onnx in an onnxruntime session: batch (dict of (B, T) tensors) -> {output: tensor}."""

    def __init__(self, path, threads=None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf
        try:
            self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        except (Fail, InvalidGraph, InvalidProtobuf) as e:  # a file cut short, or not ONNX
            raise CheckpointError(f"{path}: not a readable ONNX model ({str(e).strip()}); "
                                  "export it again") from None
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, batch):
        feeds = {n: batch[n].cpu().numpy() for n in self.inputs}  # int64 (B, T) each
        values = self.session.run(self.outputs, feeds)
        return {n: torch.from_numpy(v) for n, v in zip(self.outputs, values)}


class GraphHead(nn.Module):
    """One task head's view of the graph's outputs, in the form minibert's head returns."""

    def __init__(self, meta, prefix, crf_state, crf_path):
        super().__init__()
        self.meta, self.prefix, self.kind = meta, prefix, meta["task"]
        self.tagger = None
        if self.kind == "tokens":
            K = len(meta["labels"])
            crf = None
            if meta["crf"]:
                if not os.path.exists(crf_path):
                    raise CheckpointError(f"{crf_path}: missing; task.json has a CRF head, whose "
                                          "transitions the export writes there")
                crf = CRF(K)
                load_head_state(crf, {k[len("crf."):]: v for k, v in crf_state.items()},
                                crf_path)
            # TokenHead's own code reads first pieces and decodes; its linear layer already ran
            # inside the graph, so here it is the identity on the emissions.
            self.tagger = TokenHead(K, K, 0.0, crf)
            self.tagger.out = nn.Identity()

    def forward(self, graph, batch):
        out = graph(batch)
        p = self.prefix
        if self.kind == "classification":
            return {"logits": out[p + "logits"]}  # (B, K)
        if self.kind == "regression":
            y = out[p + "logits"].squeeze(-1)  # (B,) in the data's units
            return {"predictions": (y - self.meta["target_mean"]) / self.meta["target_std"]}
        if self.kind == "tokens":
            emissions = out[p + "logits"]  # (B, T, K)
            return self.tagger(lambda *_: emissions, batch)
        if self.kind == "qa":
            return {"start_logits": out[p + "start_logits"], "end_logits": out[p + "end_logits"]}
        raise ValueError(f"task {self.kind!r} has no ONNX form")

    def decode(self, out):  # tokens: what TokenTask calls to read tags
        return self.tagger.decode(out)


def load_onnx_task_model(export_dir, threads=None):
    """(TaskModel running export_dir/model.onnx, the task from its task.json)."""
    card = read_card(export_dir)
    task = task_from_file(TASKS, os.path.join(export_dir, "task.json"))
    meta = task.meta
    crf_path = os.path.join(export_dir, "crf.safetensors")
    crf = read_safetensors(crf_path) if os.path.exists(crf_path) else {}

    def own_crf(prefix):  # one head's CRF tensors, without the head's name
        return {k[len(prefix):]: v for k, v in crf.items() if k.startswith(prefix)}
    if meta["task"] == "multitask":
        head = nn.ModuleDict({h["name"]: GraphHead(h["meta"], h["name"] + ".",
                                                   own_crf(h["name"] + "."), crf_path)
                              for h in meta["heads"]})
    else:
        head = GraphHead(meta, "", crf, crf_path)
    graph = OnnxGraph(os.path.join(export_dir, "model.onnx"), threads)
    missing = sorted(set(card["outputs"]) - set(graph.outputs))
    if missing:
        raise CheckpointError(f"{export_dir}/model.onnx lacks outputs {missing} that model.json "
                              "lists: the two come from different exports; export it again")
    return TaskModel(graph, head).eval(), task
