"""`minibert ...`: one argparse program with a subcommand for each job.

Each subcommand lives beside the code it runs and registers itself through a `register(sub)`
function; this file only collects them. Data a command produces (JSON, predictions, vectors) goes
to stdout alone; logs, progress and the resolved config go to stderr, so pipes work.
"""

import argparse
import importlib
import sys

# (module, what it adds). Each module has register(subparsers).
COMMANDS = [
    "minibert.commands",  # weights import, embed, fill-mask
    "train.datasets",  # data get
    "train.finetune",  # finetune
    "train.predict",  # predict
    "train.tokenizer_train",  # tokenizer train
    "train.pretrain",  # pretrain
    "train.diagnose",  # diagnose
    "train.memory",  # memory
    "train.sweep",  # sweep
    "train.plot",  # plot
    "train.report",  # report
]


def build_parser():
    parser = argparse.ArgumentParser(prog="minibert", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    # the command line as given: `--nproc N` re-runs it under torchrun (train/distributed.py)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("minibert: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
