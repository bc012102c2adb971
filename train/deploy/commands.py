"""`minibert export RUN --to hf|onnx --out DIR [--optimize]` and `minibert quantize RUN --out DIR`.

RUN is a fine-tuning run directory (its best/ checkpoint is read) or a best/ directory itself.
`export --to hf` writes the transformers class of the task (hf.py) or refuses in one line;
`export --to onnx` writes the whole model as one graph (onnx_export.py), `--optimize` adds
onnxruntime's transformer fusions and reports them. `quantize` writes the same ONNX directory
with the encoder's Linear layers in int8 (int8.py: onnxruntime's dynamic quantisation, weights
per output channel); `minibert predict DIR --backend onnx` serves either.

What is written and chosen goes to stderr; nothing goes to stdout.
"""

import argparse
import contextlib
import logging
import os
import sys
import warnings

from minibert.commands import add_model_argument, resolve_model
from minibert.tokenizer import Tokenizer
from train.deploy.hf import NotExportable, export_hf
from train.deploy.int8 import (embedding_gathers, encoder_matmuls, int8_card, quantize_graph,
                               weight_qmax)
from train.deploy.onnx_export import export_graph, optimize_graph, write_onnx_dir
from train.finetune.finetune import load_task_model
from train.finetune.predict import find_best


# what a run, its best/ or any checkpoint holds: an --out holding one is somebody's model, not
# ours to write over (export --to hf writes config.json and model.safetensors); an earlier ONNX
# export (model.onnx, and model.json unless it was killed part-way) may be written again, but
# not mixed with a checkpoint
RUN_FILES = ("task.json", "head.safetensors", "metrics.jsonl", "state", "config.json",
             "model.safetensors", "results.json", "pruned")  # the last two: a prune's DIR


def check_out(out, command, onnx=True):
    """--out must be a directory to write, or nothing yet; checked before any work."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"minibert {command}: --out {out}: a file, not a directory to write to")
    def has(name):
        return os.path.exists(os.path.join(out, name))
    earlier_onnx = has("model.onnx") or has("model.json")
    held = [f for f in RUN_FILES if has(f) and not (onnx and earlier_onnx and f == "task.json")]
    if not onnx and earlier_onnx:
        held.insert(0, "model.onnx")
    if held:
        raise SystemExit(f"minibert {command}: --out {out} holds a checkpoint, a run or an "
                         f"export ({held[0]}); writing there would replace or mix with its "
                         "model: give another directory, or delete it first")


def load_run(run, out, command, onnx=True):
    """(TaskModel in eval mode on the CPU, task, tokenizer, best dir) of RUN, once --out is
    known to be writable."""
    check_out(out, command, onnx=onnx)
    best = find_best(run, command)
    model, task = load_task_model(best, "cpu")
    return model, task, Tokenizer.from_dir(best), best


@contextlib.contextmanager
def deploy_extra(command):
    """onnx, onnxscript and onnxruntime come with the deploy extra: say so in one line."""
    try:
        yield
    except ImportError as e:
        raise SystemExit(f"minibert {command}: {e.name} is missing; install the deploy extra "
                         "(pip install 'minibert[deploy]')") from None


def onnx_graph(model, task, command):
    """The fp32 graph. The exporter's warnings and log lines are about its own internals (and
    torchvision's absence), not the user's model, so the command leaves them out."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with deploy_extra(command), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return export_graph(model, task.meta)
    finally:
        log.setLevel(level)


def mb(path):
    return os.path.getsize(path) / 2 ** 20


def cmd_export(args):
    resolve_model(args, "export")
    model, task, tok, best = load_run(args.model, args.out, "export", onnx=args.to == "onnx")
    if args.to == "hf":
        if args.optimize:
            raise SystemExit("minibert export: --optimize applies to --to onnx only")
        try:
            cls = export_hf(model, tok, task.meta, args.out)
        except NotExportable as e:
            raise SystemExit(f"minibert export: {best}: {e}") from None
        print(f"export: {best} -> {args.out}: transformers {cls}, "
              f"{mb(os.path.join(args.out, 'model.safetensors')):.1f} MB", file=sys.stderr)
        return 0
    proto, meanings = onnx_graph(model, task, "export")
    notes = {"fusions": None, "int8": None}
    if args.optimize:
        with deploy_extra("export"):
            proto, stats = optimize_graph(proto, model.bert.config)
        notes["fusions"] = {op: n for op, n in stats.items() if n}
        made = ", ".join(f"{op} x{n}" for op, n in notes["fusions"].items()) or "none"
        missed = ", ".join(op for op in ("Attention", "EmbedLayerNormalization")
                           if not stats.get(op))
        print(f"optimize: onnxruntime.transformers fused {made}"
              + (f"; not matched: {missed}" if missed else ""), file=sys.stderr)
    card = write_onnx_dir(args.out, proto, meanings, tok, task.meta, model.head, notes)
    print(f"export: {best} -> {args.out}/model.onnx ({mb(os.path.join(args.out, 'model.onnx')):.1f}"
          f" MB, opset {card['opset']}); inputs {', '.join(card['inputs'])}; outputs "
          f"{', '.join(card['outputs'])}", file=sys.stderr)
    return 0


def cmd_quantize(args):
    resolve_model(args, "quantize")
    model, task, tok, best = load_run(args.model, args.out, "quantize")
    if args.reduce_range is None:
        qmax = weight_qmax()
        why = "this CPU " + ("has VNNI or is not x86" if qmax == 127 else "is x86 without VNNI")
    else:
        qmax = 64 if args.reduce_range else 127
        why = "--reduce-range" if args.reduce_range else "--no-reduce-range"
    print(f"quantize: fast path onnxruntime quantize_dynamic; weights int8 per output channel, "
          f"|q| <= {qmax} ({why}); activations uint8 per tensor, at every call", file=sys.stderr)
    proto, meanings = onnx_graph(model, task, "quantize")
    fp32_mb = len(proto.SerializeToString()) / 2 ** 20
    layers = encoder_matmuls(proto, model.bert.config.num_hidden_layers)
    tables = embedding_gathers(proto)
    with deploy_extra("quantize"):
        q = quantize_graph(proto, layers, qmax, tables)
    notes = {"fusions": None, "int8": int8_card(qmax, len(layers), len(tables))}
    write_onnx_dir(args.out, q, meanings, tok, task.meta, model.head, notes)
    print(f"quantize: {best} -> {args.out}/model.onnx: {len(layers)} encoder Linear layers in "
          f"int8, {len(tables)} embedding tables in uint8, {fp32_mb:.1f} MB fp32 -> "
          f"{mb(os.path.join(args.out, 'model.onnx')):.1f} MB", file=sys.stderr)
    return 0


def register(sub):
    p = sub.add_parser("export", help="write a fine-tuned run as transformers or ONNX")
    add_model_argument(p, "finetune run directory (or its best/)")
    p.add_argument("--to", required=True, choices=("hf", "onnx"),
                   help="hf: the transformers class of the task; onnx: one graph, encoder to head")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--optimize", action="store_true",
                   help="onnx: run onnxruntime's transformer optimizer and report its fusions")
    p.set_defaults(func=cmd_export)

    q = sub.add_parser("quantize", help="write a fine-tuned run as an int8 ONNX graph")
    add_model_argument(q, "finetune run directory (or its best/)")
    q.add_argument("--out", required=True, help="directory to write")
    q.add_argument("--reduce-range", action=argparse.BooleanOptionalAction, default=None,
                   help="7-bit weights, for x86 CPUs without VNNI (default: read from the CPU)")
    q.set_defaults(func=cmd_quantize)
