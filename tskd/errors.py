"""The one base class of expected failures.

A ``TskdError`` is something the user can fix: bad params, a missing or damaged dataset or
file, a loss that diverged, a cluster that refuses the settings. Its message names the file,
key or path and what was expected, so ``tskd`` prints the message alone and exits 2. Every
other exception is a defect or an environment failure (a CUDA, NCCL or shape error): the
CLI lets it through with its traceback, which is what a SLURM log needs to be useful.
"""

from __future__ import annotations


class TskdError(Exception):
    """An expected failure; its message is the whole story (no traceback is shown)."""
