"""A workflow job's spec, named on its command line by the preset's file and the job's run directory.

A rule used to pass the whole spec as JSON (``--spec``/``--place``): kilobytes that Snakemake
prints twice when the job fails. The rules now write the preset once (``write_preset``, content
addressed, under ``.snakemake/tskd/``) and pass ``--preset FILE --job DIR``; the job takes its
spec from the same grid the DAG was built from. The spec's identity stays the rule's ``params``
(Snakemake's rerun trigger), so what reruns a job is unchanged.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from tskd.errors import ParamsError
from tskd.io import atomic_write_text
from tskd.spec import grid
from tskd.spec.config import canonical_json, fingerprint, parse_preset
from tskd.spec.grid import RunSpec
from tskd.spec.params_yaml import DuplicateKeyError, loads_json

PRESET_DIR = Path(".snakemake/tskd")


def write_preset(config: dict[str, Any], root: Path = PRESET_DIR) -> Path:
    """``config`` (Snakemake's, every --configfile and --config merged) as JSON, named by its hash, so
    concurrent Snakemake processes (DVC's stages) write the same bytes to the same name."""
    path = root / f"preset-{fingerprint(config)}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, canonical_json(config) + "\n")
    return path


def write_report_preset(p, root: Path = PRESET_DIR) -> Path:
    """The preset ``p`` as JSON in its own key order (the report lists methods and pairs in the
    preset's; ``write_preset``'s canonical JSON sorts them), named by its content: the report rule
    names this file instead of carrying the whole preset on its command line."""
    data = p.model_dump(mode="json")
    path = root / f"report-{fingerprint(data)}.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(data) + "\n")
    return path


def spec_of_job(preset_file: str | Path, job_dir: str | Path):
    """The RunSpec (teacher or student) whose run directory is ``job_dir`` in the preset of ``preset_file``."""
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


def specs_file(preset_file: str | Path) -> Path:
    """Where the workflow keeps every training job's spec of the preset file ``preset-<hash>.json``."""
    path = Path(preset_file)
    return path.with_name(path.name.replace("preset-", "specs-", 1))


def write_specs(preset_file: str | Path, specs: dict[str, Any]) -> Path:
    """Every training job's spec (run directory -> spec), with its task's main figure, beside the preset
    file: what ``spec_of_job_light`` reads. Written by the Snakemake that builds the DAG, whose code
    computed the specs, and rewritten whenever they differ (a changed default in the code)."""
    from tskd.tasks import task_of  # lazy: torch

    data = {}
    for job_dir, spec in specs.items():
        task = task_of(spec.dataset.name)
        data[str(job_dir)] = {"spec": spec.model_dump(mode="json"),
                              "figure": {"best": task.best, "label": task.labels[task.best]}}
    path, text = specs_file(preset_file), canonical_json(data) + "\n"
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)
    return path


def spec_of_job_light(preset_file: str | Path, job_dir: str | Path) -> tuple[Any, dict[str, str]]:
    """``spec_of_job`` for a process that only submits the job and waits for it, without importing torch:
    the grid's defaults come from the methods' and models' registries, which import it, and a waiting
    launcher that did would hold ~500 MB for the job's whole life (a login node holds one per job in
    flight). Read from the specs the workflow wrote (``write_specs``), else computed in a child process.
    Returns the spec and how its task names its main figure ({best, label})."""
    import subprocess

    with contextlib.suppress(OSError, ValueError, KeyError):
        entry = json.loads(specs_file(preset_file).read_text())[str(Path(job_dir))]
        return RunSpec.model_validate(entry["spec"]), entry["figure"]
    r = subprocess.run([sys.executable, "-m", "tskd.workflow.job_spec", str(preset_file), str(job_dir)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        lines = r.stderr.strip().splitlines()
        raise ParamsError(lines[-1] if r.returncode == 2 and lines else
                          f"could not build the spec of {job_dir} from {preset_file}:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout)
    return RunSpec.model_validate(out["spec"]), out["figure"]


def _main(argv: list[str]) -> int:
    """``python -m tskd.workflow.job_spec PRESET_FILE JOB_DIR``: the job's spec and main figure, as JSON."""
    from tskd.tasks import task_of  # lazy: torch

    try:
        spec = spec_of_job(*argv)
    except ParamsError as e:
        print(e, file=sys.stderr)
        return 2
    task = task_of(spec.dataset.name)
    print(json.dumps({"spec": spec.model_dump(mode="json"), "figure": {"best": task.best,
                                                                       "label": task.labels[task.best]}}))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
