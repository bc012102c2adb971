"""`minibert ...`: one argparse program with a subcommand for each job.

Each subcommand lives beside the code it runs and registers itself through a `register(sub)`
function; this file only collects them. It lives in `train`, not in `minibert`, because the
arrows run one way: `train` imports `minibert`, never the reverse. Data a command produces
(JSON, predictions, vectors) goes to stdout alone; logs, progress and the resolved config go to
stderr, so pipes work.

`python -m train.cli` is the same program (what `--nproc` and `sweep` start, with `python -P`:
see train/command.py).
"""

import argparse
import errno
import os
import signal
import sys
import traceback

import minibert.commands  # weights import, embed, fill-mask
from minibert.errors import INPUT_OS_ERRORS, UserError
import train.data.datasets  # data get
import train.deploy.commands  # export, quantize
import train.distill.distill  # distill
import train.finetune.finetune  # finetune
import train.finetune.predict  # predict
import train.pretrain.pretrain  # pretrain
import train.pretrain.tokenizer  # tokenizer train
import train.prune.prune  # prune
import train.runs.diagnose  # diagnose
import train.runs.memory  # memory
import train.runs.plot  # plot
import train.runs.report  # report
import train.runs.sweep  # sweep

COMMANDS = [minibert.commands, train.data.datasets, train.finetune.finetune,
            train.distill.distill,
            train.finetune.predict, train.pretrain.tokenizer, train.pretrain.pretrain,
            train.runs.diagnose, train.runs.memory, train.runs.sweep, train.runs.plot,
            train.runs.report, train.deploy.commands, train.prune.prune]


class Parser(argparse.ArgumentParser):
    """argparse, with a wrong flag reported as one line (the usage is one --help away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser():
    parser = Parser(prog="minibert", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an input error too (or MINIBERT_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    parser.commands = sub.choices  # name -> the command's parser
    return parser


def main(argv=None):
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's own parser, which knows its flags
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    # the command line as given: `--nproc N` re-runs it under torchrun (train/loop/distributed.py)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("minibert: interrupted", file=sys.stderr)
        return 130
    except (UserError, OSError) as e:
        # The error boundary: an input the user can fix is one line, `minibert CMD: WHERE: what
        # is wrong; what to do`. Anything else is a bug, and keeps its traceback.
        if isinstance(e, OSError) and not isinstance(e, INPUT_OS_ERRORS) \
                and e.errno not in (errno.ENOSPC, errno.EDQUOT):  # a full disk is one line too
            raise
        if args.debug or os.environ.get("MINIBERT_DEBUG") == "1":
            traceback.print_exc()
        print(f"minibert {args.command}: {describe(e)}", file=sys.stderr)
        return 2


def run():
    """The `minibert` program: main(), with a command's own one-line stop (`SystemExit("minibert
    CMD: ...")`, raised where a UserError would need more context than the message) ending as an
    input error does: status 2, and its traceback under --debug. main() itself lets it propagate,
    so that tests and library callers see the exception."""
    try:
        status = main()
        sys.stdout.flush()  # inside the try: a reader that left shows here, not at exit
        return status
    except BrokenPipeError:  # `minibert ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 128 + signal.SIGPIPE  # the status of a program that SIGPIPE ended, as `cat` has
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise  # argparse's exits and plain statuses stay as they are
        if sys.argv[1:2] == ["--debug"] or os.environ.get("MINIBERT_DEBUG") == "1":
            traceback.print_exc()
        print(e.code, file=sys.stderr)
        return 2


def describe(e):
    """The one line for an input error; an OSError says the path first, as the others do."""
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror.lower()}"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return "; ".join(lines).replace(":; ", ": ")  # "X does not fit:\n  missing: ..." -> one line


if __name__ == "__main__":
    sys.exit(run())
