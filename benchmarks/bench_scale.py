"""A preset's whole grid at its real shape under `snakemake --profile slurm`, measured: the rehearsal of a
cluster run (issue: "the whole grid at its real size on SLURM").

    python benchmarks/bench_scale.py [--preset params/cifar100.yaml] [--jobs 40] [--pairs N --seeds N
        --recipes N] [--tracking-uri URI] [--workdir DIR] [--json OUT] [--no-ui]
    python benchmarks/bench_scale.py --again --workdir DIR [--json OUT]   # step 3 on a finished grid

What it does, in a copy of this checkout (``--workdir``, a git and DVC repository of its own):

1. derives the preset's scale grid (``tskd scale-preset``: every job, synthetic data, a few epochs) and
   its DVC pipeline, and logs to ``--tracking-uri`` or, unset, to a ``slurm/mlflow-server.sh`` it starts
   on the test cluster's MariaDB (an experiment of its own per run);
2. runs the grid with ``snakemake --profile slurm --jobs N`` on whatever cluster ``sbatch`` reaches
   (the test cluster: ``TSKD_SLURM_CPUS=32 bash slurm/local-cluster.sh start`` declares 32 CPUs, so
   that 32 one-CPU jobs run at once sharing the machine's cores), sampling every 2 s the jobs in
   SLURM's queue and the login side's memory (Snakemake and each waiting ``tskd train --launch``);
3. reads every training job's log for its overhead outside training (submission to start, Python
   start, imports, data, models, run start (the tracker), teardown), checks the tracking server (runs = the
   grid's, none RUNNING or FAILED, every parent with its children; its CPU time and the slowest of
   the requests a probe sends every 5 s, the UI's runs query), and times ``snakemake -n``,
   ``tskd status``, ``tskd report``, ``dvc commit`` + ``dvc status`` + ``dvc push``, and the MLflow
   UI's runs table and one run's page in headless Chromium (playwright; ``--no-ui`` skips it).

It prints a table and, with ``--json``, writes every figure; it exits 1 when a check fails (a run
lost, left RUNNING, a dirty ``dvc status``, Snakemake with work left), so a test can run it reduced.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
STARTED = re.compile(r"started ([0-9.]+) s after submission \(process up ([0-9.]+) s(?:, CPU ([0-9.]+) s)?\)")
IMPORTS = re.compile(r"tskd-job: imports ([0-9.]+) s(?: \(CPU ([0-9.]+) s\))?")
SECONDS = re.compile(r": seconds: (.+)$", re.M)
CPU_SECONDS = re.compile(r": CPU seconds: (.+)$", re.M)
PHASES = ("queue", "python", "imports", "data", "models", "run start", "teardown")
GOALS = {"overhead median s": 5.0, "snakemake -n s": 10.0, "tskd report s": 60.0, "ui runs table s": 5.0}


def sh(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 3600, check: bool = True
       ) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    dt = time.perf_counter() - t0
    if check and r.returncode != 0:
        raise SystemExit(f"bench_scale: `{' '.join(cmd)}` failed ({r.returncode}):\n{r.stdout[-3000:]}\n"
                         f"{r.stderr[-3000:]}")
    return r, dt


def copy_checkout(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        src = REPO / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    for leftover in ("dvc.lock", "mlflow.db"):
        (dest / leftover).unlink(missing_ok=True)
    return dest


# -- the login side, sampled ------------------------------------------------------------------
def _memory_kb(pid: int) -> tuple[int, int] | None:
    """(RSS, PSS) of a process in kB, None when it is gone; PSS splits shared pages among their users."""
    try:
        rss = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))
        pss_m = re.search(r"Pss:\s+(\d+)", Path(f"/proc/{pid}/smaps_rollup").read_text())
        return rss, int(pss_m.group(1)) if pss_m else rss
    except (OSError, AttributeError):
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def login_side(snakemake_pid: int) -> dict[str, Any]:
    """Snakemake and its waiting launchers (``tskd ... train ... --launch``): how many, their memory."""
    launchers = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            cmd = _cmdline(int(entry.name))
            # `python .../bin/tskd --log LOG train ... --launch=FILE` (not the shells that start it)
            if (len(cmd) > 2 and "python" in Path(cmd[0]).name and Path(cmd[1]).name == "tskd" and "train" in cmd
                    and any(a.startswith("--launch") for a in cmd)
                    and (mem := _memory_kb(int(entry.name))) is not None):
                launchers.append(mem)
    snake = _memory_kb(snakemake_pid) or (0, 0)
    return {"launchers": len(launchers), "snakemake_rss_mb": snake[0] / 1024, "snakemake_pss_mb": snake[1] / 1024,
            "launcher_rss_mb": [r / 1024 for r, _ in launchers], "launcher_pss_mb": [p / 1024 for _, p in launchers]}


def queued_jobs() -> tuple[int, int]:
    r = subprocess.run(["squeue", "-h", "-o", "%T"], capture_output=True, text=True)
    states = r.stdout.split()
    return states.count("RUNNING"), len(states)


class Sampler(threading.Thread):
    def __init__(self, pid: int, every: float = 2.0):
        super().__init__(daemon=True)
        self.pid, self.every, self.samples, self.stop = pid, every, [], threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stop.wait(self.every):
            running, queued = queued_jobs()
            self.samples.append({"t": time.monotonic() - t0, "running": running, "in_flight": queued,
                                 **login_side(self.pid)})


def memory_at(samples: list[dict], in_flight: int) -> dict[str, Any] | None:
    """The login side at the first sample with at least ``in_flight`` launchers waiting."""
    for s in samples:
        if s["launchers"] >= in_flight:
            return {"launchers": s["launchers"], "snakemake_rss_mb": round(s["snakemake_rss_mb"], 1),
                    "launcher_rss_mb_each": round(statistics.median(s["launcher_rss_mb"]), 1),
                    "launcher_pss_mb_each": round(statistics.median(s["launcher_pss_mb"]), 1),
                    "total_rss_mb": round(s["snakemake_rss_mb"] + sum(s["launcher_rss_mb"]), 1),
                    "total_pss_mb": round(s["snakemake_pss_mb"] + sum(s["launcher_pss_mb"]), 1)}
    return None


# -- the tracking server ----------------------------------------------------------------------
def start_server(work: Path, env: dict[str, str], db_name: str) -> tuple[str, dict[str, str], Path]:
    from socket import socket

    with socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = work / "mlflow"
    senv = {**env, "TSKD_MLFLOW_DIR": str(state), "TSKD_MLFLOW_PORT": str(port), "TSKD_MLFLOW_PYTHON": sys.executable,
            "TSKD_MLFLOW_DB_NAME": db_name}
    r, dt = sh(["bash", str(REPO / "slurm/mlflow-server.sh"), "start"], REPO, senv, timeout=600)
    url = re.search(r"MLFLOW_TRACKING_URI=(\S+)", r.stdout).group(1).strip("'\"")
    print(f"tracking server {url} on MariaDB ({db_name}), up in {dt:.1f} s", flush=True)
    return url, senv, state / "server.pid"


def stop_server(senv: dict[str, str]) -> None:
    subprocess.run(["bash", str(REPO / "slurm/mlflow-server.sh"), "stop"], env=senv, capture_output=True, timeout=120)


def group_cpu_s(pid_file: Path) -> float:
    """CPU seconds (user + system) of every process in the server's process group."""
    if not pid_file.is_file():
        return float("nan")
    try:
        pgid = os.getpgid(int(pid_file.read_text().strip()))
    except (OSError, ValueError):
        return float("nan")
    tick, total = os.sysconf("SC_CLK_TCK"), 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                total += int(fields[11]) + int(fields[12])
    return total / tick


