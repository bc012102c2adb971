"""`minibert predict RUN [--text T ... | --input F | < TEXTS] [--output F] [--backend torch|onnx]`: predictions
as JSON lines (one per input, on stdout unless --output).

--backend torch (the default) reads a fine-tuning run's best checkpoint; --backend onnx reads a
directory written by `minibert export --to onnx` or `minibert quantize` and runs its graph with
onnxruntime (train/deploy/onnx_run.py), on the CPU. Both go through the task's own read_inputs
and predict, so they answer the same JSON lines."""

import os
import sys

import torch

from minibert.commands import (add_model_argument, check_utf8, int_at_least, read_stdin_lines,
                               resolve_model)
from minibert.io import atomic_write_text, json_line
from minibert.tokenizer import Tokenizer
from train.finetune.finetune import load_task_model
from train.loop.device import pick_device
from train.loop.rundir import RunDir


def is_task_model(d):
    return all(os.path.exists(os.path.join(d, f)) for f in ("task.json", "head.safetensors"))


def task_model_dir(run):
    """RUN's best/ checkpoint (best.old after a kill between renames), or RUN itself when it is
    one; for a `minibert prune` DIR, the model it ended with: finetune/best/ once that fine-tune
    has finished (in prune, or by `finetune --resume DIR/finetune`), else pruned/. None when RUN
    holds no fine-tuned model."""
    best = RunDir(run, writer=False).find_dir("best") or run
    if not is_task_model(best) and os.path.exists(os.path.join(run, "results.json")):
        tuned = os.path.join(run, "finetune")
        pruned = [os.path.join(run, "pruned")]
        if os.path.exists(os.path.join(tuned, "results.json")):
            pruned.insert(0, os.path.join(tuned, "best"))
        best = next((d for d in pruned if is_task_model(d)), best)
    return best if is_task_model(best) else None


def find_best(run, command):
    """task_model_dir(run), or SystemExit naming RUN when it holds no fine-tuned model. A run
    whose training has not finished (no results.json: killed, or still running) serves its best/
    so far, and the command says so."""
    best = task_model_dir(run)
    if best is None:
        onnx = os.path.exists(os.path.join(run, "model.onnx"))
        raise SystemExit(f"minibert {command}: {run} holds no fine-tuned model (no "
                         "best/task.json and best/head.safetensors)" + (
                             "; it holds an ONNX export: add --backend onnx" if onnx and
                             command == "predict" else ""))
    if os.path.dirname(os.path.realpath(best)) == os.path.realpath(run) and not os.path.exists(
            os.path.join(run, "results.json")):
        print(f"note: {run} has not finished training (no results.json): {command} uses its "
              f"best checkpoint so far, {best}", file=sys.stderr)
    return best


def load_onnx(export_dir, threads):
    try:
        from train.deploy.onnx_run import load_onnx_task_model
    except ImportError as e:
        raise SystemExit(f"minibert predict: --backend onnx needs {e.name} (pip install "
                         "'minibert[deploy]')") from None
    return load_onnx_task_model(export_dir, threads)  # a missing file: one line, by train/cli


# what a run (or a prune DIR) writes beside its model; predictions may go there under another name
RUN_OWN = ("config.json", "inputs.json", "metrics.jsonl", "results.json", "diagnosis.json",
           "sweep.json")


def check_output(output, model, run, input_):
    """--output, checked before any work: a file to write, and not one that is read here: the
    --input, a file of the model's directory, or one of the run's own files."""
    if os.path.isdir(output):
        raise SystemExit(f"minibert predict: --output {output}: a directory; give a file name")
    real, run = os.path.realpath(output), os.path.realpath(run)
    if input_ and real == os.path.realpath(input_):
        raise SystemExit(f"minibert predict: --output {output} is the --input file; writing "
                         "the predictions there would replace the data: give another file")
    if os.path.commonpath([real, os.path.realpath(model)]) == os.path.realpath(model) or (
            os.path.commonpath([real, run]) == run
            and (os.path.dirname(real) != run or os.path.basename(real) in RUN_OWN)):
        raise SystemExit(f"minibert predict: --output {output} would replace a file of the model "
                         f"or its run ({run}); give another file")


