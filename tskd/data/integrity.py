"""Integrity records for data the project writes itself, and the dataset error types.

A *manifest* (``tskd_manifest.json``) sits beside the files it covers and holds, for
each file, its sha256 and size, plus the parameters that produced them. Readers verify
the manifest instead of an upstream checksum (which project-written data cannot match).
The JSON is written with sorted keys and no timestamps, so equal inputs give equal bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from tskd.errors import TskdError

# One implementation of atomic writes for the whole project; re-exported here for data code.
from tskd.io import atomic_write_bytes, atomic_write_text

__all__ = [
    "MANIFEST_NAME",
    "DatasetError",
    "IntegrityError",
    "atomic_write_bytes",
    "atomic_write_text",
    "file_record",
    "holds_current",
    "install_dir",
    "staged_dir",
    "read_manifest",
    "sha256_file",
    "verify_manifest",
    "write_manifest",
]

MANIFEST_NAME = "tskd_manifest.json"
MANIFEST_FORMAT = "tskd-manifest/1"
_CHUNK = 1 << 20


class DatasetError(TskdError, ValueError):
    """A dataset is missing, incomplete, unreadable or fails its integrity check."""


class IntegrityError(DatasetError):
    """A file does not match its recorded (manifest or official) checksum."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: str | Path) -> dict[str, Any]:
    """The manifest entry of one file: ``{"sha256": ..., "size": ...}``."""
    path = Path(path)
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def write_manifest(directory: str | Path, files: Iterable[str], *,
                   params: Mapping[str, Any] | None = None) -> Path:
    """Record ``files`` (names relative to ``directory``) and ``params`` in ``directory/MANIFEST_NAME``.

    ``params`` must be JSON-serialisable; it says what produced the files (e.g. a
    generator's seed and sizes) so a rerun can tell whether they are still current.
    """
    directory = Path(directory)
    manifest = {
        "format": MANIFEST_FORMAT,
        "files": {name: file_record(directory / name) for name in sorted(files)},
        "params": dict(params or {}),
    }
    path = directory / MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest of ``directory``, or None when it has none; a malformed one raises IntegrityError."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IntegrityError(f"{path}: unreadable manifest ({e})") from e
    if (not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT
            or not isinstance(manifest.get("files"), dict)):
        raise IntegrityError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    return manifest


def verify_manifest(directory: str | Path, *, required: Iterable[str] = ()) -> dict[str, Any]:
    """Check every file listed in ``directory``'s manifest; return the manifest.

    Raises IntegrityError naming the first file that is missing, has the wrong size or
    the wrong sha256, or a ``required`` name the manifest does not cover (an unlisted
    file would otherwise be trusted unchecked). DatasetError if there is no manifest.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None:
        raise DatasetError(f"{directory}: no {MANIFEST_NAME}")
    files: dict[str, Any] = manifest["files"]
    for name in required:
        if name not in files:
            raise IntegrityError(f"{directory / MANIFEST_NAME} does not cover required file {name!r}")
    for name, want in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            raise IntegrityError(f"{path}: listed in {MANIFEST_NAME} but missing")
        size = path.stat().st_size
        # Size first: a truncated file is reported without hashing it.
        if size != want.get("size"):
            raise IntegrityError(f"{path}: size {size} bytes, manifest says {want.get('size')} "
                                 "(truncated or modified)")
        if sha256_file(path) != want.get("sha256"):
            raise IntegrityError(f"{path}: sha256 does not match {MANIFEST_NAME} (file modified or corrupted)")
    return manifest


def holds_current(target: Path, params: Mapping[str, Any], *, required: Iterable[str] = (), what: str) -> bool:
    """Whether ``target`` holds intact tskd-written data made with ``params`` (then it is kept as is).

    False when it is missing, from other params, or damaged (then it is written again). Raises
    DatasetError when it holds data tskd did not write (no manifest): ``what`` names what that
    data probably is, and nothing overwrites it.
    """
    if not target.exists() or not any(target.iterdir()):
        return False
    if not (target / MANIFEST_NAME).is_file():
        raise DatasetError(f"refusing to overwrite {target}: it has no {MANIFEST_NAME}, so it was not written "
                           f"by tskd ({what}?). Use another root or remove it.")
    try:
        manifest = read_manifest(target)
        if manifest is None or manifest.get("params") != params:
            return False
        verify_manifest(target, required=required)
    except IntegrityError:
        return False  # ours but damaged: write it again
    return True


def install_dir(tmp: Path, target: Path) -> None:
    """Rename the finished directory ``tmp`` to ``target``, moving an older ``target`` aside first
    (a non-empty directory cannot be replaced in one rename), so ``target`` is never half-written."""
    if not target.exists():
        os.rename(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rename(target, old / target.name)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(target: Path, same: Callable[[], bool] | None = None) -> Iterator[Path]:
    """A new directory beside ``target`` to write a dataset into: installed as ``target`` when the
    block ends (``install_dir``), removed when it raises, so no half-written ``target`` ever exists.
    ``same``: whether a ``target`` that a concurrent writer installed meanwhile holds the same data;
    then theirs is kept (without it, their install is an error)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset is meant to be shared
        yield tmp
        try:
            install_dir(tmp, target)
        except OSError:
            if same is None or not same():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
