"""Model zoo: CIFAR (CRD/mdistiller-compatible), registered by name."""

from tskd.models.registry import create_model, list_models, model_entry, register_model

__all__ = ["create_model", "list_models", "model_entry", "register_model"]
