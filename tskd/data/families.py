"""Dataset families by name: each is a module of tskd.data with two entries.

* ``load_splits(cfg, recipe) -> Splits``: the splits a run trains and evaluates on, read with
  the family's real reader, verified cheaply (no re-hash of a large tree per call);
* ``prepare(cfg) -> dict``: the data stage: write the synthetic set, or check (and for ImageNet
  prepare, once) the real one; returns what the stage's marker records;
* optional: ``train_batches(cfg, recipe, splits)`` (CIFAR's device-resident batches) and
  ``model_kwargs(cfg)`` (what the family's models are built with: COCO's transform sizes);
* ``versioned_inputs(cfg) -> list[str]``: the files of real data that DVC versions and the data
  stage depends on (CIFAR: the directory; ImageNet: the three archives, not 1.28 M files; COCO: its three
  zips, not 123 k files).

Its params are its own model in ``tskd.spec.config`` (the ``DatasetCfg`` union, told apart by
``dataset.name``). Each family poses one task (``tskd.tasks``: what the run learns, how it is
scored). Adding a family: a params model there, a module here, a line in each table below.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from tskd.data.integrity import DatasetError

_MODULES = {"cifar100": "tskd.data.cifar", "imagenet": "tskd.data.imagenet", "coco": "tskd.data.coco"}
TASK_OF = {"cifar100": "classification", "imagenet": "classification", "coco": "detection"}


def family(name: str) -> ModuleType:
    """The module of dataset family ``name`` (imported on first use: torchvision is heavy)."""
    try:
        return importlib.import_module(_MODULES[name])
    except KeyError:
        raise DatasetError(f"unknown dataset family {name!r}; known: {', '.join(sorted(_MODULES))}") from None
