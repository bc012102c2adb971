"""The errors a user fixes by changing an input, as opposed to bugs.

`UserError` is a file, a checkpoint, a config or a flag that is wrong. Its message names the
place (a file, `file:line` or `file:key`), says what is wrong and, where it can, what to do. The
`minibert` command prints such an error as one line and exits with status 2, without a traceback
(`minibert --debug ...` or MINIBERT_DEBUG=1 shows it); any other exception is a bug and keeps its
traceback. The kinds below are also ValueErrors (or RuntimeErrors), as they were before this
module existed, so code that catches those still does.
"""

import os


# the OSErrors that are inputs to fix, as a UserError is: a file or directory that is missing,
# is there already, is of the wrong kind, or may not be read or written
INPUT_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                   PermissionError)


class UserError(Exception):
    """An input that is wrong: the message says where, what, and what to do."""


class ConfigError(UserError, ValueError):
    """A model config (config.json) or its values."""


class CheckpointError(UserError, ValueError):
    """A checkpoint directory: missing files, keys or shapes that do not fit, a damaged file."""


class FetchError(UserError, RuntimeError):
    """A pinned archive that cannot be fetched, or whose sha256 differs."""


class BackendError(UserError, RuntimeError):
    """An attention backend that cannot run here: no GPU, or a Triton that cannot run the
    kernels."""


class MissingPackage(UserError, ImportError):
    """An optional package that the chosen setting needs is not installed."""


def missing_from_checkpoint(path, what):
    """The CheckpointError of a directory `path` that lacks `what`; a directory that is a
    training run (its model in RUN/best) is pointed there."""
    best = os.path.join(path, "best")
    run = os.path.isfile(os.path.join(best, "config.json"))
    return CheckpointError(f"{path}: {what}" + (f"; a training run: its model is {best}" if run
                                                  else ""))
