"""`tskd <verb>`: parse arguments, then call one function. Errors exit non-zero with a message."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from pydantic import ValidationError

from tskd.data.prepare import prepare_dataset
from tskd.errors import ParamsError, TskdError
from tskd.io import atomic_write_text
from tskd.spec.config import DatasetCfg, format_validation_error, load_preset, parse_preset
from tskd.spec.grid import RunSpec, merge_parts, student_jobs
from tskd.spec.params_yaml import DuplicateKeyError, loads_json, read_params_yaml, validate_strict
from tskd.spec.scale_preset import derive, job_counts
from tskd.spec.schema import write_schema
from tskd.tracking.journal import grid_dirs, sync_dirs
from tskd.workflow.dvc_verify import remove_corrupt, verify
from tskd.workflow.job_spec import spec_of_job, spec_of_job_light
from tskd.workflow.joblog import one_line, redirect_to_log
from tskd.workflow.status import format_status, preset_status, watch


class UsageError(TskdError):
    """A command line that cannot work, or a check that found problems (listed above it)."""


def _parse(model, data, source: str):
    try:
        return validate_strict(model, data)
    except ValidationError as e:
        raise ParamsError(format_validation_error(e, source)) from None


def _json(text: str, source: str):
    try:
        return loads_json(text)
    except (json.JSONDecodeError, DuplicateKeyError) as e:
        raise ParamsError(f"{source}: not valid JSON: {e}") from None


def _spec(a):
    """The run spec: ``--spec`` (a whole spec, or its identity) with ``--place`` (its placement)."""
    if getattr(a, "job", None) or getattr(a, "preset", None):
        if not (a.job and a.preset) or a.spec:
            raise UsageError("give --preset FILE and --job DIR together, or --spec (and --place)")

        return spec_of_job(a.preset, a.job)
    if not a.spec:
        raise UsageError("give --spec (and --place), or --preset FILE and --job DIR")
    data = _json(a.spec, "--spec")
    if getattr(a, "place", None):
        data = merge_parts(data, _json(a.place, "--place"))
    return _parse(RunSpec, data, "--spec/--place")


def _launch_settings(a, spec):
    """The rule's launch settings from ``--launch FILE`` (rule: ``--launch-rule``, else the role);
    None (this process) without a file. Snakemake passes an empty ``--launch=`` for local runs."""
    if not a.launch:
        return None
    from tskd.launch import load_settings  # lazy: submitit

    return load_settings(a.launch, a.launch_rule or spec.role)


def _launched_spec(a):
    """The spec, with its task's main figure (name, label), for ``train``/``import-teacher``."""
    if a.launch and a.job and a.preset and not a.spec:
        # Submitted (SLURM, local): this process only waits, so it never imports torch (tskd.workflow.job_spec).

        spec, figure = spec_of_job_light(a.preset, a.job)
        return spec, figure["best"], figure["label"]
    from tskd.tasks import task_of  # lazy: torch

    spec = _spec(a)
    task = task_of(spec.dataset.name)
    return spec, task.best, task.labels[task.best]


def cmd_train(a) -> None:
    from tskd.launch import launch  # lazy: submitit

    spec, best, label = _launched_spec(a)
    m = launch(spec, _launch_settings(a, spec), "train", track=not a.no_track)
    print(f"{m['method']} {m['student']}: best {label} {m[f'best_{best}']:.2f} (epoch {m['best_epoch']}), "
          f"last {m[f'last_{best}']:.2f}")


