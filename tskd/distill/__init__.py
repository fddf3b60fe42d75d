"""Distillation methods behind one interface (see ``base.Distiller``)."""

from tskd.distill.base import DistillContext, Distiller, MethodParams
from tskd.distill.registry import build_distiller, list_methods, method_class, parse_method_params, register_method

__all__ = ["DistillContext", "Distiller", "MethodParams", "build_distiller", "list_methods", "method_class",
           "parse_method_params", "register_method"]
