"""What `--nproc N` starts: torchrun (torch.distributed.run) in this process, with its report of
a failed worker cut to what the user needs.

When a worker fails, torchrun prints a traceback through its own internals and a summary table,
after the worker has already said why in one line (an input error) or with its traceback (a
bug). Here torchrun's ChildFailedError is caught instead: the exit status is the first failed
worker's, and only a worker killed by a signal (the kernel's out-of-memory killer, say), which
could say nothing itself, is named in one line. The workers write to this process's stderr
untouched, so a terminal still shows their redrawn progress bar.

    python -P -m train.loop.torchrun --standalone --nproc-per-node N --no-python CMD ...
"""

import logging
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun


def main(argv):
    # its log line for the failure ("failed (exitcode: 2) local_rank: 0 ...") and its SIGTERMs
    # to the other workers repeat what the exit status says
    for name in list(logging.root.manager.loggerDict):  # some set a level of their own
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        torchrun(argv)
    except SignalException as e:  # Ctrl-C or a kill: the workers were stopped, and said so
        return 128 + e.sigval
    except ChildFailedError as e:
        # the first worker to exit on its own (torchrun ends the others with SIGTERM); on a tie
        # (timestamps are whole seconds) the lowest rank, rank 0, which said why
        rank = min(e.failures, key=lambda r: (e.failures[r].exitcode < 0,
                                              e.failures[r].timestamp, r))
        failure = e.failures[rank]
        if failure.exitcode >= 0:
            return failure.exitcode
        print(f"minibert: rank {rank} was killed by signal {failure.signal_name()}"
              + (" (out of memory?)" if failure.exitcode == -9 else ""), file=sys.stderr)
        return 128 - failure.exitcode  # as a shell reports a killed process
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
