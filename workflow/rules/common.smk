# Params validation and the job grid, shared by every rule file.
import os
import shlex
import sys

from snakemake.utils import validate

from tskd.config import ParamsError, canonical_json, parse_preset
from tskd import grid
from tskd.dvc_sync import sync_for_snakemake
from tskd.dvc_pipeline import check_from_dvc_env
from tskd.report import summary_files

_SOURCE = ", ".join(map(str, workflow.configfiles)) or "config"
# The typed params first: their messages name the file, the key and what is allowed.
try:
    P = parse_preset(config, source=_SOURCE)
except ParamsError as e:
    sys.exit(f"error: {e}")
# The generated JSON schema must agree (set_default=False: pydantic owns the defaults).
validate(config, "../schemas/params.schema.json", set_default=False)
# Run by a DVC stage: refuse a dvc.yaml that no longer matches this grid.
try:
    check_from_dvc_env(_SOURCE)
except ParamsError as e:
    sys.exit(f"error: {e}")
# After `dvc pull`/`checkout`: restored files carry checkout-time mtimes; fix those dvc.lock vouches for.
sync_for_snakemake(P, config, _SOURCE)

OUT = str(P.out)
# `tskd` from the environment that runs Snakemake, whether or not it is activated.
shell.prefix(f"export PATH={shlex.quote(os.path.dirname(sys.executable))}:\"$PATH\"; ")
DATA_MARKER = str(grid.data_marker(P))
REPORT_MD = f"{OUT}/report.md"
REPORT_CSV = f"{OUT}/report.csv"


def q(obj):
    """A JSON value quoted for the shell; also what the `params` rerun trigger compares."""
    return shlex.quote(canonical_json(obj))


TEACHER_SPECS = {str(grid.teacher_dir(P, arch)): grid.teacher_spec(P, arch) for arch in P.teachers}
STUDENT_SPECS = {
    str(grid.student_dir(P, m, pair, seed)): grid.student_spec(P, m, pair, seed)
    for m, pair, seed in grid.student_jobs(P)
}


def student_spec(wc):
    return STUDENT_SPECS[f"{OUT}/students/{wc.method}/{wc.run}/seed{wc.seed}"]


def _teacher_spec(wc):
    return TEACHER_SPECS[f"{OUT}/teachers/{wc.arch}/seed{wc.tseed}"]


def _teacher_cmd(wc):
    published = P.teachers[wc.arch].checkpoint
    if published:
        return f"import-teacher --checkpoint {shlex.quote(published)}"
    return "train"


def _student_inputs(wc):
    spec = student_spec(wc)
    return [DATA_MARKER] + ([spec.teacher_path] if spec.teacher_path else [])


def _report_inputs(wc):
    files = [f"{d}/metrics.json" for d in TEACHER_SPECS]
    files += [f"{d}/{name}" for d in STUDENT_SPECS for name in ("metrics.json", "eval.json")]
    return files
