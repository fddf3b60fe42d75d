"""The metrics.json of every run of a preset, as the plots read them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tskd.errors import TskdError
from tskd.spec.config import Preset
from tskd.spec.grid import student_dir, student_jobs, teacher_dir


@dataclass
class Runs:
    teachers: dict[str, dict[str, Any]] = field(default_factory=dict)  # arch -> metrics.json
    # (recipe, pair, method) -> one metrics.json per seed, in the preset's seed order
    students: dict[tuple[str, str, str], list[dict[str, Any]]] = field(default_factory=dict)


def _read(path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TskdError(f"{path}: cannot read results ({e}); rerun the stage that writes it") from None


def read_runs(p: Preset) -> Runs:
    runs = Runs({arch: _read(teacher_dir(p, arch) / "metrics.json") for arch in p.teachers})
    for job in student_jobs(p):
        m = _read(student_dir(p, job) / "metrics.json")
        # The student alone runs once per student arch; it belongs to every pair that has it.
        pairs = [q for q in p.pairs if q.student == job.pair.student] if job.method == "vanilla" else [job.pair]
        for q in pairs:
            runs.students.setdefault((job.recipe, q.name, job.method), []).append(m)
    return runs
