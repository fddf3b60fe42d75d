"""What each TSKD variant of the ablation study costs, relative to KD: its review step, its whole
run (the schedule's review epochs and snapshots), its peak memory at review; and the whole
study's cost in KD runs.

The variants are the TSKD entries of a preset (default ``params/ablations.yaml``: k and δ, the
target, the sequence, the forecaster, the review weight), each timed on the preset's first pair
with random inputs in interleaved rounds against KD, as ``bench_methods.py`` times methods (its
``Bench``). k changes the review step (k snapshot forwards, k ConvLSTM steps); δ only changes how
many epochs review, so it shows in the whole-run ratio. ``--plot FILE.png`` draws these as curves
(review step and peak memory ÷ KD against k, whole run ÷ KD against δ, through the entries that change
that param alone) with the study's own drawing (``tskd.reporting.plots.study.cost_figure``). Not a test:

    .venv/bin/python benchmarks/bench_ablations.py [--preset params/ablations.yaml] [--batch 128] [--steps 6] \
        [--plot cost.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_methods as bm  # noqa: E402  (a sibling script, not a package)

from tskd.distill.tskd.schedule import summarize_schedule  # noqa: E402
from tskd.reporting.plots.curves import save  # noqa: E402
from tskd.reporting.plots.study import CostPanel, cost_figure  # noqa: E402
from tskd.reporting.study import BASELINE, varied_only_in  # noqa: E402
from tskd.spec.config import VARIANT_KEY, load_preset  # noqa: E402


def variants(preset_path: str) -> tuple[dict[str, dict], object]:
    """The preset's TSKD entries (the default ``tskd`` first) with their params, and the preset."""
    p = load_preset(preset_path)
    out = {}
    for name, values in p.methods.items():
        if name == "tskd" or values.get(VARIANT_KEY) == "tskd":
            # Eager kernels: torch.compile's one-off compile would dominate a short benchmark.
            out[name] = {k: v for k, v in values.items() if k not in (VARIANT_KEY, "compile")}
    return out, p


def plot(path: Path, title: str, label: str, measured: dict[str, dict]) -> None:
    """The measured ratios as the study's cost curves: ``measured`` maps an entry to its effective
    params and its ratios (``review``, ``whole``, ``memory``: None when not measured)."""
    params = {name: m["params"] for name, m in measured.items()}
    axes = [("k", "review step ÷ KD's", "review"), ("delta", "whole run ÷ KD's (from the steps)", "whole")]
    if all(m["memory"] is not None for m in measured.values()):
        axes.append(("k", "peak memory at review ÷ KD's", "memory"))
    panels = []
    for key, ylabel, ratio in axes:
        names = varied_only_in(params, key, BASELINE)
        shown = "δ" if key == "delta" else key
        panels.append(CostPanel(shown, ylabel, {label: [(params[n][key], measured[n][ratio]) for n in names]},
                                f"the preset varies only {shown} from {BASELINE} in fewer than two entries"))
    save(cost_figure(title, panels), path)
    print(f"\nwrote {path}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="params/ablations.yaml")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--plot", type=Path, help="also draw the ratios against k and δ into this PNG")
    ours = ap.parse_args(argv)
    found, p = variants(ours.preset)
    pair = p.pairs[0]
    recipe = p.recipes[p.student_recipes[0]]
    args = bm.parse_args(["--teacher", pair.teacher, "--student", pair.student, "--batch", str(ours.batch),
                          "--threads", str(ours.threads), "--epochs", str(recipe.epochs)])
    bm.torch.set_num_threads(ours.threads)
    kd = bm.Bench("kd", args)
    cases = {}
    for name, params in found.items():
        b = bm.Bench("tskd", args, params)
        review = bm.first_review_epoch(b.d)
        snapshot_s = b.fill_memory(review)  # seconds per snapshot, taken once per memory epoch
        b.d.on_epoch_start(review)
        cases[name] = (b, review, params, snapshot_s)
    times: dict[str, list[float]] = {"kd": [], **{n: [] for n in cases}}
    for i in range(ours.warmup + ours.steps):
        order = [("kd", kd, 1), *((n, b, e) for n, (b, e, _, _) in cases.items())]
        for name, b, epoch in order if i % 2 == 0 else order[::-1]:
            t = b.step(epoch)
            if i >= ours.warmup:
                times[name].append(t)
    synthetic = getattr(p.dataset, "synthetic", None)
    steps = -(-(synthetic.train_per_class * 100 if synthetic else 50_000) // recipe.batch_size)
    mem_kd = None if ours.no_memory else bm.peak_memory("kd", "general", args)
    print(f"{pair.teacher} -> {pair.student}, batch {ours.batch}, CPU, {ours.threads} threads, {recipe.epochs} "
          f"epochs; {ours.steps} interleaved rounds. Ratios: median over rounds of step / the same round's KD step.")
    print(f"\n{'variant':<18}{'k':>3}{'δ':>4}{'reviews':>9}{'review step ÷ KD':>18}{'whole run ÷ KD':>16}"
          f"{'peak memory ÷ KD':>18}")
    study = 0.0
    kd_step = statistics.median(times["kd"])
    measured = {}
    for name, (b, _, params, snapshot_s) in cases.items():
        d = b.d.params
        review = statistics.median(t / k for t, k in zip(times[name], times["kd"], strict=True))
        counts = summarize_schedule(recipe.epochs, d.delta, d.k).counts
        # General and memory epochs run KD's ops; a memory epoch adds one snapshot.
        whole = (counts["general"] + counts["memory"] + counts["review"] * review) / recipe.epochs
        whole += counts["memory"] * snapshot_s / kd_step / (recipe.epochs * steps)
        mem = None
        if mem_kd:
            args_v = bm.parse_args(["--teacher", pair.teacher, "--student", pair.student,
                                    "--batch", str(ours.batch), "--threads", str(ours.threads),
                                    "--epochs", str(recipe.epochs), "--tskd", json.dumps(params)])
            mem = bm.peak_memory("tskd", "review", args_v) / mem_kd
        study += whole * len(p.seeds)
        measured[name] = {"params": d.model_dump(mode="json"), "review": review, "whole": whole, "memory": mem}
        print(f"{name:<18}{d.k:>3}{d.delta:>4}{counts['review']:>9}{review:>18.2f}{whole:>16.3f}"
              f"{'' if mem is None else f'{mem:.2f}':>18}")
    kd_runs = len(p.seeds) * (1 + study / len(p.seeds))  # the KD rows, plus every TSKD entry
    print(f"\nthe study ({len(cases)} TSKD entries and KD, {len(p.seeds)} seeds each, one pair): "
          f"{kd_runs:.1f} KD runs of {recipe.epochs} epochs")
    if ours.plot:
        plot(ours.plot, f"{p.preset}: TSKD entries ÷ KD, benchmarked (batch {ours.batch}, {ours.steps} rounds)",
             f"{pair.teacher} → {pair.student}", measured)


if __name__ == "__main__":
    main()
