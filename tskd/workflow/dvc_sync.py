"""Make Snakemake trust the files DVC restored, and only those.

``dvc pull`` and ``dvc checkout`` write files in no particular order and with the current time,
so a model can end up older than the teacher it was distilled from, and Snakemake (which
compares mtimes) would retrain everything. DVC's lock file, however, proves which outputs were
made from exactly the inputs now on disk. For those, and only those, the outputs are made newer
than their inputs, in DAG order. An output that DVC does not vouch for keeps its time, so
Snakemake still reruns what really is out of date.

Two strengths: ``sync_mtimes`` (automatic, in the Snakefile) only repairs the times; ``sync``
(``tskd dvc sync``) also has Snakemake record its provenance for those outputs (``snakemake
--touch``), so that a later params edit reruns them, as it would for outputs Snakemake made.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tskd.errors import TskdError
from tskd.spec.config import Preset
from tskd.workflow.dvc_pipeline import Stage, pipeline_path, stages
from tskd.workflow.dvc_verify import verify


class SyncError(TskdError):
    """`tskd dvc sync` could not vouch for the outputs, or Snakemake refused to record them."""


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def _out_of_order(s: Stage, root: Path) -> bool:
    outs = [_mtime(root / f) for f in s.targets]
    ins = [_mtime(root / f) for f in s.inputs]
    if not ins or None in outs or None in ins:
        return False  # a missing file is Snakemake's business, not an mtime artefact
    return min(outs) < max(ins)  # Snakemake's test: an input newer than an output


def dvc_current(root: Path, pipeline: Path, names: list[str]) -> set[str]:
    """The stages among ``names`` whose deps, params and outs all match the pipeline's dvc.lock."""
    from dvc.repo import Repo

    # The whole file as one target: DVC re-reads the lock file once per target given.
    with Repo(str(root)) as repo:
        changed = repo.status(targets=[pipeline.as_posix()])
    changed_names = {k.rpartition(":")[2] for k in changed}
    return {n for n in names if n not in changed_names}


def sync_mtimes(p: Preset, raw: dict, params_file: str, root: Path = Path("."),
                pipeline: Path | None = None) -> tuple[list[str], dict[str, list[str]]]:
    """Touch the outputs of DVC-current stages that are not newer than their inputs.

    Returns the stages touched, and the damaged ones (current to DVC, but their bytes differ
    from dvc.lock) left as they are, so Snakemake rebuilds them rather than trusting them.
    """
    pipeline = pipeline or pipeline_path(p)
    if not (root / pipeline).with_name("dvc.lock").is_file():
        return [], {}
    all_stages = stages(p, raw, params_file)
    if not any(_out_of_order(s, root) for s in all_stages):
        return [], {}  # the usual case, decided from stat() alone
    present = [s for s in all_stages if all(_mtime(root / f) is not None for f in s.targets)]
    current = dvc_current(root, pipeline, [s.name for s in present])
    damaged = _damaged(root, pipeline, current)  # all of them: touching one puts the next out of order
    touched = []
    for s in all_stages:  # DAG order: a touched output is seen by the stages after it
        if s.name in current and s.name not in damaged and _out_of_order(s, root):
            t = max(_mtime(root / f) for f in s.inputs) + 1.0  # 1 s: coarse-mtime filesystems
            for f in s.targets:
                os.utime(root / f, (t, t))
            touched.append(s.name)
    return touched, damaged


def _damaged(root: Path, pipeline: Path, names: set[str]) -> dict[str, list[str]]:
    """Stages of ``pipeline`` whose files differ from their dvc.lock hashes, though DVC reports them current.

    DVC trusts its cache and its record of what it checked out, so a damaged cache file comes
    back as a 'current' output; only re-hashing the bytes tells. Only this pipeline's stages: the
    others have stages of the same names (every pipeline has `data` and `report`).
    """
    if pipeline.is_absolute():
        pipeline = pipeline.relative_to(root.resolve())
    out: dict[str, list[str]] = {}
    for pr in verify(root, only={(pipeline.as_posix(), n) for n in names}) if names else []:
        out.setdefault(pr.owner.split(",")[0].rpartition(":")[2], []).append(str(pr))
    return out


def _address(pipeline: Path, name: str) -> str:
    """How DVC's commands name a stage (run from the repository root)."""
    return name if pipeline.as_posix() == "dvc.yaml" else f"{pipeline.as_posix()}:{name}"


def sync_for_snakemake(p: Preset, raw: dict, params_file: str) -> None:
    """What the Snakefile calls: never fails the workflow, only logs what it did or could not do."""
    if os.environ.get("DVC_STAGE"):
        return  # DVC runs the stages in order itself (and holds the repo lock)
    try:
        touched, damaged = sync_mtimes(p, raw, params_file)
    except Exception as e:  # noqa: BLE001 - a DVC problem must not stop a Snakemake run
        print(f"tskd: could not compare outputs with dvc.lock ({e}); Snakemake decides by mtime", file=sys.stderr)
        return
    for problems in damaged.values():
        for pr in problems:
            print(f"tskd: WARNING: {pr}; not trusted (see `tskd dvc verify`)", file=sys.stderr)
    if touched:
        names = ", ".join(touched[:5]) + (" ..." if len(touched) > 5 else "")
        print(f"tskd: outputs of {len(touched)} DVC stages made newer than their inputs (dvc.lock shows them "
              f"current): {names}. Run `tskd dvc sync {params_file}` once so that Snakemake also records "
              "their params (else it cannot see later params edits for them).", file=sys.stderr)


def _closure(all_stages: list[Stage], current: set[str]) -> list[Stage]:
    """Current stages whose upstream stages are all current too (DAG order)."""
    producer = {f: s.name for s in all_stages for f in s.targets}
    ok: set[str] = set()
    for s in all_stages:
        if s.name in current and all(producer.get(f) in ok for f in s.inputs if f in producer):
            ok.add(s.name)
    return [s for s in all_stages if s.name in ok]


def sync(p: Preset, raw: dict, params_file: str, root: Path = Path(".")) -> list[str]:
    """``snakemake --touch`` the outputs of every stage dvc.lock vouches for (and its upstream too).

    Touching writes the outputs' mtimes in DAG order and Snakemake's provenance records (params,
    inputs, code) as if it had just made them: true, since DVC shows they match the current params.
    """
    pipeline = pipeline_path(p)
    all_stages = stages(p, raw, params_file)
    present = [s for s in all_stages if all(_mtime(root / f) is not None for f in s.targets)]
    if not (root / pipeline).with_name("dvc.lock").is_file() or not present:
        return []
    current = dvc_current(root, pipeline, [s.name for s in present])
    damaged = _damaged(root, pipeline, current)
    if damaged:
        lines = [pr for prs in damaged.values() for pr in prs]
        raise SyncError("files that dvc.lock records differ from their hashes (nothing synced):\n  "
                           + "\n  ".join(lines) + "\nremove damaged cache files with `tskd dvc verify "
                           "--remove-corrupt`, then rebuild each stage with `dvc repro -f -s <stage>`: "
                           + ", ".join(_address(pipeline, n) for n in sorted(damaged)))
    chosen = _closure(all_stages, current)
    if not chosen:
        return []
    targets = [f for s in chosen for f in s.targets]
    cmd = [sys.executable, "-m", "snakemake", "--configfile", params_file, "--cores", "1", "--touch", "--force",
           "--quiet", "host", "progress", "rules", "--", *targets]
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if r.returncode != 0:
        raise SyncError(f"snakemake --touch failed:\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return [s.name for s in chosen]
