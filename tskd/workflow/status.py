"""``tskd status [params]``: what each training job of a preset's grid is doing, read from its files.

Nothing is written, and nothing is asked of Snakemake: a job is *done* when its
``metrics.json`` exists, *failed* when its log ends in tskd's one-line error (``tskd --log``),
*running* when a live process holds its directory's lock (tskd.engine.run_lock; epochs done and the
seconds they took, from ``checkpoint.pt``: the ETA is their mean times the epochs left), *stopped*
when it has a lock file, a log or a checkpoint but no process writes it (killed from outside, or
queued to resume), else *waiting*. A job submitted to SLURM that has not started (no lock yet) is
*waiting* while SLURM's queue has it and *stopped* when it is gone (its waiting rule was killed); this
one case asks ``squeue``. Directories written before the lock existed count as running
when they have a log or a checkpoint.
"""

from __future__ import annotations

import functools
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tskd.engine.run_lock import describe, holder, lock_path
from tskd.spec.config import Preset
from tskd.spec.grid import student_dir, student_jobs, teacher_dir

# tskd --log writes this line last when a job fails (tskd.cli.main).
_SUBMITTED = re.compile(r"submitted SLURM job (\d+)")
_FAILURE = re.compile(r"^tskd [\w-]+(?: [\w-]+)?: (?:error|failed): .*")


@dataclass(frozen=True)
class JobStatus:
    name: str
    out_dir: Path
    log: Path
    epochs: int
    state: str  # done | failed | running | stopped | waiting
    epochs_done: int = 0
    eta_seconds: float | None = None
    reason: str = ""
    updated: float | None = None  # mtime of the newest checkpoint or log
    writer: str = ""  # who holds the directory's lock (running)


def log_path(p: Preset, out_dir: Path) -> Path:
    """The job's log, as the workflow's rules name it (workflow/rules/teachers.smk, distill.smk)."""
    rel = out_dir.relative_to(p.out)
    return p.out / "logs" / rel.parent.with_name(f"{rel.parent.name}-{rel.name}.log")


def _read_checkpoint(out_dir: Path) -> dict[str, Any] | None:
    """The newest readable checkpoint's epoch count and history, read without changing anything
    (tskd.engine.checkpoint.load_latest_checkpoint removes leftovers; a status must not)."""
    import torch

    for path in (out_dir / "checkpoint.pt", out_dir / "checkpoint.prev.pt"):
        try:
            # mmap: the weights are mapped, not read, so an ImageNet checkpoint costs no more than CIFAR's.
            state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception:  # missing, or replaced between the check and the read: try the previous one
            continue
        if isinstance(state, dict) and "epoch" in state:
            return {"epoch": int(state["epoch"]), "history": list(state.get("history") or [])}
    return None


def _failure(log: Path) -> str:
    if not log.is_file():
        return ""
    lines = [line for line in log.read_text(errors="replace").splitlines() if _FAILURE.match(line)]
    return lines[-1] if lines else ""


