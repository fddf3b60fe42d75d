"""The warm server (tskd.launch.warm): a command forked from it runs as a cold one would (its
streams, directory, environment, threads, exit code and signals), dies with its command, and a
training run through it ends with the same bits as a cold one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tskd.launch.warm import JOB_ENV, SOCKET_ENV, Server

pytestmark = pytest.mark.slow

# A command as `tskd` runs it: forward to the server, or exit 99 where it would have run cold.
CLIENT = ("import sys; from tskd.launch.warm import forward; "
          "code = forward(sys.argv[1], sys.argv[2:]); sys.exit(99 if code is None else code)")
PROBE = "tests.warm_probe:main"


def _wait_for(cond, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, what
        time.sleep(0.05)


def _started() -> Server:
    s = Server()
    s.start()
    path = os.environ[SOCKET_ENV]
    _wait_for(lambda: os.path.exists(path) or s.proc.poll() is not None, "the server listens")
    assert s.proc.poll() is None
    return s


@pytest.fixture(scope="module")
def server():
    """One server for the module (each start imports torch and MLflow); a test that stops one
    starts its own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(REPO))  # the server's children can import tests.warm_probe
        s = _started()
        yield s
        s.stop()


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _client(entry: str, *argv: str, env=None, cwd=None, **kw):
    return subprocess.run([sys.executable, "-c", CLIENT, entry, *argv], env=env or _env(), cwd=cwd,
                          capture_output=True, text=True, timeout=120, **kw)


def test_a_command_runs_in_a_child_of_the_server_with_its_streams_directory_and_environment(server, tmp_path):
    r = _client(PROBE, "describe", "3", env=_env(TSKD_PROBE="x y"), cwd=tmp_path)
    assert r.returncode == 3, r.stderr
    seen = json.loads(r.stdout)
    assert seen["ppid"] == server.proc.pid  # forked by the server, not run by the command
    assert seen["cwd"] == str(tmp_path)
    assert seen["env"]["TSKD_PROBE"] == "x y" and SOCKET_ENV not in seen["env"]
    assert seen["env"]["TSKD_WARM_FORKED"] == str(server.proc.pid)  # the job log says it
    assert seen["argv"][1:] == ["describe", "3"]
    assert seen["torch_threads"] == 1
    assert r.stderr == "to stderr\n"


def test_a_job_gets_the_threads_snakemake_gives_it(server):
    seen = json.loads(_client(PROBE, "describe", "0", env=_env(OMP_NUM_THREADS="2")).stdout)
    assert seen["torch_threads"] == 2  # the server imported torch with 1


def test_failures_exit_as_in_a_cold_process(server):
    r = _client(PROBE, "raise")
    assert r.returncode == 1 and "RuntimeError: the probe failed" in r.stderr
    r = _client(PROBE, "exit", "a message")
    assert r.returncode == 1 and r.stderr == "a message\n"
    r = _client("tskd.cli:main", "check", "--preset", "no/such.yaml")
    cold = subprocess.run([sys.executable, "-m", "tskd.cli", "check", "--preset", "no/such.yaml"],
                          env=_env(TSKD_WARM="0"), capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stderr) == (cold.returncode, cold.stderr) and r.returncode == 2


def _sleeping(server):
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, PROBE, "sleep", "120"], env=_env(),
                            stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    assert Path(f"/proc/{child}/status").read_text().count(f"PPid:\t{server.proc.pid}\n") == 1
    return proc, child


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


def test_a_killed_command_takes_its_child_with_it(server):
    proc, child = _sleeping(server)
    proc.kill()  # SIGKILL: nothing can be forwarded
    proc.wait()
    _wait_for(lambda: _gone(child), "the child dies with its command", timeout=10)


def test_signals_are_forwarded_and_the_command_dies_of_its_childs_signal(server):
    proc, child = _sleeping(server)
    proc.terminate()
    assert proc.wait(timeout=30) == -signal.SIGTERM
    _wait_for(lambda: _gone(child), "the child got the SIGTERM", timeout=10)


