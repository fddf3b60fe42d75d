"""A workflow job's spec, named on its command line by the preset's file and the job's run directory.

A rule used to pass the whole spec as JSON (``--spec``/``--place``): kilobytes that Snakemake
prints twice when the job fails. The rules now write the preset once (``write_preset``, content
addressed, under ``.snakemake/tskd/``) and pass ``--preset FILE --job DIR``; the job takes its
spec from the same grid the DAG was built from. The spec's identity stays the rule's ``params``
(Snakemake's rerun trigger), so what reruns a job is unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tskd.config import ParamsError, canonical_json, fingerprint
from tskd.io import atomic_write_text

PRESET_DIR = Path(".snakemake/tskd")


def write_preset(config: dict[str, Any], root: Path = PRESET_DIR) -> Path:
    """``config`` (Snakemake's, every --configfile and --config merged) as JSON, named by its hash, so
    concurrent Snakemake processes (DVC's stages) write the same bytes to the same name."""
    path = root / f"preset-{fingerprint(config)}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, canonical_json(config) + "\n")
    return path


def spec_of_job(preset_file: str | Path, job_dir: str | Path):
    """The RunSpec (teacher or student) whose run directory is ``job_dir`` in the preset of ``preset_file``."""
    from tskd import grid
    from tskd.config import parse_preset
    from tskd.params_yaml import DuplicateKeyError, loads_json

    path = Path(preset_file)
    if not path.is_file():
        raise ParamsError(f"--preset {path}: file not found (the workflow writes it while building the DAG)")
    try:
        raw = loads_json(path.read_text())
    except (ValueError, DuplicateKeyError) as e:
        raise ParamsError(f"--preset {path}: not valid JSON: {e}") from None
    p = parse_preset(raw, source=str(path))
    want = Path(job_dir)
    for arch in p.teachers:
        if grid.teacher_dir(p, arch) == want:
            return grid.teacher_spec(p, arch)
    for job in grid.student_jobs(p):
        if grid.student_dir(p, job) == want:
            return grid.student_spec(p, job)
    raise ParamsError(f"--job {want}: not the run directory of a teacher or student of {path} "
                      f"(e.g. {grid.teacher_dir(p, next(iter(p.teachers)))})")
