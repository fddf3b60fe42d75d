"""A warm start for the workflow's jobs: one process imports torch, torchvision and MLflow once, and
each `tskd` command forks from it instead of importing them again.

A smoke-sized job spends most of its CPU time importing (torch 2 s, torchvision 1.6 s, MLflow
1.8 s on one core of the CI machine) and the smoke DAG runs 36 of them. Snakemake starts the
server when it starts running jobs (`workflow/rules/common.smk`) and names its socket in
``TSKD_WARM_SOCKET``; a `tskd` command that finds the variable sends its arguments, working
directory, environment and standard streams to the server, which forks a child that runs the
command as the `tskd` process would. The command then waits and exits as its child did (the same
code, or the same signal), and forwards the signals it receives to the child.

What keeps a forked job identical to a cold one:
- the server imports third-party packages only, never tskd: the child imports tskd's current code,
  as a fresh process would, and the server never runs a torch operation or opens a store, so no
  thread pool, CUDA context or database connection crosses the fork;
- the child takes the command's environment, directory, argv and file descriptors 0-2, and the
  signal dispositions of a fresh interpreter;
- the child dies with its command: if the waiting command is killed (SIGKILL included), the child
  sees its socket close and kills itself, as a job killed by Snakemake, SLURM or a test would die.

Anything that cannot use the server (no variable, a socket that is gone, a command run in another
SLURM job than the server, whose work must stay in its own allocation) runs cold, as before.
``TSKD_WARM=0`` turns the server off.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import importlib
import json
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

SOCKET_ENV = "TSKD_WARM_SOCKET"
SWITCH_ENV = "TSKD_WARM"
JOB_ENV = "TSKD_WARM_SLURM_JOB"  # the SLURM job the server runs in ("" outside SLURM)
FORKED_ENV = "TSKD_WARM_FORKED"  # in a child: the server's pid (the job log says it started warm)
# What a job imports before its first step; each is importable in tskd's environment.
PRELOAD = ("torch", "torchvision", "numpy", "PIL.Image", "pydantic", "yaml", "mlflow",
           "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store")
_STATUS = struct.Struct("!q")
# The variables that set a process's threads (Snakemake sets them all to each job's `threads`).
THREAD_VARS = ("OMP_NUM_THREADS", "GOTO_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
_SERVER_THREADS = 1  # the server imports torch as the workflow's jobs (`threads: 1`) would
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


# --- the command's side ---------------------------------------------------------------------------

def forward(entry: str, argv: list[str]) -> int | None:
    """Run ``entry`` ("module:function", called with ``argv``, returning an exit code) in a child of
    the warm server and return its exit code; None when there is no usable server (the caller then
    runs the command itself)."""
    path = os.environ.get(SOCKET_ENV)
    if not path or os.environ.get(SWITCH_ENV) == "0":
        return None
    if os.environ.get("SLURM_JOB_ID", "") != os.environ.get(JOB_ENV, ""):
        return None  # a SLURM job that inherited the variable: its work stays in its allocation
    if not os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return None  # not a Snakemake job, which says its threads: torch's default is a cold start's
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        request = json.dumps({"entry": entry, "argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
        socket.send_fds(conn, [struct.pack("!I", len(request)) + request], [0, 1, 2])
        child = _recv_status(conn)
    except OSError:
        conn.close()
        return None  # no server, or one that is going away: a cold start
    if child is None:
        conn.close()
        return None
    for sig in _FORWARDED:
        signal.signal(sig, lambda s, _f: _kill(child, s))
    status = _recv_status(conn)
    conn.close()
    if status is None:
        print(f"tskd: the warm server ({path}) went away while it ran this command", file=sys.stderr)
        return 1
    if status < 0:  # died of a signal: die of the same one, so that the caller sees what it would have
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
        return 128 - status
    return status


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _recv_status(conn: socket.socket) -> int | None:
    data = b""
    while len(data) < _STATUS.size:
        try:
            chunk = conn.recv(_STATUS.size - len(data))
        except InterruptedError:
            continue
        if not chunk:
            return None
        data += chunk
    return _STATUS.unpack(data)[0]


# --- the server -----------------------------------------------------------------------------------

def serve(path: str, parent: int) -> None:
    """Import ``PRELOAD``, then fork a child per connection until ``parent`` exits."""
    for name in PRELOAD:
        __import__(name)
    gc.freeze()  # the collector leaves the imported objects alone, in the server and in its children
    me = os.getpid()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".new")
    os.rename(path + ".new", path)  # commands connect only once the imports are done
    listener.listen(64)
    waiting: dict[int, socket.socket] = {}  # child pid -> its command's connection
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    # A child's exit wakes the loop at once (its command waits for the status), not at the next tick.
    wake_r, wake_w = socket.socketpair()
    for end in (wake_r, wake_w):
        end.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno())
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel.register(wake_r, selectors.EVENT_READ)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    try:
        while (_alive(parent) and not stopping) or waiting:
            for key, _ in sel.select(timeout=0.5):
                if key.fileobj is wake_r:
                    with contextlib.suppress(BlockingIOError):
                        wake_r.recv(4096)
                    continue
                conn, _ = listener.accept()
                pid = _start(conn, [listener, wake_r, wake_w, *waiting.values()], sel)
                if pid is None:
                    conn.close()
                else:
                    waiting[pid] = conn
            _reap(waiting)
            if (stopping or not _alive(parent)) and listener.fileno() != -1:
                sel.unregister(listener)
                listener.close()  # no new commands; the children that run finish first
                with contextlib.suppress(OSError):
                    os.unlink(path)
    finally:
        if os.getpid() == me:  # a child unwinds through here too, on its way out: leave the socket
            with contextlib.suppress(OSError):
                os.unlink(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _start(conn: socket.socket, inherited: list[socket.socket], sel: selectors.BaseSelector) -> int | None:
    conn.settimeout(10)
    try:
        head, fds, _flags, _addr = socket.recv_fds(conn, 4, 3)
        (size,) = struct.unpack("!I", head)
        body = b""
        while len(body) < size:
            chunk = conn.recv(size - len(body))
            if not chunk:
                raise OSError("the command hung up")
            body += chunk
        request = json.loads(body)
    except (OSError, ValueError, struct.error):
        return None
    conn.settimeout(None)
    pid = os.fork()
    if pid:
        for fd in fds:
            os.close(fd)
        try:
            conn.sendall(_STATUS.pack(pid))
        except OSError:
            _kill(pid, signal.SIGKILL)
        return pid
    sel.close()
    signal.set_wakeup_fd(-1)
    for other in inherited:
        other.close()
    _become_command(conn, fds, request)  # never returns
    raise AssertionError("unreachable")


def _become_command(conn: socket.socket, fds: list[int], request: dict) -> None:
    """In the child: take the command's streams, directory, environment and argv, then run it."""
    for sig in (*_FORWARDED, signal.SIGCHLD, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as any Python process starts
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ.pop(SOCKET_ENV, None)  # the child's own subprocesses start cold
    os.environ[FORKED_ENV] = str(os.getppid())
    sys.argv = ["tskd", *request["argv"]]
    threads = int(os.environ["OMP_NUM_THREADS"])
    if "torch" in sys.modules and threads != _SERVER_THREADS and threads > 0:
        # torch read the server's OMP_NUM_THREADS when it was imported; a cold job reads its own.
        sys.modules["torch"].set_num_threads(threads)
    threading.Thread(target=_die_with_command, args=(conn,), daemon=True).start()
    module, function = request["entry"].split(":")
    try:
        code = getattr(importlib.import_module(module), function)(request["argv"])
    except SystemExit as e:
        code = e.code
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:
        traceback.print_exc()
        code = 1
    _exit(code, conn)


def _exit(code: object, conn: socket.socket) -> None:
    """Leave as the interpreter would (non-daemon threads joined, atexit handlers run, streams
    flushed) but without tearing down the modules: their objects live in pages shared with the
    server, and decrementing every reference copies them all (2.3 s for torch and MLflow). The
    command hears the code from here too, so that a server gone meanwhile cannot turn a finished
    job into a failed one (Snakemake would delete its outputs)."""
    main = threading.main_thread()
    for t in threading.enumerate():
        if t is not main and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)  # sys.exit("message"), as Python prints it
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(OSError):
        conn.sendall(_STATUS.pack(code))  # the server's report, if it comes, is not read
    if code < 0:  # died of a signal, as a KeyboardInterrupt does in a cold Python
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


