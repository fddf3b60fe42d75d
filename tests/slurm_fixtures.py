"""The local SLURM cluster of slurm/local-cluster.sh as a pytest fixture, for every test file.

Import the fixture into a test module (``from tests.slurm_fixtures import slurm_cluster``);
the module's first test that asks for it starts the cluster (idempotent, about 0.2 s when it
already runs) and it is left running afterwards. One module at a time holds it (CLUSTER_LOCK), so
the suite may run on several workers. Set TSKD_SLURM_COLD_START=1 to stop it first (once per
process) and time a start from nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "local-cluster.sh"
START_TIMEOUT_S = 600  # generous: a fresh machine also runs apt-get


def can_run_as_root() -> bool:
    if os.geteuid() == 0:
        return True
    if shutil.which("sudo") is None:
        return False
    return subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0


def cluster(cmd: str, timeout: float = START_TIMEOUT_S) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``local-cluster.sh CMD``; return the process and its wall time."""
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", str(SCRIPT), cmd], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    return proc, time.monotonic() - t0


def report(msg: str) -> None:
    print(f"[local-cluster] {msg}", file=sys.stderr)


# One test module at a time uses the cluster, across pytest-xdist workers and across checkouts
# (a CI run beside a developer's): a module's tests and servers assume nobody else restarts the
# daemons, stops the database or fills the queue meanwhile. Held from the module's first cluster
# test until its last fixture is torn down.
CLUSTER_LOCK = Path(os.environ.get("TSKD_TEST_CLUSTER_LOCK", "/tmp/tskd-test-cluster.lock"))
_cold_started = False


@pytest.fixture(scope="module")
def slurm_cluster():
    """The local cluster, started if it is not running (idempotent; left running afterwards), held
    by this test module alone (CLUSTER_LOCK) until its fixtures are torn down."""
    global _cold_started
    if sys.platform != "linux" or (shutil.which("apt-get") is None and shutil.which("sbatch") is None):
        pytest.skip("the local SLURM cluster needs a Debian/Ubuntu machine")
    if not can_run_as_root():
        pytest.skip("the local SLURM cluster needs root or passwordless sudo")
    lock = FileLock(str(CLUSTER_LOCK))
    t0 = time.monotonic()
    with lock:
        if time.monotonic() - t0 > 1:
            report(f"waited {time.monotonic() - t0:.0f} s for another test module to finish with the cluster")
        if os.environ.get("TSKD_SLURM_COLD_START") == "1" and not _cold_started:
            _cold_started = True
            proc, dt = cluster("stop", timeout=180)
            assert proc.returncode == 0, proc.stdout + proc.stderr
            report(f"stop: {dt:.2f} s")
        proc, dt = cluster("start")
        if proc.returncode != 0:
            pytest.fail(f"local-cluster.sh start failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        kind = "already running" if "already running" in proc.stdout else "from stopped/fresh"
        report(f"start ({kind}): {dt:.2f} s")
        proc2, dt2 = cluster("start")
        assert proc2.returncode == 0, proc2.stdout + proc2.stderr
        report(f"second start: {dt2:.2f} s")
        assert "already running" in proc2.stdout, proc2.stdout
        yield None