def cmd_evaluate(a) -> None:
    from tskd.engine.eval_run import evaluate_model_file  # lazy: torch

    res = evaluate_model_file(_spec(a), Path(a.model), Path(a.out))
    print(f"{a.model}: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items() if isinstance(v, float)))


def cmd_import_teacher(a) -> None:
    from tskd.launch import launch  # lazy: submitit

    spec, best, label = _launched_spec(a)
    res = launch(spec, _launch_settings(a, spec), "import-teacher", checkpoint=str(Path(a.checkpoint)))
    print(f"imported {a.checkpoint} as {res['student']}: {label} {res[f'last_{best}']:.2f}")


def cmd_data_synth(a) -> None:
    from tskd.data.synthetic import write_synthetic_cifar100  # lazy: numpy

    path = write_synthetic_cifar100(Path(a.root), seed=a.seed, train_per_class=a.train_per_class,
                                    test_per_class=a.test_per_class)
    print(f"wrote {path}")


def cmd_data_register(a) -> None:
    from tskd.data.cifar import register_cifar100_layout  # lazy: torch

    info = register_cifar100_layout(Path(a.root), a.name)
    print(f"registered {info['folder']} as {info['registered_as']!r}: {info['classes']} classes, "
          f"{info['train']} train / {info['test']} test images; its manifest now records every file's sha256")


def cmd_data_prepare(a) -> None:
    from pydantic import TypeAdapter

    try:
        ds = TypeAdapter(DatasetCfg).validate_python(_json(a.dataset, "--dataset").get("dataset"))
    except ValidationError as e:
        raise ParamsError(format_validation_error(e, "--dataset")) from None
    info = prepare_dataset(ds, Path(a.marker))
    print(f"dataset ready: {info}")


def cmd_report(a) -> None:
    from tskd.reporting.publish import summarize_after_report  # lazy: torch
    from tskd.reporting.report import collect_rows, write_report  # lazy: torch
    from tskd.reporting.report_paired import comparisons, parent_metrics  # lazy: torch

    given = [x for x in (a.params, a.json, a.json_file) if x is not None]
    if len(given) != 1:
        raise UsageError("give one of: a params file, --json, --json-file")
    if a.params:
        preset = load_preset(a.params)
    elif a.json is not None:
        preset = parse_preset(_json(a.json, "--json"), "--json")
    else:
        try:
            text = Path(a.json_file).read_text()
        except OSError as e:
            raise UsageError(f"--json-file {a.json_file}: cannot read it ({e.strerror})") from None
        preset = parse_preset(_json(text, a.json_file), a.json_file)
    md = write_report(preset)
    # MLflow: each parent run gets its seeds' mean ± std and its paired comparisons
    summarize_after_report(preset, parent_metrics(comparisons(preset, collect_rows(preset))))
    print(md.read_text() if a.print else f"wrote {md}")


def cmd_sync(a) -> None:
    dirs = [Path(d) for d in a.dirs] if a.dirs else grid_dirs(load_preset(a.params))
    missing = [str(d) for d in (a.dirs or []) if not Path(d).is_dir()]
    if missing:
        raise UsageError(f"--dirs: not a run directory: {', '.join(missing)}")
    n = sync_dirs(dirs)
    print(f"MLflow: {n['applied']} records of {n['runs']} runs logged; {n['pending']} still wait (the store did "
          f"not answer)" + (f"; {n['live']} runs left to the jobs writing them" if n["live"] else ""))
    if n["pending"]:
        raise UsageError(f"{n['pending']} records could not be logged; run `tskd sync` again once MLflow answers "
                         "(MLFLOW_TRACKING_URI)")


def cmd_models(a) -> None:
    from tskd.models.summary import format_model_table, model_table  # lazy: torch

    print(format_model_table(model_table(a.family)))


def cmd_methods(a) -> None:
    from tskd.distill import list_methods, method_class  # lazy: torch
    from tskd.tasks import TASKS  # lazy: torch

    for task in TASKS:
        names = list_methods(task)
        if names:
            print(f"# {task}")
        for name in names:
            fields = method_class(name, task).Params.model_fields
            print(f"{name:10s} " + ", ".join(f"{k}={v.default!r}" for k, v in fields.items()))


def cmd_check(a) -> None:
    p = load_preset(a.params)
    print(f"{a.params}: ok ({len(p.teachers)} teachers, {len(student_jobs(p))} student runs)")
    # Real data may arrive after the check (dvc pull, a copy): a warning, not an error. A synthetic
    # preset writes its own data; `download: true` fetches the official release into the root.
    root = p.dataset.root
    if p.dataset.synthetic is None and not getattr(p.dataset, "download", False) and root is not None:
        path = Path(root).expanduser()
        if not path.exists():
            import textwrap

            lines = [f"{a.params}: warning: dataset.root: {root} does not exist"]
            if not path.is_absolute():
                lines.append(f"  ({Path.cwd() / path}: relative to the current directory)")
            lines += textwrap.wrap(f"Before the runs start it must hold {p.dataset.holds}.", 96,
                                   initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False)
            lines += ["  `dvc pull` it if it is versioned with DVC, or put the files there (docs/data.md)."]
            print("\n".join(lines), file=sys.stderr)


def cmd_scale_preset(a) -> None:
    import yaml

    raw = derive(read_params_yaml(a.params), epochs=a.epochs, per_class=a.per_class, pairs=a.pairs,
                 seeds=a.seeds, recipes=a.recipes, name=a.name)
    out = Path(a.out) if a.out else Path(a.params).with_name(f"{raw['preset']}.yaml")
    head = (f"# {raw['preset']}: derived from {a.params} by `tskd scale-preset` (synthetic data, "
            f"{a.epochs} epochs a job): its grid at full shape and tiny cost. Derive it again instead of editing it.\n")
    atomic_write_text(out, head + yaml.safe_dump(raw, sort_keys=False, width=110))
    counts = job_counts(parse_preset(raw, str(out)))
    print(f"{out}: {sum(counts.values())} jobs (" + ", ".join(f"{v} {k}" for k, v in counts.items()) + ")")


def cmd_status(a) -> None:
    p = load_preset(a.params)
    if a.watch:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the watch, not with a traceback
            watch(p, a.watch, sys.stdout)
        return
    print(format_status(preset_status(p)))


def cmd_schema(a) -> None:
    print(f"wrote {write_schema(Path(a.out))}")


def cmd_dvc_write(a) -> None:
    from tskd.workflow.dvc_pipeline import write_pipeline  # lazy: torch

    if a.out and len(a.params) != 1:
        raise UsageError("--out needs exactly one params file")
    for params in a.params:
        print(f"wrote {write_pipeline(params, Path(a.out) if a.out else None)} from {params}")


def cmd_dvc_check(a) -> None:
    from tskd.workflow.dvc_pipeline import check_pipeline, pipeline_path  # lazy: torch

    path = Path(a.pipeline) if a.pipeline else pipeline_path(load_preset(a.params))
    check_pipeline(a.params, path)
    print(f"{path}: up to date with {a.params}")


def cmd_dvc_verify(a) -> None:
    problems = verify(Path("."), workspace=not a.cache_only)
    if not problems:
        print("DVC cache and outputs match the lock files")
        return
    for pr in problems:
        print(pr, file=sys.stderr)
    if a.remove_corrupt:
        for obj in remove_corrupt(problems):
            print(f"removed {obj}; `dvc pull` or `dvc repro` restores it", file=sys.stderr)
    raise UsageError(f"{len(problems)} problem(s) above; corrupt cache files can be removed with "
                       "`tskd dvc verify --remove-corrupt`, outputs that differ rebuilt with `dvc repro`")


def cmd_dvc_sync(a) -> None:
    from tskd.workflow.dvc_pipeline import load_raw  # lazy: torch
    from tskd.workflow.dvc_sync import sync  # lazy: torch

    p, raw = load_raw(a.params)
    synced = sync(p, raw, a.params)
    print(f"Snakemake now records {len(synced)} stages that dvc.lock shows current" + (
        f": {', '.join(synced[:8])}{' ...' if len(synced) > 8 else ''}" if synced else ""))


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", help="run spec as JSON (see tskd.spec.grid.RunSpec): the whole spec, or its identity "
                   "with --place")
    p.add_argument("--place", default=None, help="the spec's placement as JSON (output dir, MLflow experiment, "
                   "labels, paths: tskd.spec.grid.PLACEMENT), merged into --spec")
    p.add_argument("--preset", default=None, metavar="FILE", help="instead of --spec: the preset as JSON (what the "
                   "workflow writes under .snakemake/tskd/), with --job")
    p.add_argument("--job", default=None, metavar="DIR", help="with --preset: the run directory of the teacher or "
                   "student job (results/<preset>/teachers/<arch>/seed<k>, ...)")