def _die_with_command(conn: socket.socket) -> None:
    # The command holds the other end; it closes when the command exits or is killed.
    while True:
        try:
            if not conn.recv(1):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    os.kill(os.getpid(), signal.SIGKILL)


def _reap(waiting: dict[int, socket.socket]) -> None:
    while waiting:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = waiting.pop(pid, None)
        if conn is None:
            continue
        code = os.waitstatus_to_exitcode(status)  # -N: killed by signal N
        with contextlib.suppress(OSError):
            conn.sendall(_STATUS.pack(code))
        conn.close()


# --- Snakemake's side -----------------------------------------------------------------------------

class Server:
    """A warm server for this process's jobs: ``start()`` sets ``TSKD_WARM_SOCKET``, ``stop()``
    ends it. It also ends by itself when this process is gone."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.dir: str | None = None

    def start(self) -> None:
        if os.environ.get(SWITCH_ENV) == "0" or self.proc is not None:
            return
        self.dir = tempfile.mkdtemp(prefix="tskd-warm-")  # short: a socket path has 107 bytes
        path = str(Path(self.dir) / "s")
        # This file as a script, without its directory or the working directory on sys.path (-P):
        # the server imports no tskd module, so each child imports tskd's code as a cold job would.
        self.proc = subprocess.Popen(
            [sys.executable, "-P", __file__, "--socket", path, "--parent", str(os.getpid())],
            stdin=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, **dict.fromkeys(THREAD_VARS, str(_SERVER_THREADS))})
        os.environ[SOCKET_ENV] = path  # jobs started before the server listens run cold
        os.environ[JOB_ENV] = os.environ.get("SLURM_JOB_ID", "")

    def stop(self) -> None:
        os.environ.pop(SOCKET_ENV, None)
        os.environ.pop(JOB_ENV, None)
        if self.proc is not None:
            # The running children finish first (a failed DAG's other jobs may still be running).
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
            self.proc = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


def _main() -> None:
    ap = argparse.ArgumentParser(description="the warm server for tskd's jobs (started by Snakemake)")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--parent", type=int, required=True, help="serve until this process exits")
    a = ap.parse_args()
    serve(a.socket, a.parent)


if __name__ == "__main__":
    _main()
