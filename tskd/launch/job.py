"""What a submitted job runs: one training (or teacher import) call, requeueable by submitit."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from tskd.launch.warm import FORKED_ENV, THREAD_VARS
from tskd.spec.grid import RunSpec

# Snakemake sets these to the rule's threads (0 for a waiting training rule under the profile)
# and sbatch exports them into the job; the job sets them to the CPUs it was given instead.

# -- the job ----------------------------------------------------------------------------------
def run_verb(verb: str, spec: RunSpec, options: dict[str, Any]) -> Any:
    """Run one call in this process: ``train`` or ``import-teacher``."""
    if verb == "train":
        t0, c0 = time.perf_counter(), time.process_time()
        from tskd.engine.trainer import train  # lazy: torch
        from tskd.tracking.observer import tracking_observers  # lazy: torch

        # One of the per-job overheads benchmarks/bench_scale.py adds up (torch and tskd's import).
        # The variable reaches this process's own children (a SLURM job's environment) too.
        warm = os.environ.get(FORKED_ENV) if os.environ.get(FORKED_ENV) == str(os.getppid()) else None
        print(f"tskd-job: imports {time.perf_counter() - t0:.2f} s (CPU {time.process_time() - c0:.2f} s)"
              + (f", forked from the warm server (pid {warm})" if warm else ""), flush=True)
        return train(spec, observers=tracking_observers(options.get("track", True)))
    if verb == "import-teacher":
        from tskd.engine.eval_run import import_teacher  # lazy: torch

        return import_teacher(spec, Path(options["checkpoint"]))
    raise ValueError(f"unknown verb {verb!r}")


class RunJob(submitit.helpers.Checkpointable):
    """What a submitted job runs: one ``run_verb`` call.

    Checkpointable: when SLURM preempts the job or its time limit nears, submitit calls
    ``checkpoint`` and requeues the same call. That is all a resume needs, because the
    trainer checkpoints every epoch into ``out_dir`` and resumes from there by itself.
    """

    def __init__(self, verb: str, spec: dict[str, Any], options: dict[str, Any], submitted_at: float,
                 cpus: int = 1):
        self.verb, self.spec, self.options, self.submitted_at = verb, spec, options, submitted_at
        self.cpus = cpus
        self.package = _package_dir()

    def __call__(self) -> Any:
        _log_to_stderr()
        os.environ.update(dict.fromkeys(THREAD_VARS, str(self.cpus)))  # before torch is imported
        env = submitit.JobEnvironment()
        # "process up": how much of that the job's own Python start and unpickling took, the rest
        # being SLURM's (queue, launch).
        print(f"tskd-job: {self.verb} {self.spec['out_dir']} as {env} started "
              f"{time.time() - self.submitted_at:.2f} s after submission (process up {_process_age():.2f} s, "
              f"CPU {time.process_time():.2f} s)",
              flush=True)
        if _package_dir() != self.package:
            # The job starts in the submitting directory, whose tskd comes first on sys.path.
            print(f"tskd-job: WARNING: this job runs the tskd package in {_package_dir()}, but it was "
                  f"submitted with the one in {self.package}: run Snakemake from the installed checkout "
                  "(pip install -e .)", file=sys.stderr, flush=True)
        if env.num_tasks > 1:
            _export_rank_env()
        return run_verb(self.verb, RunSpec.model_validate(self.spec), self.options)


def _process_age() -> float:
    """Seconds since this process started (Linux: its start time in /proc, 10 ms ticks); 0 elsewhere."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def _package_dir() -> str:
    return str(Path(__file__).resolve().parents[1])  # the tskd package, not tskd/launch


def _log_to_stderr() -> None:
    # The trainer's progress ("resuming ...", one line per epoch) into the job's log, as
    # `tskd train` shows it; only tskd's loggers: submitit's already write to stdout.
    log = logging.getLogger("tskd")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def _export_rank_env() -> None:
    """This task as one rank: MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK for the trainer's
    ``env://`` process group (submitit's TorchDistributedEnvironment), and one GPU per rank."""
    dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False,
                                                                     overwrite=True)
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(visible) > 1:  # the job sees all its GPUs (SLURM bound none per task): take this rank's
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[dist_env.local_rank % len(visible)]
