"""`minibert predict RUN --text T ... | --input F [--output F]`: labels and probabilities, as
JSON lines, from the best checkpoint of a fine-tuning run."""

import json
import os
import sys

import torch

from minibert.tokenizer import Tokenizer
from train.classification import EncodedDataset, predict_logits
from train.data import Example, read_examples
from train.finetune import load_task_model, pick_device


def cmd_predict(args):
    best = os.path.join(args.run, "best") if os.path.isdir(os.path.join(args.run, "best")) \
        else args.run
    if not os.path.exists(os.path.join(best, "task.json")):
        raise SystemExit(f"minibert predict: {args.run} holds no fine-tuned model (no best/task.json)")
    device = pick_device(args.device)
    model, task = load_task_model(best, device)
    tok = Tokenizer.from_dir(best)
    if args.text:
        examples = [Example(t, None, None, f"--text {i + 1}") for i, t in enumerate(args.text)]
    elif args.input:
        examples, _ = read_examples(args.input, task["text_field"], task["pair_field"], None)
    else:
        raise SystemExit("minibert predict: give --text or --input")
    data = EncodedDataset(examples, tok, task["max_length"], None, args.batch_size, 0,
                          shuffle=False)
    probs = predict_logits(model, data, device).softmax(-1)  # (N, n_labels)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    labels = task["labels"]
    for ex, p in zip(examples, probs):
        i = int(p.argmax())
        row = {"text": ex.text, "label": labels[i],
               "probabilities": {lab: round(float(q), 5) for lab, q in zip(labels, p)}}
        if ex.pair is not None:
            row["pair"] = ex.pair
        out.write(json.dumps(row) + "\n")
    if args.output:
        out.close()
        print(f"predict: wrote {len(examples)} predictions to {args.output}", file=sys.stderr)


def register(sub):
    p = sub.add_parser("predict", help="predict labels with a fine-tuned run, as JSON lines")
    p.add_argument("run", help="run directory (or its best/)")
    p.add_argument("--text", action="append", help="a text to classify (repeatable)")
    p.add_argument("--input", help="a .jsonl/.csv/.tsv file with the run's text field")
    p.add_argument("--output", help="write JSON lines here instead of stdout")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_predict)
