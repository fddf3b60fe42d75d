"""Launch settings: ``slurm/launch.yaml`` parsed, merged per rule, and checked against the cluster.

Everything here runs before a job is submitted, so a bad value fails at once, naming the file
and the key, instead of as a rejected or misconfigured job.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from tskd.errors import ParamsError, TskdError
from tskd.spec.config import Strict

Backend = Literal["slurm", "local", "inline"]
RuleName = Literal["teacher", "student"]

# sbatch flags that submitit or another key of the file already sets: a second, raw value in
# additional_parameters would silently win over (or break) it.
_MANAGED = {"time": "timeout_min", "partition": "partition", "account": "account", "nodes": "nodes",
            "ntasks-per-node": "tasks_per_node", "cpus-per-task": "cpus_per_task", "mem": "mem_gb",
            "gpus-per-node": "gpus_per_node", "job-name": None, "output": None, "error": None,
            "signal": None, "open-mode": None, "array": None}

class LaunchError(TskdError, RuntimeError):
    """A job could not be submitted, or it failed; the message names the job and its log."""


# -- settings -------------------------------------------------------------------------------
class Resources(Strict):
    """What one job asks for; the names are submitit's (and map onto sbatch flags)."""

    partition: str | None = Field(None, description="SLURM partition (None: the cluster's default)")
    account: str | None = Field(None, description="account charged for the job (sbatch --account)")
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_task: int = Field(1, ge=1)
    mem_gb: float | None = Field(None, gt=0, description="memory per node (None: the cluster's default)")
    timeout_min: int = Field(60, ge=1, description="time limit; the job is requeued when it is reached")
    nodes: int = Field(1, ge=1)
    tasks_per_node: int = Field(1, ge=1, description="> 1: one data-parallel rank per task")
    additional_parameters: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="any other sbatch long option, without the dashes")
    setup: list[str] = Field(default_factory=list, description="shell lines run in the job before the call")

    @model_validator(mode="after")
    def _no_managed_flags(self):
        for key in self.additional_parameters:
            flag = key.replace("_", "-")
            if flag in _MANAGED:
                how = f"use the `{_MANAGED[flag]}` key" if _MANAGED[flag] else "submitit sets it"
                raise ValueError(f"additional_parameters.{key}: not allowed here ({how})")
        return self


class LaunchFile(Strict):
    """``slurm/launch.yaml``: the backend, resources for every training rule, per-rule overrides."""

    backend: Backend = "slurm"
    poll_s: float = Field(10.0, gt=0, description="how often a waiting rule asks sacct for its job's state")
    max_num_timeout: int = Field(3, ge=0, description="how many times a job that hits its time limit is requeued")
    defaults: Resources = Resources()
    rules: dict[RuleName, Resources] = Field(default_factory=dict)


class LaunchSettings(Strict):
    """The resolved settings of one rule: what ``launch`` needs."""

    backend: Backend = "inline"
    poll_s: float = Field(10.0, gt=0)
    max_num_timeout: int = Field(3, ge=0)
    resources: Resources = Resources()
    source: str = "<launch settings>"  # the file, for messages
    rule: str | None = None
    overridden: frozenset[str] = frozenset()  # resource keys set under rules.<rule>

    def where(self, key: str) -> str:
        """``file: rules.student.partition`` (or ``defaults.partition``): where a value was set."""
        section = f"rules.{self.rule}" if key in self.overridden else "defaults"
        return f"{self.source}: {section}.{key}"


def _format_errors(e: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid launch settings"]
    for err in e.errors():
        loc = [str(x) for x in err["loc"] if x != "[key]"]
        if err["type"] == "extra_forbidden":
            model = Resources if len(loc) > 1 else LaunchFile
            msg = f"unknown key; allowed: {', '.join(model.model_fields)}"
        else:
            msg = f"{err['msg']} (got {err.get('input')!r})"
        lines.append(f"  {'.'.join(loc) or '(top level)'}: {msg}")
    return "\n".join(lines)


def load_launch_file(path: str | Path) -> LaunchFile:
    """Read and validate a launch file; errors name the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: launch settings file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    try:
        return LaunchFile.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(_format_errors(e, str(path))) from None


def resolve(file: LaunchFile, rule: str, source: str = "<launch file>") -> LaunchSettings:
    """The settings of ``rule``: ``defaults`` with the keys set under ``rules.<rule>`` replaced
    (``additional_parameters`` are merged, the rule's winning)."""
    override = file.rules.get(rule)  # type: ignore[call-overload]
    res, keys = file.defaults, frozenset()
    if override is not None:
        keys = frozenset(override.model_fields_set)
        update = {k: getattr(override, k) for k in keys}
        if "additional_parameters" in update:
            update["additional_parameters"] = res.additional_parameters | update["additional_parameters"]
        res = Resources.model_validate(res.model_dump() | update)
    settings = LaunchSettings(backend=file.backend, poll_s=file.poll_s, max_num_timeout=file.max_num_timeout,
                              resources=res, source=source, rule=rule, overridden=keys)
    if settings.backend == "inline" and res.nodes * res.tasks_per_node > 1:
        raise ParamsError(f"{settings.where('tasks_per_node')}: backend inline runs one process; "
                          "use backend local or slurm for several tasks")
    if settings.backend == "local" and res.nodes > 1:
        raise ParamsError(f"{settings.where('nodes')}: backend local runs on this machine only (nodes: 1)")
    return settings


def load_settings(path: str | Path, rule: str) -> LaunchSettings:
    """The settings of ``rule`` in the launch file at ``path``."""
    return resolve(load_launch_file(path), rule, str(path))


# -- checks against the cluster, before submitting ----------------------------------------
def _run(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LaunchError(f"`{' '.join(cmd)}` failed: {e}") from None
    if r.returncode != 0:
        raise LaunchError(f"`{' '.join(cmd)}` failed (exit {r.returncode}): {r.stderr.strip()}")
    return r.stdout


def cluster_partitions() -> list[str]:
    """Partition names, as ``sinfo`` lists them (the default one without its ``*``)."""
    return sorted({p.strip().rstrip("*") for p in _run(["sinfo", "-h", "-o", "%P"]).split() if p.strip()})


@lru_cache(maxsize=1)
def sbatch_options() -> frozenset[str]:
    """The long options this cluster's ``sbatch`` knows (from ``sbatch --help``)."""
    return frozenset(re.findall(r"--([A-Za-z0-9][A-Za-z0-9-]*)", _run(["sbatch", "--help"])))


def check_cluster(settings: LaunchSettings) -> None:
    """Fail before submission on what sbatch would refuse or submitit would get wrong."""
    if shutil.which("sbatch") is None or shutil.which("sacct") is None:
        raise LaunchError(f"{settings.source}: backend slurm needs the SLURM client tools (sbatch, sacct) "
                          "on PATH; use backend local to run without a cluster")
    r = settings.resources
    if r.partition is not None:
        known = cluster_partitions()
        if r.partition not in known:
            raise LaunchError(f"{settings.where('partition')}: unknown partition {r.partition!r}; "
                              f"this cluster has: {', '.join(known)}")
    unknown = sorted(k for k in r.additional_parameters if k.replace("_", "-") not in sbatch_options())
    if unknown:
        raise LaunchError(f"{settings.where('additional_parameters')}: {', '.join(unknown)}: not sbatch "
                          "option(s) (see `sbatch --help`)")
