"""One GPU per in-process training job on a workstation (tskd.launch.gpus).

No GPU exists here: the GPU ids are given as a list, which is all the slot logic reads; the
locks, the processes and the waiting are real.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tskd.launch.gpus import gpu_slot, visible_gpus

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tskd.launch.gpus import gpu_slot
    gpus, per_gpu, directory, out, hold = sys.argv[1:]
    with gpu_slot(gpus.split(","), int(per_gpu), Path(directory), poll_s=0.05) as gpu:
        Path(out).write_text(f"{gpu} {time.time()}")
        time.sleep(float(hold))
        Path(out + ".released").write_text(str(time.time()))
""")


def _start(tmp_path: Path, name: str, gpus: str, per_gpu: int, hold: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, gpus, str(per_gpu), str(tmp_path / "locks"),
                             str(tmp_path / name), str(hold)])


def _wait_for(path: Path, timeout: float = 60) -> str:
    deadline = time.time() + timeout
    while not path.exists() or not path.read_text():
        assert time.time() < deadline, f"{path} never written"
        time.sleep(0.02)
    return path.read_text()


def test_concurrent_jobs_get_distinct_gpus_and_a_third_waits(tmp_path):
    a, b = _start(tmp_path, "a", "0,1", 1, 3.0), _start(tmp_path, "b", "0,1", 1, 3.0)
    got = {_wait_for(tmp_path / "a").split()[0], _wait_for(tmp_path / "b").split()[0]}
    assert got == {"0", "1"}
    c = _start(tmp_path, "c", "0,1", 1, 0.0)
    gpu_c, when = _wait_for(tmp_path / "c").split()
    for p in (a, b, c):
        assert p.wait(timeout=60) == 0
    # It got a slot only once one of the first two had let go of theirs.
    first_release = min(float((tmp_path / f"{n}.released").read_text()) for n in "ab")
    assert float(when) >= first_release and gpu_c in {"0", "1"}


def test_slots_spread_over_gpus_before_sharing_one(tmp_path):
    with gpu_slot(["3", "5"], 2, tmp_path) as first, gpu_slot(["3", "5"], 2, tmp_path) as second:
        assert {first, second} == {"3", "5"}
        with gpu_slot(["3", "5"], 2, tmp_path) as third:
            assert third == "3"  # the second slot of the first GPU


def test_a_killed_holder_frees_its_slot(tmp_path):
    a = _start(tmp_path, "a", "7", 1, 60.0)
    _wait_for(tmp_path / "a")
    a.kill()  # SIGKILL: the kernel drops its lock
    a.wait()
    with gpu_slot(["7"], 1, tmp_path / "locks", poll_s=0.05) as gpu:
        assert gpu == "7"


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert visible_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_gpus() == []
