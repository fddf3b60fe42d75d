"""Atomic file writes: a reader (or a rerun) never sees a half-written file.

Everything is written to a temporary name in the target's directory, flushed, then
renamed over the target; ``os.replace`` is atomic on POSIX filesystems.

A write that fails leaves the target as it was and removes its temporary file. When it fails
because the filesystem or the user's quota is full (ENOSPC, EDQUOT: at a write, at fsync or, on
NFS and Lustre, only at close), ``DiskFullError`` says so in one line: the file, how much of it
had been written and how much space is free now.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from tskd.errors import DiskFullError

_UMASK = os.umask(0)
os.umask(_UMASK)
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], keep_previous: Path | None = None) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it to ``path``.

    ``keep_previous``: the file ``path`` held until now is renamed there first (a kill between
    the two renames leaves it there and ``path`` missing, never a half-written ``path``). That
    happens only once the new file is complete on disk: a failed write leaves ``path`` and
    ``keep_previous`` as they were. A full disk or quota raises ``DiskFullError``.
    """
    path = Path(path)
    tmp: str | None = None
    f: _Watched | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as raw:
            # mkstemp creates 0600 files; results are shared (cluster users, DVC), so use the umask.
            os.fchmod(fd, 0o666 & ~_UMASK)
            f = _Watched(raw)
            write(f)  # type: ignore[arg-type]  # a file object in all but name
            raw.flush()
            os.fsync(raw.fileno())
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException as e:
        written = _size(tmp)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)  # it holds the space the next attempt needs
        full = _full_error(e, f)
        if full is None:
            raise
        raise _disk_full(path, full, written) from e
    return path


class _Watched:
    """The temporary file as ``write`` sees it: remembers the OSError a write raised, because a
    writer may report it as something else (torch.save's zip writer raises a RuntimeError,
    "unexpected pos ...", with the ENOSPC only in the exception's context, if at all)."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _full_error(e: BaseException, f: _Watched | None) -> OSError | None:
    """The ENOSPC / EDQUOT behind ``e``: itself, one in its chain, or one a write raised."""
    if isinstance(e, DiskFullError) or not isinstance(e, Exception):
        return None  # already said (a nested atomic_write); or a KeyboardInterrupt, SystemExit
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in FULL_ERRNOS:
            return cur
        cur = cur.__cause__ or cur.__context__
    if f is not None and f.error is not None and f.error.errno in FULL_ERRNOS:
        return f.error
    return None


def _size(tmp: str | None) -> int | None:
    try:
        return os.stat(tmp).st_size if tmp is not None else None
    except OSError:
        return None


def _mount_point(path: Path) -> Path:
    p = path.resolve()
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{int(n)} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError  # unreachable


def _disk_full(path: Path, e: OSError, written: int | None) -> DiskFullError:
    """One line: which file, that the disk or quota is full, how much was free, what was kept."""
    try:
        where = path.parent if path.parent.exists() else Path(".")
        free: int | None = shutil.disk_usage(where).free
        fs = f" on {_mount_point(where)}"
    except OSError:
        free, fs = None, ""
    reason = "the disk quota is full" if e.errno == errno.EDQUOT else "the disk (or its quota) is full"
    err = e.strerror or errno.errorcode.get(e.errno or 0, "?")
    got = f" after {format_bytes(written)} of it" if written else ""
    left = (f"{format_bytes(free)} ({free} bytes) free{fs} now" if free is not None
            else "free space unknown")
    quota = ("; the filesystem's free space is not your quota's: see `quota -s` or `lfs quota -u $USER`"
             if e.errno == errno.EDQUOT else "")
    kept = f"The {path.name} there is unchanged" if path.exists() else f"No {path.name} was left"
    return DiskFullError(f"{path}: cannot write it, {reason} ({err}){got}; {left}{quota}. {kept}; "
                         "free some space (or raise the quota) and rerun", path=str(path), errno=e.errno, free=free)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(path: str | Path, obj: Any, keep_previous: Path | None = None) -> Path:
    import torch

    return atomic_write(path, lambda f: torch.save(obj, f), keep_previous)
