"""How long a training job's MLflow start takes when N jobs start at once on one SQLite store.

Each of N processes starts its run's tracker (``TrackingObserver.on_run_start``, tskd.tracking.observer:
begin the run's journal and apply it: import MLflow, open the store, find the experiment and the
group's parent, create the run, log its params) at the same moment; the time is taken around that
call only (torch and tskd are imported before, and the run's data and networks are not built: the
tracker reads only their names and sizes). Two cases:

* ``prepared``: the store was set up first, as the DAG's onstart does (``prepare_store``);
* ``cold``: nothing exists yet; the first jobs create the schema and the experiment under a lock.

    python benchmarks/bench_tracking_start.py [--jobs 8] [--code DIR]

Wall time is what a job waits; on a machine with fewer cores than jobs it includes waiting for a
core (MLflow's import is most of the CPU work), so the CPU time is printed too.

``--code`` runs the jobs with another checkout's tskd (e.g. the main branch, for a before/after); it
must have ``tskd.tracking.observer``. One that lacks ``prepare_store`` measures ``cold`` only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, sys, time
from pathlib import Path
from types import SimpleNamespace
from tskd.engine.distributed import SINGLE
from tskd.engine.events import RunView
from tskd.spec.grid import RunSpec
from tskd.tracking.observer import TrackingObserver
spec = RunSpec.model_validate_json(sys.argv[1])
out = Path(spec.out_dir)
out.mkdir(parents=True, exist_ok=True)
# What the tracker reads of a run's data: its name, identity and sizes (nothing else is built).
data = SimpleNamespace(name=spec.dataset.name, identity="bench", train=range(64), test=range(32), val=None)
view = RunView(spec=spec, out=out, key="bench", identity=spec.identity(), tags={}, data=data, task=None,
               world=SINGLE, runtime=None, distiller=None)
sys.stdin.readline()  # every job waits here, then all start at once
t0, c0 = time.perf_counter(), time.process_time()
TrackingObserver().on_run_start(view)
print(json.dumps({"tracker_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}))
"""


def measure(specs, code: Path, workdir: Path) -> list[dict[str, float]]:
    env = {**os.environ, "PYTHONPATH": str(code), "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, s.model_dump_json()], cwd=code, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for s in specs]
    import time

    time.sleep(20)  # every child has imported torch and tskd and waits on stdin
    for p in procs:
        p.stdin.write("\n")
        p.stdin.flush()
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=600)
        assert p.returncode == 0, stdout
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--code", type=Path, default=REPO, help="checkout whose tskd the jobs run")
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from tskd.spec.config import load_preset
    from tskd.tracking.runs import grid_specs

    with tempfile.TemporaryDirectory() as tmp:
        p = load_preset(REPO / "params/smoke.yaml").model_copy(update={"results_dir": f"{tmp}/results"})
        specs = grid_specs(p)[: a.jobs]
        cases = ["cold"]
        if (a.code / "tskd/tracking/runs.py").is_file():
            cases.append("prepared")
        for case in cases:
            work = Path(tmp) / case
            work.mkdir()
            if case == "prepared":
                os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
                from tskd.tracking.runs import prepare_store

                prepare_store(p)
            res = measure(specs, a.code, work)
            times, cpu = [r["tracker_s"] for r in res], [r["cpu_s"] for r in res]
            # Wall time includes waiting for the lock and for a core; CPU time is the work itself.
            print(f"{case:9s} {len(specs)} jobs at once ({a.code}): tracker start wall median "
                  f"{statistics.median(times):.2f} s, max {max(times):.2f} s (all "
                  + " ".join(f"{t:.2f}" for t in sorted(times)) + f"); CPU median {statistics.median(cpu):.2f} s")


if __name__ == "__main__":
    main()
