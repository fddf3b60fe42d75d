"""slurm/mlflow-server.sh keeps the shared tracking server closed (issue #22 §4): no secret on any
command line or in its log, MLflow's basic authentication whenever it listens beyond loopback,
its state and artifacts private to their owner, and bad input refused with a message that names
the variable or file.

The server runs on the MariaDB of the local test cluster (``slurm_cluster``), with a real
generated password, on a free port and a temporary state dir. The database ``tskd_mlflow_sec`` is
kept between sessions (creating MLflow's tables takes about a minute)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.mlflow_server import free_port
from tests.slurm_fixtures import slurm_cluster  # noqa: F401  (the fixture)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "mlflow-server.sh"
DB_NAME = "tskd_mlflow_sec"  # not test_slurm.py's: each database has its own MariaDB user and password


def _report(msg: str) -> None:
    print(f"[mlflow-security] {msg}", file=sys.stderr)


def _env(state: Path, port: int, **extra: str) -> dict[str, str]:
    """The caller's environment without any TSKD_MLFLOW_* / MLFLOW_* of its own, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TSKD_MLFLOW_", "MLFLOW_"))}
    env.update(TSKD_MLFLOW_DIR=str(state), TSKD_MLFLOW_PORT=str(port), TSKD_MLFLOW_PYTHON=sys.executable,
               TSKD_MLFLOW_DB_NAME=DB_NAME, **extra)
    return env


def _script(cmd: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), cmd], capture_output=True, text=True, env=env, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def _cmdlines() -> set[bytes]:
    seen = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):  # gone meanwhile
                seen.add((p / "cmdline").read_bytes())
    return seen


class CmdlineWatch:
    """Every command line of every process, sampled every 50 ms while it runs (what `ps` shows any user)."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.seen |= _cmdlines()

    def __enter__(self) -> CmdlineWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.seen |= _cmdlines()


def _credentials(path: Path) -> tuple[str, str]:
    text = path.read_text()
    user = re.search(r"^export MLFLOW_TRACKING_USERNAME=(\S+)$", text, re.M)
    pw = re.search(r"^export MLFLOW_TRACKING_PASSWORD=(\S+)$", text, re.M)
    assert user and pw, f"{path} lacks the export lines:\n{text}"
    return user.group(1), pw.group(1)


def _api(url: str, path: str, body: dict | None = None, auth: tuple[str, str] | None = None) -> tuple[int, str]:
    """One REST call; returns the status and the body (an HTTP error is a status too)."""
    req = urllib.request.Request(f"{url}{path}", method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@dataclass
class Server:
    state: Path
    env: dict[str, str]
    url: str
    start: subprocess.CompletedProcess
    watch: CmdlineWatch


@pytest.fixture(scope="module")
def auth_server(slurm_cluster, tmp_path_factory):  # noqa: F811
    """`start` listening on 0.0.0.0 with every default (authentication is not asked for), on the
    test cluster's MariaDB; every process's command line watched from before the start to after
    the stop."""
    state = tmp_path_factory.mktemp("mlflow-sec") / "state"  # made by the script
    env = _env(state, free_port(), TSKD_MLFLOW_HOST="0.0.0.0")
    with CmdlineWatch() as watch:
        t0 = time.monotonic()
        r = _script("start", env)
        _report(f"start on 0.0.0.0 (MariaDB, authentication): {time.monotonic() - t0:.1f} s")
        try:
            assert r.returncode == 0, r.stdout + r.stderr
            m = re.search(r"^export MLFLOW_TRACKING_URI=(\S+)$", r.stdout, re.M)
            assert m, r.stdout
            yield Server(state, env, m.group(1), r, watch)
        finally:
            t0 = time.monotonic()
            stop = _script("stop", env, timeout=180)
            _report(f"stop: {time.monotonic() - t0:.1f} s")
            assert stop.returncode == 0, stop.stdout + stop.stderr


# What a job does: the lines `start` printed, then MLflow's client (it reads MLFLOW_TRACKING_URI,
# MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD from the environment).
CLIENT = """
import json, os, tempfile, uuid
from pathlib import Path
from mlflow import MlflowClient
assert os.environ["MLFLOW_TRACKING_USERNAME"] and os.environ["MLFLOW_TRACKING_PASSWORD"]
c = MlflowClient()
exp = c.create_experiment(f"tskd-security-{uuid.uuid4().hex[:8]}")
run = c.create_run(exp)
c.log_param(run.info.run_id, "seed", "0")
c.log_metric(run.info.run_id, "test_top1", 0.5)
d = Path(tempfile.mkdtemp())
(d / "metrics.json").write_text("{}")
c.log_artifact(run.info.run_id, str(d / "metrics.json"))
c.set_terminated(run.info.run_id)
got = c.get_run(run.info.run_id)
print(json.dumps({"experiment_id": exp, "run_id": run.info.run_id, "metrics": got.data.metrics,
                  "status": got.info.status, "artifacts": [a.path for a in c.list_artifacts(run.info.run_id)]}))
