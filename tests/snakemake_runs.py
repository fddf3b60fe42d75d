"""Running Snakemake on a copy of the repository, for the DAG tests (test_workflow*.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SNAKEMAKE = [sys.executable, "-m", "snakemake"]
TRAINING = "tags.run_kind = 'train'"  # the training runs, not the parents that group their seeds


def snakemake(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    r = subprocess.run([*SNAKEMAKE, "--cores", "2", *args], cwd=repo, capture_output=True, text=True,
                       env=env, timeout=1200)
    if check:
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r


def planned_jobs(repo: Path) -> dict[str, int]:
    """Rule -> number of jobs Snakemake would run now (from a dry run's job table)."""
    out = snakemake(repo, "-n", "--quiet", "rules").stdout
    jobs = {}
    for line in out.splitlines():
        m = re.match(r"^\s*(\w+)\s+(\d+)\s*$", line)
        if m and m.group(1) != "total":
            jobs[m.group(1)] = int(m.group(2))
    return jobs