def _launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--launch", default="", metavar="FILE",
                   help="launch settings (slurm/launch.yaml): run as a SLURM or local submitit job and wait")
    p.add_argument("--launch-rule", default=None, metavar="NAME",
                   help="which `rules:` entry of the launch file applies (default: the spec's role)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tskd", description="Temporal Supervised Knowledge Distillation pipeline")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--log", metavar="FILE", help="write all output to FILE (created or replaced); on failure, "
                    "also print one line to the terminal: the reason and FILE (what the workflow's rules use)")
    sub = ap.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("train", help="train one teacher or student run (spec as JSON)")
    _spec_args(p)
    p.add_argument("--no-track", action="store_true", help="do not record an MLflow run")
    _launch_args(p)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate an exported model file on the test set")
    _spec_args(p)
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True, help="eval.json to write")
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("import-teacher", help="import a published CRD/mdistiller teacher file")
    _spec_args(p)
    p.add_argument("--checkpoint", required=True)
    _launch_args(p)
    p.set_defaults(fn=cmd_import_teacher)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_verb", required=True)
    p = data.add_parser("synth", help="write a synthetic CIFAR-100 in the real on-disk format")
    p.add_argument("--root", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-per-class", type=int, default=20)
    p.add_argument("--test-per-class", type=int, default=10)
    p.set_defaults(fn=cmd_data_synth)
    p = data.add_parser("register", help="record your own data in a supported layout (cifar-100-python) "
                        "under a name: writes its integrity manifest")
    p.add_argument("root", help="the directory holding cifar-100-python/ (the preset's dataset.root)")
    p.add_argument("--name", required=True, help="the data's own name, shown in MLflow tags and the report")
    p.set_defaults(fn=cmd_data_register)
    p = data.add_parser("prepare", help="write (synthetic) or verify (real) a preset's dataset")
    p.add_argument("--dataset", required=True, help='JSON {"dataset": {...}} (the dataset params)')
    p.add_argument("--marker", required=True, help="dataset.json written once the data is verified")
    p.set_defaults(fn=cmd_data_prepare)

    p = sub.add_parser("report", help="results table (report.md, report.csv) of a preset")
    p.add_argument("params", nargs="?", help="params/<preset>.yaml")
    p.add_argument("--json", help="the preset's params as JSON")
    p.add_argument("--json-file", help="a file of the preset's params as JSON (what the workflow passes)")
    p.add_argument("--print", action="store_true")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("sync", help="log to MLflow what finished or stopped runs recorded while it could not be "
                       "reached (each run directory's tracking/ journal)")
    p.add_argument("params", nargs="?", default="params/smoke.yaml", help="params/<preset>.yaml: its grid's runs")
    p.add_argument("--dirs", nargs="+", metavar="DIR", help="these run directories instead of a preset's")
    p.set_defaults(fn=cmd_sync)

    p = sub.add_parser("models", help="list registered architectures with parameter counts")
    p.add_argument("--family", default=None)
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser("methods", help="list distillation methods and their default params")
    p.set_defaults(fn=cmd_methods)

    p = sub.add_parser("check", help="validate a params file")
    p.add_argument("params")
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser("scale-preset", help="derive a preset's grid at its real shape (architectures, methods, "
                       "seeds, job count) on synthetic data and a few epochs: a rehearsal of a cluster run")
    p.add_argument("params", help="params/<preset>.yaml")
    p.add_argument("-o", "--out", help="where to write it [params/<preset>_scale.yaml beside the preset]")
    p.add_argument("--epochs", type=int, default=2, help="epochs of every job (TSKD's get enough for a review)")
    p.add_argument("--per-class", type=int, default=None, help="synthetic images per class (COCO: images) "
                   "[one batch of the largest recipe]")
    p.add_argument("--pairs", type=int, default=None, metavar="N", help="keep the first N pairs (a reduced grid)")
    p.add_argument("--seeds", type=int, default=None, metavar="N", help="keep the first N seeds")
    p.add_argument("--recipes", type=int, default=None, metavar="N", help="keep the first N student recipes")
    p.add_argument("--name", default=None, help="the derived preset's name [<preset>_scale]")
    p.set_defaults(fn=cmd_scale_preset)

    p = sub.add_parser("status", help="each training job of a preset: done, running (epoch n/N, ETA), failed "
                       "(why), waiting; read from its files, while Snakemake or SLURM runs it")
    p.add_argument("params", nargs="?", default="params/smoke.yaml", help="params/<preset>.yaml")
    p.add_argument("--watch", type=float, default=None, metavar="SECONDS",
                   help="redraw every SECONDS until every job is done or failed")
    p.set_defaults(fn=cmd_status)

    dvc = sub.add_parser("dvc", help="the DVC pipeline generated from the grid").add_subparsers(
        dest="dvc_verb", required=True)
    p = dvc.add_parser("write", help="write dvc.yaml (smoke) or pipelines/<preset>/dvc.yaml from params")
    p.add_argument("params", nargs="+", help="params/<preset>.yaml")
    p.add_argument("--out", help="pipeline file to write instead of the default place")
    p.set_defaults(fn=cmd_dvc_write)
    p = dvc.add_parser("check", help="fail when a pipeline file is out of date with its params")
    p.add_argument("params")
    p.add_argument("--pipeline", help="the dvc.yaml to check (default: where `tskd dvc write` puts it)")
    p.set_defaults(fn=cmd_dvc_check)
    p = dvc.add_parser("verify", help="re-hash the DVC cache and outputs against the lock files")
    p.add_argument("--cache-only", action="store_true", help="do not compare workspace outputs")
    p.add_argument("--remove-corrupt", action="store_true", help="delete corrupt cache files")
    p.set_defaults(fn=cmd_dvc_verify)
    p = dvc.add_parser("sync", help="after `dvc pull`/`checkout`: Snakemake records what dvc.lock shows current")
    p.add_argument("params")
    p.set_defaults(fn=cmd_dvc_sync)

    p = sub.add_parser("schema", help="write the JSON schema of the params")
    p.add_argument("--out", default="workflow/schemas/params.schema.json")
    p.set_defaults(fn=cmd_schema)
    return ap


def main(argv: list[str] | None = None) -> int:
    if argv is None and os.environ.get("TSKD_WARM_SOCKET"):
        # A workflow job: a child of the warm server runs it, without importing torch again.
        from tskd.launch.warm import forward

        code = forward("tskd.cli:main", sys.argv[1:])
        if code is not None:
            return code
    a = build_parser().parse_args(argv)
    # --log (the workflow's rules): the log gets everything, the terminal one line if the job fails.
    with redirect_to_log(a.log) as terminal:
        logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        try:
            a.fn(a)
        except TskdError as e:
            # Expected failures (bad params, data, files, checkpoints, a diverged loss): the message
            # says it all. Anything else is raised with its traceback. -v shows it for these too.
            if a.verbose and not a.log:
                raise
            if a.verbose:
                traceback.print_exc()
            print(f"tskd {a.verb}: error: {e}", file=sys.stderr)
            if a.log:
                print(f"tskd {a.verb}: error: {one_line(e)} (log: {a.log})", file=terminal)
            return 2
        except Exception as e:
            if not a.log:
                raise
            traceback.print_exc()  # into the log, where a CUDA or shape error keeps its traceback
            print(f"tskd {a.verb}: failed: {type(e).__name__}: {one_line(e)}", file=sys.stderr)  # for tskd status
            print(f"tskd {a.verb}: failed: {type(e).__name__}: {one_line(e)} (traceback in {a.log})", file=terminal)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