def test_without_a_usable_server_the_command_runs_cold(server, monkeypatch):
    assert _client(PROBE, "describe", "0", env=_env(TSKD_WARM="0")).returncode == 99
    assert _client(PROBE, "describe", "0", env=_env(SLURM_JOB_ID="123")).returncode == 99  # another job
    no_threads = {k: v for k, v in _env().items() if k != "OMP_NUM_THREADS"}
    assert _client(PROBE, "describe", "0", env=no_threads).returncode == 99  # not a Snakemake job
    assert _client(PROBE, "describe", "0", env=_env(**{SOCKET_ENV: "/nonexistent/s"})).returncode == 99
    assert _client(PROBE, "describe", "0", env=_env(SLURM_JOB_ID="7", **{JOB_ENV: "7"})).returncode == 0


def test_stop_lets_running_commands_finish_then_removes_the_server(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    for name in (SOCKET_ENV, JOB_ENV):  # start() sets them; monkeypatch puts back the module server's
        monkeypatch.setenv(name, "")
    server = _started()
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, PROBE, "sleep", "2"], env=_env(),
                            stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    sock_dir, pid = server.dir, server.proc.pid
    server.stop()
    assert proc.wait(timeout=60) == 0
    _wait_for(lambda: _gone(pid), "the server exits")
    assert not Path(sock_dir).exists()


def test_a_job_that_finishes_after_its_server_died_still_succeeds(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    for name in (SOCKET_ENV, JOB_ENV):
        monkeypatch.setenv(name, "")
    server = _started()
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, PROBE, "sleep", "2"], env=_env(),
                            stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    server.proc.kill()  # no server left to report the exit: the child tells its command itself
    try:
        assert proc.wait(timeout=60) == 0
    finally:
        server.stop()


def test_the_server_ends_when_its_snakemake_is_gone(tmp_path):
    script = ("import os, sys, time; from tskd.launch.warm import Server; s = Server(); s.start(); "
              "print(s.proc.pid, os.environ['TSKD_WARM_SOCKET'], flush=True); time.sleep(1e6)")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pid, path = parent.stdout.readline().split()
    _wait_for(lambda: os.path.exists(path), "the server listens")
    parent.kill()  # as a Snakemake killed with SIGKILL, which runs no onerror
    parent.wait()
    _wait_for(lambda: _gone(int(pid)), "the orphaned server exits", timeout=10)
    assert not os.path.exists(path)


def test_a_training_run_through_the_server_ends_with_the_bits_of_a_cold_one(server, make_spec, tmp_path):
    from tskd.engine.trainer import train

    teacher = make_spec(out="teacher", recipe={"epochs": 1, "milestones": []})
    train(teacher)
    metrics = {}
    for how in ("cold", "warm"):  # TSKD: the method with the most state (forecasters, a review)
        spec = make_spec(out=how, method="tskd", method_params={"delta": 1, "k": 1}, teacher_arch="resnet8",
                         teacher_path=str(Path(teacher.out_dir) / "model.pt"), recipe={"epochs": 2, "milestones": [1]})
        args = ["train", "--spec", spec.model_dump_json()]
        r = (_client("tskd.cli:main", *args) if how == "warm" else
             subprocess.run([sys.executable, "-m", "tskd.cli", *args], env=_env(TSKD_WARM="0"),
                            capture_output=True, text=True, timeout=300))
        assert r.returncode == 0, r.stderr
        metrics[how] = json.loads((tmp_path / how / "metrics.json").read_text())
    rows = {how: [{k: v for k, v in row.items() if k != "seconds"} for row in m["history"]]
            for how, m in metrics.items()}
    assert rows["warm"] == rows["cold"] and rows["warm"][1]["train_review"] is not None
    a, b = (torch.load(tmp_path / how / "model.pt", weights_only=True)["model"] for how in ("cold", "warm"))
    assert all(torch.equal(a[k], b[k]) for k in a)
