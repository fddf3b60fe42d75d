"""How long DVC and Snakemake take to decide what to run on the cifar100 preset's grid.

No dataset and no training: in a git copy of the repo, the cifar100 pipeline is generated and
timed twice, first with nothing built (the dry runs a user makes before starting), then with
every output present as a small placeholder recorded by `dvc commit` (what a finished grid
costs to check). Last, the mtimes are shuffled as a `dvc pull` leaves them and `snakemake -n`
is timed with the dvc.lock comparison that repairs them.

    python benchmarks/bench_dvc.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PARAMS = "params/cifar100.yaml"
PIPELINE = "pipelines/cifar100/dvc.yaml"


def run(cwd: Path, *cmd: str) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    t0 = time.perf_counter()
    r = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, env=env)
    return time.perf_counter() - t0, r


def timed(cwd: Path, repeat: int, *cmd: str, ok=(0,)) -> float:
    times = []
    for _ in range(repeat):
        dt, r = run(cwd, *cmd)
        if r.returncode not in ok:
            sys.exit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        times.append(dt)
    print(f"  ({' '.join(cmd)}: {', '.join(f'{t:.2f}' for t in times)} s)", flush=True)
    return statistics.median(times)


def setup(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file() and f not in ("dvc.lock",):
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f)
    for cmd in (["git", "init", "-q"], ["tskd", "dvc", "write", PARAMS], ["git", "add", "-A"],
                ["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "bench"]):
        _, r = run(dest, *cmd)
        assert r.returncode == 0, r.stderr


def fabricate_outputs(dest: Path) -> int:
    """Every output of every stage as a small file, in DAG order (increasing mtimes)."""
    from tskd.workflow.dvc_pipeline import load_raw, stages

    p, raw = load_raw(dest / PARAMS)
    (dest / p.dataset.root).mkdir(parents=True, exist_ok=True)
    (dest / p.dataset.root / "placeholder").write_text("not a dataset\n")
    t = time.time() - 10_000
    all_stages = stages(p, raw, PARAMS)
    for i, s in enumerate(all_stages):
        for f in dict.fromkeys(s.outs + s.targets):
            path = dest / f
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{s.name} {f}\n")
            os.utime(path, (t + i, t + i))
    return len(all_stages)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp)
        setup(dest)
        smk = ["snakemake", "-n", "--cores", "1", "--configfile", PARAMS]
        rows.append(("snakemake -n, nothing built", timed(dest, a.repeat, *smk)))
        rows.append(("dvc status, nothing built", timed(dest, a.repeat, "dvc", "status", PIPELINE)))
        n = fabricate_outputs(dest)
        _, r = run(dest, "dvc", "commit", "-f", PIPELINE)
        assert r.returncode == 0, r.stderr[-2000:]
        rows.append(("dvc status, all current", timed(dest, a.repeat, "dvc", "status", PIPELINE)))
        rows.append(("dvc repro (no-op), all current", timed(dest, a.repeat, "dvc", "repro", PIPELINE)))
        rows.append(("snakemake -n, all current", timed(dest, a.repeat, *smk)))
        from tskd.workflow.dvc_pipeline import load_raw, stages

        p, raw = load_raw(dest / PARAMS)
        files = [dest / f for s in stages(p, raw, PARAMS) for f in s.targets]
        shuffled = []
        for _ in range(a.repeat):  # each repeat starts from a fresh shuffle, as after a pull
            now = time.time()
            for f in files:
                t = now - random.uniform(0, 100)
                os.utime(f, (t, t))
            shuffled.append(timed(dest, 1, *smk))
        rows.append(("snakemake -n after a pull (mtimes repaired)", statistics.median(shuffled)))
        _, r = run(dest, *smk)
        assert "Nothing to be done" in r.stdout + r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
    print(f"cifar100 grid: {n} stages (+ params-check); median of {a.repeat}")
    for name, t in rows:
        print(f"  {name:45s} {t:6.2f} s")


if __name__ == "__main__":
    main()
