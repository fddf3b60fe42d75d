"""Distillation methods registered by name."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from torch import nn

from tskd.config import ParamsError
from tskd.distill.base import DistillContext, Distiller, MethodParams

_METHODS: dict[str, type[Distiller]] = {}


def register_method(name: str):
    """Class decorator: make a ``Distiller`` subclass available as ``name`` in params."""

    def wrap(cls: type[Distiller]) -> type[Distiller]:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        cls.method_name = name
        _METHODS[name] = cls
        return cls

    return wrap


def _load_builtin() -> None:
    import tskd.distill.methods  # noqa: F401  (registers the built-in methods)


def list_methods() -> list[str]:
    _load_builtin()
    return sorted(_METHODS)


def method_class(name: str) -> type[Distiller]:
    _load_builtin()
    try:
        return _METHODS[name]
    except KeyError:
        raise ParamsError(f"unknown method {name!r}; allowed: {', '.join(sorted(_METHODS))}") from None


def parse_method_params(name: str, raw: dict[str, Any] | None, where: str = "methods") -> MethodParams:
    """Validate ``raw`` against the method's typed params; errors name ``where.name.key``."""
    cls = method_class(name)
    try:
        return cls.Params.model_validate(raw or {})
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join([where, name, *map(str, err["loc"])])
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
        allowed = ", ".join(cls.Params.model_fields)
        raise ParamsError(f"invalid params for method {name!r}:\n" + "\n".join(lines)
                         + f"\n  allowed keys: {allowed or '(none)'}") from None


def build_distiller(name: str, student: nn.Module, teacher: nn.Module | None,
                    raw_params: dict[str, Any] | None, ctx: DistillContext) -> Distiller:
    cls = method_class(name)
    params = parse_method_params(name, raw_params)
    if cls.needs_teacher and teacher is None:
        raise ParamsError(f"method {name!r} needs a teacher, but none was given")
    return cls(student, teacher if cls.needs_teacher else None, params, ctx)
