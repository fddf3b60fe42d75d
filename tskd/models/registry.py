"""Models registered by name: the CIFAR zoo (``tskd.models.cifar``), ImageNet (``tskd.models.imagenet``)
and COCO detectors (``tskd.models.detection``).

A model is built by ``create_model(name, num_classes=...)``. Every classification model's
(families ``cifar``, ``imagenet``) ``forward(x)`` returns ``(logits, taps)`` where ``taps`` is a dict:

- ``"feats"``: list of post-activation feature maps, stem first, then one per stage;
- ``"preact_feats"``: the same stages before their final ReLU (what teachers give TSKD);
- ``"pooled_feat"``: the pooled, flattened feature fed to the classifier.

Detection models keep torchvision's ``forward`` and add ``train_step`` (see ``tskd.models.detection``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

ModelFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    factory: ModelFactory
    family: str  # "cifar", "imagenet" or "detection": which input the model expects
    small: bool  # ShuffleNet/MobileNet students use the recipe's small-model learning rate

    @property
    def default_classes(self) -> int:
        """The class count of the family's benchmark (parameter counts are quoted for it)."""
        return FAMILY_CLASSES.get(self.family, 100)


_REGISTRY: dict[str, ModelEntry] = {}
FAMILY_CLASSES = {"cifar": 100, "imagenet": 1000, "detection": 91}  # COCO: ids 1..90 + background


def register_model(name: str, *, family: str = "cifar", small: bool = False):
    """Class/function decorator registering a model factory under ``name``."""

    def wrap(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(name, factory, family, small)
        return factory

    return wrap


def _load_builtin() -> None:
    # Importing the zoo packages runs their @register_model decorators.
    from tskd.models import cifar, detection, imagenet  # noqa: F401


def model_entry(name: str) -> ModelEntry:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(sorted(_REGISTRY))}") from None


def create_model(name: str, num_classes: int | None = None, **kwargs) -> nn.Module:
    """Build the registered architecture ``name`` with ``num_classes`` outputs (default: its family's);
    other keyword arguments go to its factory (detection: ``min_size``, ``max_size``, ...)."""
    entry = model_entry(name)
    return entry.factory(num_classes=num_classes or entry.default_classes, **kwargs)


def list_models(family: str | None = None) -> list[str]:
    _load_builtin()
    return sorted(n for n, e in _REGISTRY.items() if family is None or e.family == family)
