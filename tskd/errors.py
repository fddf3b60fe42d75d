"""The one base class of expected failures.

A ``TskdError`` is something the user can fix: bad params, a missing or damaged dataset or
file, a loss that diverged, a cluster that refuses the settings. Its message names the file,
key or path and what was expected, so ``tskd`` prints the message alone and exits 2. Every
other exception is a defect or an environment failure (a CUDA, NCCL or shape error): the
CLI lets it through with its traceback, which is what a SLURM log needs to be useful.
"""

from __future__ import annotations

import functools


class TskdError(Exception):
    """An expected failure; its message is the whole story (no traceback is shown)."""


class ParamsError(TskdError, ValueError):
    """Bad params: the message names the file, the key and what is allowed."""


class DiskFullError(TskdError, OSError):
    """A file could not be written because its filesystem (or the user's quota on it) is full.

    Raised by ``tskd.io.atomic_write`` in place of the ENOSPC / EDQUOT ``OSError``, after the
    temporary file is removed: the target is left as it was (a checkpoint keeps the previous
    one). Still an ``OSError``, so code that handles a failed write goes on handling this one.
    """

    def __init__(self, message: str, *, path: str | None = None, errno: int | None = None,
                 free: int | None = None):
        super().__init__(message)  # one argument: str() is the message alone, no "[Errno 28]"
        self.path, self.free = path, free
        self.errno = errno

    def __reduce__(self):  # keeps the attributes across pickling (a submitit job's result)
        return functools.partial(type(self), path=self.path, errno=self.errno, free=self.free), self.args
