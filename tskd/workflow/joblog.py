"""``tskd --log FILE <verb>``: a workflow job's output goes to its log file, its failure to the terminal.

Snakemake shows a failed job as ``message``, the command (kilobytes of JSON) and the log's path;
the reason was only in the log. With ``--log`` the process writes everything (its own output, that
of its children: DataLoader workers, submitit) to FILE, and on failure also prints ONE line to the
terminal that started it: what failed, why, and where the log is.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

MAX_LINE = 400  # a terminal line, not a dump: the log has the rest


def one_line(text: str) -> str:
    """``text`` (a message of several lines, a traceback's last line) as one bounded line."""
    flat = "; ".join(part.strip() for part in str(text).splitlines() if part.strip())
    return flat if len(flat) <= MAX_LINE else flat[:MAX_LINE - 3] + "..."


@contextlib.contextmanager
def redirect_to_log(path: str | None) -> Iterator[TextIO]:
    """Within the block, file descriptors 1 and 2 (so child processes too) write to ``path``; yields a
    stream on the original stderr, for the one line the terminal gets. Without a path: sys.stderr."""
    if not path:
        yield sys.stderr
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    terminal = os.fdopen(os.dup(saved_err), "w", buffering=1)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        yield terminal
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)
        terminal.close()