class Probe(threading.Thread):
    """Every 5 s, the request the UI's runs table sends (search_runs of the experiment, 100 rows)."""

    def __init__(self, url: str, experiment: str):
        super().__init__(daemon=True)
        self.url, self.experiment, self.times, self.errors, self.stop = url, experiment, [], 0, threading.Event()

    def run(self) -> None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.url)
        while not self.stop.wait(5):
            t0 = time.perf_counter()
            try:
                exp = client.get_experiment_by_name(self.experiment)
                if exp is not None:
                    client.search_runs([exp.experiment_id], max_results=100)
                self.times.append(time.perf_counter() - t0)
            except Exception:  # noqa: BLE001 - a probe that fails is counted, not fatal
                self.errors += 1


def check_store(url: str, experiment: str, expected_runs: int) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {"ok": False, "why": f"no experiment {experiment}"}
    runs = client.search_runs([exp.experiment_id], max_results=50000)
    train = [r for r in runs if r.data.tags.get("run_kind") == "train"]
    parents = [r for r in runs if r.data.tags.get("run_kind") == "seeds"]
    children: dict[str, int] = {}
    for r in train:
        parent = r.data.tags.get("mlflow.parentRunId")
        if parent:
            children[parent] = children.get(parent, 0) + 1
    statuses: dict[str, int] = {}
    for r in runs:
        statuses[r.info.status] = statuses.get(r.info.status, 0) + 1
    childless = [p.info.run_name for p in parents if not children.get(p.info.run_id)]
    ok = (len(train) == expected_runs and not statuses.get("RUNNING") and not statuses.get("FAILED")
          and not childless)
    return {"ok": ok, "runs": len(runs), "train_runs": len(train), "expected_train_runs": expected_runs,
            "parents": len(parents), "childless_parents": childless[:5], "statuses": statuses,
            "experiment_id": exp.experiment_id,
            # The table lists top-level runs (parents, with their seeds folded under them, and
            # teachers), newest first: a child's name never shows until its parent is unfolded.
            "names": [r.info.run_name for r in sorted(runs, key=lambda r: -r.info.start_time)
                      if "mlflow.parentRunId" not in r.data.tags][:50],
            "one_run": train[0].info.run_id if train else None}


