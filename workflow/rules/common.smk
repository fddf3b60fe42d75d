# Params validation and the job grid, shared by every rule file.
import functools
import os
import shlex
import sys
from pathlib import Path

from tskd.errors import ParamsError

from tskd.spec.config import canonical_json, parse_preset
from tskd.spec.params_yaml import read_params_yaml
from tskd.workflow.job_spec import write_preset, write_specs
from tskd.spec import grid
from tskd.data.integrity import sha256_file
from tskd.errors import TskdError
from tskd.workflow.dvc_sync import sync_for_snakemake
from tskd.workflow.dvc_pipeline import check_from_dvc_env
from tskd.reporting.report import summary_files
from tskd.launch.warm import Server

_SOURCE = ", ".join(map(str, workflow.configfiles)) or "config"
# tskd's validator is the only one (no JSON-schema `validate`: it would judge types on its own and
# fail with a raw dump naming no file). Snakemake read the files with a YAML loader that keeps the
# last of two equal keys: each file is read again to refuse that, with its line.
try:
    for _file in workflow.configfiles:
        read_params_yaml(_file)
    P = parse_preset(config, source=_SOURCE)
except ParamsError as e:
    sys.exit(f"error: {e}")
# Run by a DVC stage: refuse a dvc.yaml that no longer matches this grid.
try:
    check_from_dvc_env(_SOURCE)
except ParamsError as e:
    sys.exit(f"error: {e}")
# Published teacher files are inputs: a missing one stops the DAG here, before any job runs.
PUBLISHED = {}
for _arch, _t in P.teachers.items():
    try:
        PUBLISHED[_arch] = grid.published_teacher(P, _arch)
    except TskdError as e:
        sys.exit(f"error: {_SOURCE}: {e}")
    if PUBLISHED[_arch] is not None and not PUBLISHED[_arch].is_file():
        sys.exit(f"error: {_SOURCE}: teachers.{_arch}.checkpoint: {PUBLISHED[_arch]} is not a file (a published "
                 "teacher to import: give its path, torchvision:<weights> for torchvision's file in torch's hub "
                 "cache, or null to train this teacher)")
# ImageNet files detection backbones start from are inputs too.
for _arch in P.backbones:
    try:
        _path = grid.backbone_file(P, _arch)
    except TskdError as e:
        sys.exit(f"error: {_SOURCE}: {e}")
    if not _path.is_file():
        sys.exit(f"error: {_SOURCE}: backbones.{_arch}: {_path} is not a file (the ImageNet classifier file the "
                 "backbone starts from: a path, or torchvision:<weights> for torchvision's file in torch's hub cache)")
# After `dvc pull`/`checkout`: restored files carry checkout-time mtimes; fix those dvc.lock vouches for.
sync_for_snakemake(P, config, _SOURCE)

OUT = str(P.out)
# The preset as the jobs read it: a command names this file and its run directory, not its spec.
PRESET_JSON = str(write_preset(config))


wildcard_constraints:
    recipe=r"[^/]+",
    method=r"[^/]+",
    run=r"[^/]+",

# Jobs fork from one process that has imported torch, torchvision and MLflow (tskd.launch.warm):
# most of a small job's time is those imports. Not worth its own imports for a couple of jobs.
WARM = Server()
WARM_MIN_JOBS = 4

# `tskd` from the environment that runs Snakemake, whether or not it is activated.
shell.prefix(f"export PATH={shlex.quote(os.path.dirname(sys.executable))}:\"$PATH\"; ")
DATA_MARKER = str(grid.data_marker(P))
REPORT_MD = f"{OUT}/report.md"
REPORT_HTML = f"{OUT}/report.html"
REPORT_CSV = f"{OUT}/report.csv"


def q(obj):
    """A JSON value quoted for the shell; also what the `params` rerun trigger compares."""
    return shlex.quote(canonical_json(obj))


TEACHER_SPECS = {str(grid.teacher_dir(P, arch)): grid.teacher_spec(P, arch) for arch in P.teachers}
STUDENT_SPECS = {str(grid.student_dir(P, job)): grid.student_spec(P, job) for job in grid.student_jobs(P)}
# Every training job's spec beside the preset file: a rule that submits its job reads it there instead
# of importing torch to compute it (tskd.workflow.job_spec.spec_of_job_light).
write_specs(PRESET_JSON, TEACHER_SPECS | STUDENT_SPECS)


def student_spec(wc):
    return STUDENT_SPECS[f"{OUT}/students/{wc.recipe}/{wc.method}/{wc.run}/seed{wc.seed}"]


def _teacher_spec(wc):
    return TEACHER_SPECS[f"{OUT}/teachers/{wc.arch}/seed{wc.tseed}"]


# A run's identity, what decides its result, is a param: Snakemake reruns the job when it changes.
# The job itself reads its whole spec from the preset file (PRESET_JSON) and its run directory,
# which reach it as params that are functions of `output`: Snakemake counts those as derived from
# the files and leaves them out of its params trigger, so renaming the experiment reruns nothing.
# (A spec on the command line was kilobytes of JSON, printed twice whenever a job failed.)
def identity(spec):
    return q(spec.identity())


def job_dir(output):
    """A training or evaluation job's run directory (the directory of its model.pt)."""
    return shlex.quote(os.path.dirname(output[0]))


def _published(wc):
    """The published file a teacher is imported from ([] when the teacher is trained)."""
    path = PUBLISHED[wc.arch]
    return [str(path)] if path else []


@functools.cache
def _sha256(path):
    return sha256_file(path)


def _teacher_source(wc):
    # The file's content, not only its mtime: a file replaced by one with an older mtime (cp -p,
    # rsync -a, a checkout) reruns the import too.
    return [_sha256(path) for path in _published(wc)]


def _teacher_cmd(wc):
    published = _published(wc)
    return f"import-teacher --checkpoint {shlex.quote(published[0])}" if published else "train"


def _student_inputs(wc):
    spec = student_spec(wc)
    return [DATA_MARKER] + ([spec.teacher_path] if spec.teacher_path else []) + _backbone(spec)


def _backbone(spec):
    """The ImageNet file a detector's backbone starts from ([] when it trains from scratch)."""
    return [spec.backbone_path] if spec.backbone_path else []


def backbone_source(spec):
    # Its content: a replaced file reruns the job even with an older mtime.
    return [_sha256(path) for path in _backbone(spec)]


REPORT_KEY = q(grid.report_identity(P))


def _report_inputs(wc):
    files = [f"{d}/metrics.json" for d in TEACHER_SPECS]
    files += [f"{d}/{name}" for d in STUDENT_SPECS for name in ("metrics.json", "eval.json")]
    return files