def job_status(name: str, out_dir: Path, log: Path, epochs: int) -> JobStatus:
    base = dict(name=name, out_dir=out_dir, log=log, epochs=epochs)
    if (out_dir / "metrics.json").is_file():
        return JobStatus(**base, state="done", epochs_done=epochs)
    reason = _failure(log)
    if reason:
        return JobStatus(**base, state="failed", reason=reason)
    ckpt = _read_checkpoint(out_dir)
    stamps = [f.stat().st_mtime for f in (log, out_dir / "checkpoint.pt") if f.is_file()]
    if ckpt is None and not stamps:
        return JobStatus(**base, state="waiting")
    done = ckpt["epoch"] if ckpt else 0
    seconds = [row["seconds"] for row in (ckpt or {}).get("history", []) if "seconds" in row]
    eta = sum(seconds) / len(seconds) * (epochs - done) if seconds else None
    updated = max(stamps, default=None)
    if lock_path(out_dir).is_file():
        owner = holder(out_dir)
        if owner is None:
            return JobStatus(**base, state="stopped", epochs_done=done, updated=updated)
        return JobStatus(**base, state="running", epochs_done=done, eta_seconds=eta, updated=updated,
                         writer=describe(owner))
    # Submitted to SLURM and not started yet (no lock): pending while SLURM has the job, else its
    # waiting rule was stopped with it (a killed Snakemake), and nothing will start it.
    submitted = _SUBMITTED.findall(log.read_text(errors="replace")) if log.is_file() and ckpt is None else []
    queue = slurm_queue() if submitted else None
    if queue is not None:
        state = queue.get(submitted[-1])
        if state is None:
            return JobStatus(**base, state="stopped", updated=updated)
        return JobStatus(**base, state="running" if state == "RUNNING" else "waiting", updated=updated,
                         writer=f"SLURM job {submitted[-1]} {state.lower()}")
    return JobStatus(**base, state="running", epochs_done=done, eta_seconds=eta, updated=updated)


@functools.lru_cache(maxsize=1)
def _queue_at(_second: int) -> dict[str, str] | None:
    try:
        r = subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    return dict(line.split()[:2] for line in r.stdout.splitlines() if len(line.split()) >= 2)


def slurm_queue() -> dict[str, str] | None:
    """SLURM's queue (job id -> state), asked once per status (per second); None without SLURM."""
    return _queue_at(int(time.time()))


def preset_status(p: Preset) -> list[JobStatus]:
    """Every training job of the grid: the teachers, then the students, in the grid's order."""
    rows = []
    for arch, t in p.teachers.items():
        d = teacher_dir(p, arch)
        rows.append(job_status(f"teacher {arch} seed{t.seed}", d, log_path(p, d), p.recipes[t.recipe].epochs))
    for job in student_jobs(p):
        d = student_dir(p, job)
        run = d.parent.name
        epochs = p.recipe_for(job.recipe, job.method).epochs
        rows.append(job_status(f"{job.method} {run} {job.recipe} seed{job.seed}", d, log_path(p, d), epochs))
    return rows


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = width * done // max(total, 1)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def format_status(rows: list[JobStatus], now: float | None = None) -> str:
    now = time.time() if now is None else now
    counts = {s: sum(r.state == s for r in rows) for s in ("done", "running", "stopped", "failed", "waiting")}
    lines = [f"{len(rows)} training jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items())]
    width = max((len(r.name) for r in rows), default=0)
    order = {"running": 0, "stopped": 1, "failed": 2, "waiting": 3, "done": 4}
    for r in sorted(rows, key=lambda r: order[r.state]):
        line = f"  {r.name:<{width}}  {r.state:<7}  {_bar(r.epochs_done, r.epochs)} {r.epochs_done}/{r.epochs}"
        if r.state == "running":
            line += f"  ETA {_duration(r.eta_seconds)}" if r.eta_seconds is not None else "  ETA after epoch 1"
            if r.updated is not None:
                line += f"  (written {_duration(now - r.updated)} ago; log: {r.log})"
            if r.writer:
                line += f"  [{r.writer}]"
        elif r.state == "stopped":
            line += "  no process writes it (killed, or queued to resume)" + (
                f"; last written {_duration(now - r.updated)} ago" if r.updated is not None else "")
        lines.append(line)
    for r in rows:
        if r.state == "failed":
            lines.append(f"failed: {r.name}: {r.reason}")
    return "\n".join(lines)


def watch(p: Preset, every: float, out) -> None:
    """Redraw the status every ``every`` seconds until every job is done or failed (or Ctrl-C)."""
    while True:
        rows = preset_status(p)
        out.write("\x1b[H\x1b[2J" + format_status(rows) + "\n")
        out.flush()
        if all(r.state in ("done", "failed") for r in rows):
            return
        time.sleep(every)