def time_ui(url: str, exp_id: str, names: list[str], run_id: str | None) -> dict[str, Any]:
    """Headless Chromium: seconds until the runs table shows a run of the grid; one run's page."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return {"ui skipped": "playwright is not installed (pip install playwright)"}
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        return {"ui skipped": "no chromium (apt-get install chromium)"}
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    out: dict[str, Any] = {}
    shows = "names => names.some(n => document.body && document.body.innerText.includes(n))"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=flags)
        page = browser.new_page()
        t0 = time.perf_counter()
        # /runs: the experiment's "Training runs" table (its bare page is MLflow 3's GenAI overview)
        page.goto(f"{url}/#/experiments/{exp_id}/runs", wait_until="commit")
        page.wait_for_function(shows, arg=names, timeout=180_000, polling=100)
        out["ui runs table s"] = round(time.perf_counter() - t0, 2)
        if run_id:
            page = browser.new_page()
            t0 = time.perf_counter()
            page.goto(f"{url}/#/experiments/{exp_id}/runs/{run_id}", wait_until="commit")
            page.wait_for_function("() => document.body && document.body.innerText.includes('test_top1')",
                                   timeout=180_000, polling=100)
            out["ui run page s"] = round(time.perf_counter() - t0, 2)
        browser.close()
    return out


# -- the jobs' own figures --------------------------------------------------------------------
def _phases(line: str) -> dict[str, float]:
    out = {}
    for part in line.split(", "):
        name, _, value = part.rpartition(" ")
        out[name] = float(value)
    return out


def job_phases(results: Path) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """Each training job's overhead phases, from its submitit logs (the last attempt of each): wall
    seconds, and the CPU seconds of the job's own process (what the phases cost without the waits for a
    core that a machine running more jobs than it has cores adds to the wall time)."""
    walls, cpus = [], []
    for out in sorted(results.rglob("slurm/*/*_0_log.out")):
        text = out.read_text(errors="replace")
        err = out.with_name(out.name.replace("_log.out", "_log.err"))
        errtext = err.read_text(errors="replace") if err.is_file() else ""
        started, imports, seconds = STARTED.findall(text), IMPORTS.findall(text), SECONDS.findall(errtext)
        if not (started and imports and seconds):
            continue  # a job that did not train here (another attempt's log, a failure)
        after, up, up_cpu = started[-1]
        wall = {"queue": max(0.0, float(after) - float(up)), "python": float(up), "imports": float(imports[-1][0]),
                **_phases(seconds[-1])}
        wall["overhead"] = sum(wall.get(k, 0.0) for k in PHASES)
        walls.append(wall)
        cpu_lines = CPU_SECONDS.findall(errtext)
        if up_cpu and imports[-1][1] and cpu_lines:
            cpu = {"python": float(up_cpu), "imports": float(imports[-1][1]), **_phases(cpu_lines[-1])}
            cpu["overhead"] = sum(cpu.get(k, 0.0) for k in PHASES)
            cpus.append(cpu)
    return walls, cpus


def spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 2), "max": round(max(values), 2)} if values else {}


def measure_finished(repo: Path, rel: Path, experiment: str, training: int, env: dict[str, str], url: str,
                     no_ui: bool) -> tuple[dict[str, Any], bool]:
    """3. the jobs' overhead, the store, the commands on the finished grid."""
    tskd = [sys.executable, "-m", "tskd.cli"]
    name = rel.stem
    figures: dict[str, Any] = {}
    ok = True
    rows, cpu_rows = job_phases(repo / "results" / name)
    figures["jobs_with_phases"] = len(rows)
    figures["phases_s"] = {k: spread([r[k] for r in rows if k in r]) for k in (*PHASES, "epochs", "overhead")}
    figures["phases_cpu_s"] = {k: spread([r[k] for r in cpu_rows if k in r])
                               for k in (*PHASES, "epochs", "overhead")}
    # The goal is about the job, not the machine: on fewer cores than jobs in flight the wall time
    # of every phase includes waiting for a core, so the CPU figure is the one compared with it.
    figures["overhead wall median s"] = figures["phases_s"]["overhead"].get("median")
    figures["overhead median s"] = (figures["phases_cpu_s"]["overhead"].get("median")
                                    or figures["overhead wall median s"])
    store = check_store(url, experiment, training)
    figures["store"] = {k: v for k, v in store.items() if k not in ("names", "one_run")}
    ok &= store["ok"]
    r, dt = sh([sys.executable, "-m", "snakemake", "-n", "--profile", "slurm", "--configfile", str(rel)],
               repo, env, check=False)
    figures["snakemake -n s"] = round(dt, 1)
    figures["snakemake -n nothing to do"] = "Nothing to be done" in r.stdout + r.stderr
    ok &= figures["snakemake -n nothing to do"]
    r, dt = sh([*tskd, "status", str(rel)], repo, env, check=False)
    figures["tskd status s"] = round(dt, 1)
    figures["tskd status"] = r.stdout.splitlines()[0] if r.stdout else r.stderr[-300:]
    r, dt = sh([*tskd, "report", str(rel)], repo, env, check=False)
    figures["tskd report s"] = round(dt, 1)
    ok &= r.returncode == 0
    dvc = [sys.executable, "-m", "dvc"]
    pipeline = f"pipelines/{name}/dvc.yaml"
    r, dt = sh([*dvc, "commit", "-f", pipeline], repo, env, check=False)
    figures["dvc commit s"] = round(dt, 1)
    ok &= r.returncode == 0
    r, dt = sh([*dvc, "status", pipeline], repo, env, check=False)
    figures["dvc status s"] = round(dt, 1)
    figures["dvc status clean"] = r.returncode == 0 and "up to date" in r.stdout
    ok &= figures["dvc status clean"]
    r, dt = sh([*dvc, "push", pipeline], repo, env, check=False)
    figures["dvc push s"] = round(dt, 1)
    figures["dvc push ok"] = r.returncode == 0
    ok &= figures["dvc push ok"]
    if not no_ui and store.get("names"):
        try:
            figures.update(time_ui(url, store["experiment_id"], store["names"], store["one_run"]))
        except Exception as e:  # noqa: BLE001 - a page that never shows its rows is a finding, not a crash
            figures["ui error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            ok = False
    return figures, ok


def again(a: argparse.Namespace) -> int:
    """``--again``: step 3 alone, on the grid a previous run of this script finished in ``--workdir``
    (with that copy's code: a change is measured by copying it there first)."""
    from tskd.spec.config import parse_preset
    from tskd.spec.scale_preset import job_counts

    work = Path(a.workdir or "").resolve()
    repo = work / "repo"
    rel = Path("params") / f"{Path(a.preset).stem}_scale.yaml"
    if not a.workdir or not (repo / rel).is_file():
        print(f"bench_scale --again: {repo / rel}: missing; --workdir names the directory of a finished run "
              "of this script", file=sys.stderr)
        return 2
    raw = yaml.safe_load((repo / rel).read_text())
    counts = job_counts(parse_preset(raw, str(repo / rel)))
    env = {**os.environ, "PYTHONPATH": str(repo)}
    senv = None
    if a.tracking_uri:
        url = a.tracking_uri
    else:
        url, senv, _ = start_server(work, env, a.db_name)
    env["MLFLOW_TRACKING_URI"] = url
    try:
        figures, ok = measure_finished(repo, rel, raw["tracking"]["experiment"], counts["teacher"] + counts["student"],
                                       env, url, a.no_ui)
    finally:
        if senv is not None:
            stop_server(senv)
    before = json.loads(Path(a.json).read_text()) if a.json and Path(a.json).is_file() else {}
    out = {**before, **figures, "measured again": time.strftime("%Y-%m-%d %H:%M:%S")}
    if "ui runs table s" in figures:  # the new measurement replaces the old one's failure
        out.pop("ui error", None)
    out["ok"] = bool(ok) and before.get("snakemake_rc", 0) == 0
    out["goals"] = goals(out)
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0 if out["ok"] else 1


def goals(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: {"goal": g, "measured": figures.get(k), "met": (figures.get(k) or 1e9) <= g} for k, g in GOALS.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default=str(REPO / "params/cifar100.yaml"))
    ap.add_argument("--jobs", type=int, default=40, help="Snakemake's --jobs: rules in flight at once")
    ap.add_argument("--pairs", type=int)
    ap.add_argument("--seeds", type=int)
    ap.add_argument("--recipes", type=int)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--mem-gb", type=float, default=0.5, help="memory each SLURM job asks for")
    ap.add_argument("--tracking-uri", help="an MLflow server to log to (default: start slurm/mlflow-server.sh)")
    ap.add_argument("--db-name", default="tskd_mlflow_scale", help="the started server's MariaDB database")
    ap.add_argument("--workdir", help="where the copy of the checkout goes (default: a new temporary directory)")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--no-ui", action="store_true", help="skip the MLflow UI timing (headless Chromium)")
    ap.add_argument("--again", action="store_true",
                    help="measure a finished grid of --workdir again (its store, the commands on it) without "
                         "running it; --json's file, when it exists, keeps the run's figures and takes the new ones")
    a = ap.parse_args(argv)
    if a.again:
        return again(a)
    # Stopped from outside: leave through `finally`, so that the server it started stops too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work = Path(a.workdir or tempfile.mkdtemp(prefix="tskd-scale-")).resolve()
    repo = copy_checkout(work / "repo")
    env = {**os.environ, "PYTHONPATH": str(repo)}  # the rules and the jobs run the copy's tskd
    env.pop("MLFLOW_TRACKING_URI", None)
    tskd = [sys.executable, "-m", "tskd.cli"]
    stamp = time.strftime("%Y%m%d-%H%M%S")

    # 1. the derived grid, its launch settings, its DVC pipeline, a repository
    extra = [f"--{k}={v}" for k in ("pairs", "seeds", "recipes") if (v := getattr(a, k)) is not None]
    name = f"{Path(a.preset).stem}_scale"
    params = repo / "params" / f"{name}.yaml"
    r, _ = sh([*tskd, "scale-preset", str(Path(a.preset).resolve()), "-o", str(params), "--epochs", str(a.epochs),
               *extra], repo, env)
    print(r.stdout.strip(), flush=True)
    raw = yaml.safe_load(params.read_text())
    experiment = f"tskd-{name}-{stamp}"
    raw["tracking"] = {**raw.get("tracking", {}), "experiment": experiment}
    head = params.read_text().splitlines()[0]
    params.write_text(head + "\n" + yaml.safe_dump(raw, sort_keys=False, width=110))
    from tskd.spec.config import parse_preset
    from tskd.spec.scale_preset import job_counts

    counts = job_counts(parse_preset(raw, str(params)))
    training = counts["teacher"] + counts["student"]
    launch = yaml.safe_load((repo / "slurm/launch.yaml").read_text())
    launch["defaults"].update(cpus_per_task=1, mem_gb=a.mem_gb)
    (repo / "slurm/launch.yaml").write_text(yaml.safe_dump(launch, sort_keys=False))
    rel = params.relative_to(repo)
    sh([*tskd, "dvc", "write", str(rel)], repo, env)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    sh(["git", "init", "-q"], repo, env)
    sh([*git, "add", "-A"], repo, env)
    sh([*git, "commit", "-qm", "scale grid"], repo, env)
    (work / "remote").mkdir(exist_ok=True)
    sh([sys.executable, "-m", "dvc", "remote", "add", "-f", "-d", "bench", str(work / "remote")], repo, env)

    senv, pid_file = None, None
    if a.tracking_uri:
        url = a.tracking_uri
    else:
        url, senv, pid_file = start_server(work, env, a.db_name)
        client_env = work / "mlflow" / "client.env"
        if client_env.is_file():  # authentication on: the jobs read the standard client variables
            for m in re.finditer(r"export (MLFLOW_TRACKING_\w+)=(\S+)", client_env.read_text()):
                env[m.group(1)] = m.group(2).strip("'\"")
    env["MLFLOW_TRACKING_URI"] = url
    figures: dict[str, Any] = {"preset": str(a.preset), "derived": name, "jobs": counts, "training_jobs": training,
                               "snakemake_jobs": a.jobs, "experiment": experiment, "tracking": url}
    ok = True
    try:
        # 2. the grid under the profile
        cpu0 = group_cpu_s(pid_file) if pid_file else float("nan")
        probe = Probe(url, experiment)
        probe.start()
        t0 = time.perf_counter()
        snake = subprocess.Popen([sys.executable, "-m", "snakemake", "--profile", "slurm", "--configfile", str(rel),
                                  "--jobs", str(a.jobs)], cwd=repo, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        sampler = Sampler(snake.pid)
        sampler.start()
        log_lines = []
        for line in snake.stdout:
            log_lines.append(line)
            if re.search(r"^\d+ of \d+ steps", line):
                print(f"[{time.perf_counter() - t0:7.0f} s] {line.strip()}", flush=True)
        rc = snake.wait()
        wall = time.perf_counter() - t0
        sampler.stop.set()
        probe.stop.set()
        (work / "snakemake.log").write_text("".join(log_lines))
        figures["snakemake_rc"] = rc
        ok &= rc == 0
        figures["wall_s"] = round(wall, 1)
        figures["jobs_per_min"] = round(sum(counts.values()) / (wall / 60), 1)
        figures["training_jobs_per_min"] = round(training / (wall / 60), 1)
        samples = sampler.samples
        figures["max_in_flight"] = max((s["in_flight"] for s in samples), default=0)
        figures["max_running"] = max((s["running"] for s in samples), default=0)
        figures["max_launchers"] = max((s["launchers"] for s in samples), default=0)
        figures["login_side_at_32"] = memory_at(samples, 32)
        peak = memory_at(samples, figures["max_launchers"])
        figures["login_side_at_peak"] = peak
        if peak:  # 500 in flight: what the waiting launchers would hold, from the measured per-launcher PSS
            figures["login_side_500_estimate_mb"] = round(peak["snakemake_rss_mb"] + 500 * peak["launcher_pss_mb_each"])
        figures["server_cpu_s"] = round(group_cpu_s(pid_file) - cpu0, 1) if pid_file else None
        figures["probe_requests"] = len(probe.times)
        figures["probe_errors"] = probe.errors
        figures["slowest_probe_request_s"] = round(max(probe.times), 2) if probe.times else None

        more, ok_more = measure_finished(repo, rel, experiment, training, env, url, a.no_ui)
        figures.update(more)
        ok &= ok_more
    finally:
        if senv is not None:
            stop_server(senv)
    figures["ok"] = bool(ok)
    figures["goals"] = goals(figures)
    print(json.dumps(figures, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(figures, indent=2) + "\n")
    print(f"bench_scale: workdir {work}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
