"""Distillation methods registered by name."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from torch import nn

from tskd.distill.base import DistillContext, Distiller, MethodParams
from tskd.errors import ParamsError
from tskd.spec.params_yaml import validate_strict

# Methods by (task, name): a method name means the same idea on every task (``kd`` distils the
# classifier's logits; on detection, the RoI head's), with the task's own implementation and params.
_METHODS: dict[tuple[str, str], type[Distiller]] = {}
DEFAULT_TASK = "classification"


def register_method(name: str, task: str = DEFAULT_TASK):
    """Class decorator: make a ``Distiller`` subclass available as ``name`` in params of ``task``."""

    def wrap(cls: type[Distiller]) -> type[Distiller]:
        if (task, name) in _METHODS:
            raise ValueError(f"method {name!r} is registered twice for {task}")
        cls.method_name = name
        cls.task = task
        _METHODS[(task, name)] = cls
        return cls

    return wrap


def _load_builtin() -> None:
    import tskd.distill.detection  # noqa: F401  (registers the built-in methods)
    import tskd.distill.methods  # noqa: F401


def list_methods(task: str = DEFAULT_TASK) -> list[str]:
    _load_builtin()
    return sorted(n for t, n in _METHODS if t == task)


def method_class(name: str, task: str = DEFAULT_TASK) -> type[Distiller]:
    _load_builtin()
    try:
        return _METHODS[(task, name)]
    except KeyError:
        raise ParamsError(f"unknown method {name!r} for {task}; allowed: {', '.join(list_methods(task))}") from None


def parse_method_params(name: str, raw: dict[str, Any] | None, where: str = "methods",
                        task: str = DEFAULT_TASK) -> MethodParams:
    """Validate ``raw`` against the method's typed params; errors name ``where.name.key``."""
    cls = method_class(name, task)
    try:
        # Strict, as the preset (tskd.spec.params_yaml): T: "4" is refused, T: 4 is a float.
        return validate_strict(cls.Params, raw or {})
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join([where, name, *map(str, err["loc"])])
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
        allowed = ", ".join(cls.Params.model_fields)
        raise ParamsError(f"invalid params for method {name!r}:\n" + "\n".join(lines)
                         + f"\n  allowed keys: {allowed or '(none)'}") from None


def build_distiller(name: str, student: nn.Module, teacher: nn.Module | None,
                    raw_params: dict[str, Any] | None, ctx: DistillContext, task: str = DEFAULT_TASK) -> Distiller:
    cls = method_class(name, task)
    params = parse_method_params(name, raw_params, task=task)
    if cls.needs_teacher and teacher is None:
        raise ParamsError(f"method {name!r} needs a teacher, but none was given")
    return cls(student, teacher if cls.needs_teacher else None, params, ctx)