"""


@pytest.fixture(scope="module")
def logged_run(auth_server) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(START_LINES=auth_server.start.stdout, PY=sys.executable, CODE=CLIENT)
    t0 = time.monotonic()
    r = subprocess.run(["bash", "-c", 'eval "$START_LINES" && exec "$PY" -c "$CODE"'], capture_output=True,
                       text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    _report(f"authenticated client (experiment, run, metric, artifact): {time.monotonic() - t0:.1f} s")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_start_prints_the_uri_and_a_source_line_never_the_password(auth_server):
    creds = auth_server.state / "client.env"
    user, pw = _credentials(creds)  # generated at the first start: no TSKD_MLFLOW_CREDENTIALS given
    assert user and len(pw) >= 12
    assert auth_server.start.stdout.splitlines() == [
        f"export MLFLOW_TRACKING_URI={auth_server.url}",
        f"source {creds}  # MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD"]
    assert pw not in auth_server.start.stdout + auth_server.start.stderr


def test_authenticated_client_creates_an_experiment_and_logs_a_run(logged_run):
    assert logged_run["status"] == "FINISHED"
    assert logged_run["metrics"] == {"test_top1": 0.5}
    assert logged_run["artifacts"] == ["metrics.json"]


def test_beyond_loopback_unauthenticated_requests_are_refused(auth_server, logged_run):
    url = auth_server.url
    creds = _credentials(auth_server.state / "client.env")
    name = f"tskd-intruder-{uuid.uuid4().hex[:8]}"
    status, body = _api(url, "/api/2.0/mlflow/experiments/create", {"name": name})
    assert status == 401, body  # MLflow's basic authentication, not the Host header check (403)
    status, body = _api(url, "/api/2.0/mlflow/experiments/create", {"name": name}, auth=(creds[0], "not-the-password"))
    assert status == 401, body
    run_id = logged_run["run_id"]
    status, body = _api(url, "/api/2.0/mlflow/runs/delete", {"run_id": run_id})
    assert status == 401, body
    status, body = _api(url, "/api/2.0/mlflow/runs/log-metric",
                        {"run_id": run_id, "key": "test_top1", "value": 0.0, "timestamp": 0})
    assert status == 401, body
    status, body = _api(url, f"/api/2.0/mlflow/runs/get?run_id={run_id}")
    assert status == 401, body  # reading needs a user too
    # Nothing of that happened: the run is there, unchanged; the experiment was not made.
    status, body = _api(url, f"/api/2.0/mlflow/runs/get?run_id={run_id}", auth=creds)
    assert status == 200, body
    run = json.loads(body)["run"]
    assert run["info"]["lifecycle_stage"] == "active"
    assert [m["value"] for m in run["data"]["metrics"]] == [0.5]
    status, body = _api(url, "/api/2.0/mlflow/experiments/get-by-name?" + urllib.parse.urlencode(
        {"experiment_name": name}), auth=creds)
    assert status == 404, body
    # The authentication is MLflow's own app, switched on by default beyond loopback.
    pid = (auth_server.state / "server.pid").read_text().strip()
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"--app-name" in argv and argv[argv.index(b"--app-name") + 1] == b"basic-auth", argv
    assert b"--allowed-hosts" in argv, argv


def test_no_secret_on_any_command_line_or_in_the_log(auth_server, request):
    db_pw = (auth_server.state / "dbpass").read_text().strip()  # the test cluster's database: generated
    assert re.fullmatch(r"[0-9a-f]{32}", db_pw), db_pw
    secrets = [db_pw]
    if (auth_server.state / "client.env").exists():  # else the test below fails; this one checks leaks
        secrets.append(_credentials(auth_server.state / "client.env")[1])
        request.getfixturevalue("logged_run")  # the workers have served authenticated requests
    seen = auth_server.watch.seen | _cmdlines()  # from before the start until now, and the server is up
    server_lines = [c for c in seen if b"mlflow" in c and b"server" in c]
    assert server_lines, "the watch never saw the server"
    for secret in secrets:
        leaks = [c.replace(b"\0", b" ").decode(errors="replace") for c in seen if secret.encode() in c]
        assert not leaks, f"a command line holds a password: {leaks}"
        log = (auth_server.state / "server.log").read_text()
        assert secret not in log, "the server log holds a password"
        assert secret not in auth_server.start.stdout + auth_server.start.stderr


def _open_to_others(state: Path) -> dict[str, str]:
    return {str(p.relative_to(state)): oct(stat.S_IMODE(p.stat().st_mode))
            for p in [state, *state.rglob("*")] if p.stat().st_mode & 0o077}


def test_state_and_artifacts_are_readable_only_by_their_owner(auth_server, request):
    state = auth_server.state
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "artifacts").stat().st_mode) == 0o700
    assert not _open_to_others(state)
    for name in ("server.pid", "server.log", "dbpass", "my.cnf", "client.env", "auth.ini", "auth.db"):
        assert (state / name).is_file(), name
    # What the server writes when a job uploads an artifact: its owner's alone too.
    run_id = request.getfixturevalue("logged_run")["run_id"]
    (uploaded,) = [p for p in (state / "artifacts").rglob("metrics.json") if run_id in p.parts]
    assert stat.S_IMODE(uploaded.stat().st_mode) == 0o600
    assert not _open_to_others(state)


def test_second_start_reuses_the_server_and_checks_the_credentials(auth_server, tmp_path):
    again = _script("start", auth_server.env, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already running" in again.stderr
    assert again.stdout == auth_server.start.stdout
    # Another password than the one the server's user database was made with: refused, naming both.
    user, _ = _credentials(auth_server.state / "client.env")
    other = tmp_path / "other.env"
    other.write_text(f"export MLFLOW_TRACKING_USERNAME={user}\nexport MLFLOW_TRACKING_PASSWORD=another-password-0\n")
    other.chmod(0o600)
    r = _script("start", {**auth_server.env, "TSKD_MLFLOW_CREDENTIALS": str(other)}, timeout=120)
    assert r.returncode != 0
    assert str(other) in r.stderr and str(auth_server.state / "auth.db") in r.stderr, r.stderr
    assert "another-password-0" not in r.stdout + r.stderr
    # Asked to run with other settings while it runs: refused, with the fix.
    r = _script("start", {**auth_server.env, "TSKD_MLFLOW_HOST": "127.0.0.1"}, timeout=120)
    assert r.returncode != 0 and "stop it first" in r.stderr, r.stderr
    status = _script("status", auth_server.env, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr


def test_loopback_default_is_open_and_start_status_stop_still_work(auth_server, tmp_path):
    """On 127.0.0.1 authentication is off by default. The database is given as a URI that holds no
    password, naming an option file (pymysql's read_default_file): the first server's."""
    db_port = os.environ.get("TSKD_SLURM_DB_PORT", "3306")
    uri = f"mysql+pymysql://{DB_NAME}@127.0.0.1:{db_port}/{DB_NAME}?read_default_file={auth_server.state / 'my.cnf'}"
    port = free_port()
    env = _env(tmp_path / "state", port, TSKD_MLFLOW_DB_URI=uri)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        r = _script("start", env)
        _report(f"start on 127.0.0.1 (MariaDB through an option file, no authentication): "
                f"{time.monotonic() - t0:.1f} s")
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout == f"export MLFLOW_TRACKING_URI={url}\n"  # nothing to source
        status, body = _api(url, "/api/2.0/mlflow/experiments/search", {"max_results": 1})
        assert status == 200, body
        again = _script("start", env, timeout=120)
        assert again.returncode == 0 and "already running" in again.stderr and again.stdout == r.stdout
        assert _script("status", env, timeout=60).returncode == 0
        stop = _script("stop", env, timeout=180)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert _script("status", env, timeout=60).returncode == 3
        deadline = time.monotonic() + 30  # the workers end shortly after the server's own process
        while (left := [c for c in _cmdlines() if f"--port\0{port}\0".encode() in c]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, left
        assert not (tmp_path / "state" / "server.pid").exists()
    finally:
        _script("stop", env, timeout=180)


def _write_private(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


CREDS_OK = "export MLFLOW_TRACKING_USERNAME=someone\nexport MLFLOW_TRACKING_PASSWORD={}\n"


def _bad_creds_world(tmp: Path) -> tuple[dict, list[str]]:
    f = _write_private(tmp / "creds.env", CREDS_OK.format("a-long-enough-password"), 0o644)
    return {"TSKD_MLFLOW_HOST": "0.0.0.0", "TSKD_MLFLOW_CREDENTIALS": str(f)}, [str(f), f"chmod 600 {f}"]


def _bad_creds_group(tmp: Path) -> tuple[dict, list[str]]:
    f = _write_private(tmp / "creds.env", CREDS_OK.format("a-long-enough-password"), 0o640)
    return {"TSKD_MLFLOW_AUTH": "1", "TSKD_MLFLOW_CREDENTIALS": str(f)}, [str(f), f"chmod 600 {f}"]


def _bad_creds_missing(tmp: Path) -> tuple[dict, list[str]]:
    f = tmp / "nowhere.env"
    return {"TSKD_MLFLOW_HOST": "0.0.0.0", "TSKD_MLFLOW_CREDENTIALS": str(f)}, ["TSKD_MLFLOW_CREDENTIALS", str(f)]


def _bad_creds_short(tmp: Path) -> tuple[dict, list[str]]:
    f = _write_private(tmp / "creds.env", CREDS_OK.format("short"))
    return {"TSKD_MLFLOW_HOST": "0.0.0.0", "TSKD_MLFLOW_CREDENTIALS": str(f)}, [str(f), "MLFLOW_TRACKING_PASSWORD",
                                                                                 "12"]


def _bad_creds_no_user(tmp: Path) -> tuple[dict, list[str]]:
    f = _write_private(tmp / "creds.env", "export MLFLOW_TRACKING_PASSWORD=a-long-enough-password\n")
    return {"TSKD_MLFLOW_HOST": "0.0.0.0", "TSKD_MLFLOW_CREDENTIALS": str(f)}, [str(f), "MLFLOW_TRACKING_USERNAME"]


def _bad_auth_switch(tmp: Path) -> tuple[dict, list[str]]:
    return {"TSKD_MLFLOW_AUTH": "yes"}, ["TSKD_MLFLOW_AUTH='yes'"]


def _bad_umask(tmp: Path) -> tuple[dict, list[str]]:
    return {"TSKD_MLFLOW_UMASK": "rw"}, ["TSKD_MLFLOW_UMASK='rw'"]


def _bad_open_artifacts(tmp: Path) -> tuple[dict, list[str]]:
    art = tmp / "artifacts"
    art.mkdir()
    art.chmod(0o755)
    return {"TSKD_MLFLOW_ARTIFACTS": str(art)}, ["TSKD_MLFLOW_ARTIFACTS", str(art), f"chmod go-rwx {art}",
                                                 "TSKD_MLFLOW_UMASK"]


def _bad_open_option_file(tmp: Path) -> tuple[dict, list[str]]:
    f = _write_private(tmp / "my.cnf", "[client]\npassword = not-a-secret-any-more\n", 0o644)
    uri = f"mysql+pymysql://someone@127.0.0.1:1/db?read_default_file={f}"
    return {"TSKD_MLFLOW_DB_URI": uri}, [str(f), "read_default_file", f"chmod 600 {f}"]


def _bad_missing_option_file(tmp: Path) -> tuple[dict, list[str]]:
    f = tmp / "no.cnf"
    return {"TSKD_MLFLOW_DB_URI": f"mysql+pymysql://someone@127.0.0.1:1/db?read_default_file={f}"}, [str(f)]


def _bad_foreign_state(tmp: Path) -> tuple[dict, list[str]]:
    state = tmp / "foreign"
    state.mkdir()
    os.chown(state, 65534, 65534)  # nobody's
    return {"TSKD_MLFLOW_DIR": str(state)}, ["TSKD_MLFLOW_DIR", str(state), "another user"]


BAD = [_bad_creds_world, _bad_creds_group, _bad_creds_missing, _bad_creds_short, _bad_creds_no_user,
       _bad_auth_switch, _bad_umask, _bad_open_artifacts, _bad_open_option_file, _bad_missing_option_file,
       _bad_foreign_state]


@pytest.mark.parametrize("case", BAD, ids=[c.__name__.removeprefix("_bad_") for c in BAD])
def test_bad_input_is_refused_naming_the_variable_or_file(case, tmp_path):
    if case is _bad_foreign_state and os.geteuid() != 0:
        pytest.skip("giving a directory to another user needs root")
    extra, expected = case(tmp_path)
    # No test cluster here: nothing may get as far as a database (or a server).
    env = _env(tmp_path / "state", free_port(), TSKD_SLURM_DIR=str(tmp_path / "no-cluster"))
    env.update(extra)
    r = _script("start", env, timeout=120)
    assert r.returncode != 0, r.stdout + r.stderr
    assert r.stdout == "", r.stdout  # no line to export or source
    for part in expected:
        assert part in r.stderr, f"{part!r} not in:\n{r.stderr}"
    assert "starting mlflow server" not in r.stderr
    assert "not-a-secret-any-more" not in r.stderr