def pick_heads(task, heads, model):
    """The task to predict with: a multi-task model's heads named by --head (default: all of
    them, when they all read the same kind of input)."""
    if task.name != "multitask":
        if heads:
            raise SystemExit(f"minibert predict: --head {heads[0]}: {model} is a single-task "
                             f"model ({task.name}); --head picks heads of a multi-task one")
        return task
    kinds = task.input_kinds()
    unknown = [h for h in heads or () if h not in kinds]
    if unknown:
        raise SystemExit(f"minibert predict: --head {unknown[0]}: {model} has no such head; its "
                         f"heads: {', '.join(kinds)}")
    task = task.only(heads) if heads else task
    kinds = task.input_kinds()
    if len(set(kinds.values())) > 1:
        said = "; ".join(f"{n} reads {k}" for n, k in kinds.items())
        raise SystemExit(f"minibert predict: {model}: its heads read different inputs ({said}); "
                         "choose the heads that read yours with --head NAME")
    return task


def cmd_predict(args):
    resolve_model(args, "predict")
    # the directory the model is read from: a run's best/ (a file beside it in RUN is fine)
    tok_dir = args.model if args.backend == "onnx" else find_best(args.model, "predict")
    if args.output:
        check_output(args.output, tok_dir, args.model, args.input)
    if args.backend == "onnx":
        if args.device not in ("auto", "cpu"):
            raise SystemExit(f"minibert predict: --device {args.device}: --backend onnx runs on "
                             "the CPU (onnxruntime's CPU provider); drop --device")
        device = "cpu"  # batches stay on the CPU
        model, task = load_onnx(args.model, args.threads)
    else:
        device = pick_device(args.device)
        if args.threads:  # the command's process: nothing else runs in it to disturb
            torch.set_num_threads(args.threads)
        model, task = load_task_model(tok_dir, device)
    task = pick_heads(task, args.head, args.model)  # before stdin: a wrong --head says so first
    texts, where = args.text, "--text {}"
    if texts:
        check_utf8(texts, "predict")
    elif not args.input:
        texts, where = read_stdin_lines("predict", "--text or --input"), "stdin:{}"
    data = task.read_inputs(texts, args.input, Tokenizer.from_dir(tok_dir), args.batch_size, where)
    rows = task.predict(model, data, device)
    lines = "".join(json_line(row) + "\n" for row in rows)
    if args.output:  # atomically: a killed predict leaves the old file, never half a new one
        atomic_write_text(args.output, lines)
        print(f"predict: wrote {len(rows)} predictions to {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(lines)


def register(sub):
    p = sub.add_parser("predict", help="predict with a fine-tuned run, as JSON lines")
    add_model_argument(p, "run directory (or its best/); with --backend onnx, a directory "
                          "written by `minibert export --to onnx` or `minibert quantize`")
    given = p.add_mutually_exclusive_group()  # --input beside --text would be left unread
    given.add_argument("--text", action="append", help="an input text (repeatable); with neither "
                   "--text nor --input, texts are read from stdin, one a line. A model of text "
                   "pairs (--pair-field) reads 'TEXT ||| PAIR', a QA model 'QUESTION ||| "
                   "CONTEXT' (its answers' start/end index CONTEXT without the spaces around it)")
    given.add_argument("--input", help="a file in the run's training format")
    p.add_argument("--head", action="append", metavar="NAME",
                   help="a multi-task model: predict with this head (repeatable; default: every "
                        "head, which must then all read the same kind of input)")
    p.add_argument("--output", help="write JSON lines here instead of stdout")
    p.add_argument("--batch-size", type=int_at_least(1), default=64)
    p.add_argument("--device", default="auto", help="torch backend: cpu, cuda, auto")
    p.add_argument("--backend", choices=("torch", "onnx"), default="torch",
                   help="torch: the run's checkpoint; onnx: an exported graph, by onnxruntime")
    p.add_argument("--threads", type=int_at_least(1), default=None,
                   help="CPU threads: torch's, or onnxruntime's intra-op threads (default: "
                        "their own choice)")
    p.set_defaults(func=cmd_predict)
