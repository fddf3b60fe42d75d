"""Check the DVC cache and the workspace against what the lock files record.

DVC trusts its local cache: a cache file that was damaged after it was written (disk, a bad
copy, a hand edit) is checked out, pushed and restored from the run-cache without complaint,
and afterwards `dvc status` reports the damaged workspace file as up to date (it records the
hash it expected, not the one it wrote). This re-hashes every object that dvc.lock and the
.dvc files point to, and every output in the workspace, and names what does not match.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass
class Problem:
    kind: str  # "corrupt cache", "missing cache", "output differs from the lock"
    path: str  # the file at fault
    owner: str  # the stage or .dvc file that records it

    def __str__(self) -> str:
        return f"{self.kind}: {self.path} (recorded by {self.owner})"


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _object(cache: Path, md5: str) -> Path:
    return cache / md5[:2] / md5[2:]


def cache_dir(root: Path) -> Path:
    """The md5 object directory of the repo's local cache (honours `dvc cache dir`)."""
    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            return Path(repo.cache.local.path)
    except Exception:  # noqa: BLE001 - not a DVC repo (yet): the default place
        return root / ".dvc" / "cache" / "files" / "md5"


def _recorded_outputs(root: Path) -> list[tuple[str, tuple[str, str] | None, str, str]]:
    """(owner, stage, output path relative to root, md5) from every dvc.lock and .dvc file.

    ``stage``: (its dvc.yaml relative to root, its name), as stage names repeat from one pipeline to
    the next (every one has `data` and `report`); None for a .dvc file.
    """
    found = []
    # Only where `tskd dvc write` puts pipelines: a recursive search would walk every dataset file.
    for lock in [root / "dvc.lock", *sorted(root.glob("pipelines/*/dvc.lock"))]:
        if not lock.is_file():
            continue
        doc = yaml.safe_load(lock.read_text()) or {}
        # Lock paths are relative to the stage's wdir, which only dvc.yaml records.
        pipeline = lock.with_name("dvc.yaml")
        spec = (yaml.safe_load(pipeline.read_text()) or {}).get("stages", {}) if pipeline.is_file() else {}
        for name, stage in (doc.get("stages") or {}).items():
            wdir = lock.parent / ((spec.get(name) or {}).get("wdir") or ".")
            for out in stage.get("outs", []):
                if "md5" in out:
                    rel = (wdir / out["path"]).resolve().relative_to(root.resolve())
                    found.append((f"{lock.relative_to(root)}:{name}",
                                  (pipeline.relative_to(root).as_posix(), name), str(rel), out["md5"]))
    for dvcfile in sorted(f for f in root.glob("*.dvc") if f.is_file()):
        doc = yaml.safe_load(dvcfile.read_text()) or {}
        for out in doc.get("outs", []):
            if "md5" in out:
                found.append((dvcfile.name, None, out["path"], out["md5"]))
    return found


def _files(cache: Path, md5: str, out_path: str) -> list[tuple[str, str]]:
    """(workspace file, md5) for one recorded output; a directory expands to its manifest's entries."""
    if not md5.endswith(".dir"):
        return [(out_path, md5)]
    manifest = _object(cache, md5)
    try:
        entries = json.loads(manifest.read_text())
        return [(f"{out_path}/{e['relpath']}", e["md5"]) for e in entries]
    except FileNotFoundError:
        return []
    except (ValueError, TypeError, KeyError) as e:
        raise CorruptManifest(str(manifest)) from e


class CorruptManifest(ValueError):
    pass


def _shown(path: Path, root: Path) -> str:
    """A path relative to the repo when it lies inside it (the default cache), else absolute."""
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def verify(root: Path = Path("."), cache: Path | None = None, workspace: bool = True,
           only: set[tuple[str, str]] | None = None) -> list[Problem]:
    """Every corrupt cache object and, with ``workspace``, every output differing from its lock.

    ``only``: the stages to check, as (dvc.yaml path relative to ``root``, stage name): a name alone
    would also pick the stages of that name in every other pipeline. Default: all stages and .dvc files.
    """
    cache = cache or cache_dir(root)
    problems: list[Problem] = []
    checked: dict[str, bool] = {}
    for owner, stage, out_path, md5 in _recorded_outputs(root):
        if only is not None and stage not in only:
            continue
        try:
            entries = [(out_path, md5)] + (_files(cache, md5, out_path) if md5.endswith(".dir") else [])
        except CorruptManifest as e:
            problems.append(Problem("corrupt cache", _shown(Path(str(e)), root), f"{owner}, directory {out_path}"))
            continue
        for path, digest in entries:
            obj = _object(cache, digest)
            if digest.endswith(".dir"):
                # A manifest is JSON that DVC hashes in its own canonical form; its entries are checked.
                if not obj.is_file():
                    problems.append(Problem("missing cache", _shown(obj, root), owner))
                continue
            if digest not in checked:
                checked[digest] = not obj.is_file() or _md5(obj) == digest
                if not checked[digest]:
                    problems.append(Problem("corrupt cache", _shown(obj, root), f"{owner}, output {path}"))
            if workspace:
                ws = root / path
                if ws.is_file() and _md5(ws) != digest:
                    problems.append(Problem("output differs from the lock", path, owner))
    return problems


def remove_corrupt(problems: list[Problem], root: Path = Path(".")) -> list[str]:
    """Delete the corrupt cache objects, so the next `dvc pull` or `dvc repro` replaces them."""
    gone = []
    for pr in problems:
        if pr.kind == "corrupt cache":
            obj = root / pr.path  # absolute paths (a cache outside the repo) stay absolute
            obj.chmod(0o644)
            obj.unlink(missing_ok=True)
            gone.append(pr.path)
    return gone
