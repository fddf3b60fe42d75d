"""One writer per run directory.

A Snakemake restarted while its SLURM jobs still run submits each unfinished run again: without a
lock, two jobs would write one ``checkpoint.pt``. A training call holds a POSIX lock on
``<out>/.lock`` (``fcntl.lockf``: NFS carries these between nodes through its lock manager) while it
writes the directory; a second call waits for it, and ``tskd status`` asks the same lock whether a
run's writer is alive. The kernel drops the lock when its process dies, however it dies, so a
killed job never leaves the directory locked. The file also says who holds it (host, pid, SLURM job).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("tskd.train")

LOCK_FILE = ".lock"


def lock_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / LOCK_FILE


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _open(out_dir: str | Path) -> int:
    path = lock_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise


def holder(out_dir: str | Path) -> dict[str, Any] | None:
    """Who writes ``out_dir`` now (what its lock file says), or None when no live process holds its
    lock. Changes nothing a writer could see (the probe's own lock, if it gets one, is let go at once)."""
    path = lock_path(out_dir)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        if _try_lock(fd):
            fcntl.lockf(fd, fcntl.LOCK_UN)
            return None
        try:
            info = json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        return info if isinstance(info, dict) else {}
    finally:
        os.close(fd)


def describe(info: dict[str, Any]) -> str:
    job = f" (SLURM job {info['slurm_job_id']})" if info.get("slurm_job_id") else ""
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}{job} since {info.get('since', '?')}"


@contextlib.contextmanager
def run_dir_lock(out_dir: str | Path, poll_s: float = 5.0) -> Iterator[bool]:
    """Hold ``out_dir``'s lock for the block; wait (saying for whom) while another process holds it.
    Yields whether it waited for another writer."""
    fd = _open(out_dir)
    try:
        waited = not _try_lock(fd)
        if waited:
            info = holder(out_dir) or {}
            log.warning("%s is being written by another training process (%s); waiting for it to end",
                        out_dir, describe(info))
            while not _try_lock(fd):
                time.sleep(poll_s)
            log.info("%s: the other writer ended; going on", out_dir)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_owner()).encode(), 0)
        yield waited
    finally:
        os.close(fd)  # closing drops the lock


@contextlib.contextmanager
def lock_if_free(out_dir: str | Path) -> Iterator[bool]:
    """Hold ``out_dir``'s lock for the block when nobody does (yields True), else yield False at once."""
    fd = _open(out_dir)
    try:
        yield _try_lock(fd)
    finally:
        os.close(fd)
