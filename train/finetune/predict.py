"""`minibert predict RUN --text T ... | --input F [--output F]`: predictions as JSON lines (one per
input, on stdout unless --output) from the best checkpoint of a fine-tuning run."""

import json
import os
import sys

from minibert.tokenizer import Tokenizer
from train.finetune.finetune import load_task_model
from train.loop.device import pick_device


def cmd_predict(args):
    best = os.path.join(args.run, "best") if os.path.isdir(os.path.join(args.run, "best")) \
        else args.run
    if not os.path.exists(os.path.join(best, "task.json")):
        raise SystemExit(f"minibert predict: {args.run} holds no fine-tuned model "
                         "(no best/task.json)")
    if not args.text and not args.input:
        raise SystemExit("minibert predict: give --text or --input")
    device = pick_device(args.device)
    model, task = load_task_model(best, device)
    data = task.read_inputs(args.text, args.input, Tokenizer.from_dir(best), args.batch_size)
    rows = task.predict(model, data, device)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    for row in rows:
        out.write(json.dumps(row) + "\n")
    if args.output:
        out.close()
        print(f"predict: wrote {len(rows)} predictions to {args.output}", file=sys.stderr)


def register(sub):
    p = sub.add_parser("predict", help="predict with a fine-tuned run, as JSON lines")
    p.add_argument("run", help="run directory (or its best/)")
    p.add_argument("--text", action="append", help="an input text (repeatable)")
    p.add_argument("--input", help="a file in the run's training format")
    p.add_argument("--output", help="write JSON lines here instead of stdout")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_predict)
