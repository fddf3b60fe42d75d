"""One GPU per training job on a workstation without SLURM.

Snakemake runs several training rules at once (``--cores``), but its ``resources: gpus=1`` only
counts; it does not say which GPU a job gets, so without this every job would start on
``cuda:0``. A job run in-process (backend ``inline``, what ``make demo`` uses) therefore claims a
slot first: an exclusive ``flock`` on ``<lock dir>/gpu<id>.slot<j>``, held for the job's lifetime
(the kernel releases it when the process dies, even by SIGKILL), and narrows
``CUDA_VISIBLE_DEVICES`` to that GPU before torch initialises CUDA. ``TSKD_JOBS_PER_GPU`` slots
per GPU (default 1) let several small CIFAR jobs share one device.

The GPUs are those ``CUDA_VISIBLE_DEVICES`` lists, else those ``nvidia-smi`` lists; with none
(a CPU machine) or with exactly one visible GPU (a SLURM job given its GPU), nothing is claimed.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tskd.launch.wait import say

LOCK_DIR_ENV = "TSKD_GPU_LOCKS"
PER_GPU_ENV = "TSKD_JOBS_PER_GPU"


def visible_gpus() -> list[str]:
    """The GPU ids this process may use, without initialising CUDA."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def lock_dir() -> Path:
    default = Path(os.environ.get("XDG_RUNTIME_DIR") or "/tmp") / f"tskd-gpu-locks-{os.getuid()}"
    return Path(os.environ.get(LOCK_DIR_ENV) or default)


@contextmanager
def gpu_slot(gpus: list[str], per_gpu: int, directory: Path, poll_s: float = 2.0) -> Iterator[str]:
    """Hold a free slot of one of ``gpus`` (``per_gpu`` slots each) and yield its GPU id; wait while
    every slot is held. Slots are tried GPU by GPU, so jobs spread over the GPUs before doubling up."""
    directory.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for j in range(per_gpu):
            for gpu in gpus:
                fd = os.open(directory / f"gpu{gpu}.slot{j}", os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                try:
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a curious user
                    yield gpu
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    os.close(fd)
                return
        if not waited:
            say(f"tskd: all {len(gpus) * per_gpu} GPU slots ({', '.join(gpus)} x {per_gpu}) are taken; "
                     f"waiting (locks in {directory})")
            waited = True
        time.sleep(poll_s)


@contextmanager
def claim_gpu_for_this_process() -> Iterator[str | None]:
    """Narrow ``CUDA_VISIBLE_DEVICES`` to one claimed GPU for the rest of this process (see the module
    docstring); yields the GPU id, or None when there is nothing to choose between."""
    gpus = visible_gpus()
    if len(gpus) <= 1:
        yield None
        return
    per_gpu = int(os.environ.get(PER_GPU_ENV, "1") or 1)
    with gpu_slot(gpus, max(per_gpu, 1), lock_dir()) as gpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        yield gpu
