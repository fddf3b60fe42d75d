"""Load published CRD/mdistiller teacher checkpoints (and our own exports) into the zoo, strictly.

Detection archs also take torchvision's full detection state dicts (e.g. ``fasterrcnn_resnet50_fpn``
``COCO_V1``). Accepted layouts: ``{"model": state_dict, ...}`` (CRD/mdistiller ``ckpt_epoch_240.pth``, which
also stores ``epoch``/``accuracy``; our exports add ``"arch"``), ``{"state_dict": ...}``, or a
bare state_dict. A mismatch is reported with the keys that differ and, when the file fits
another registered architecture exactly, that architecture's name.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tskd.errors import TskdError
from tskd.models.registry import create_model, list_models, model_entry

_SHOW = 5  # keys listed per kind of mismatch


class ModelFileError(TskdError, ValueError):
    """A model file that is missing, unreadable, or not of the expected architecture."""


TORCHVISION = "torchvision:"  # teachers.<arch>.checkpoint: torchvision:IMAGENET1K_V1


def resolve_checkpoint(arch: str, value: str, key: str | None = None) -> Path:
    """The file a ``teachers.<arch>.checkpoint`` value names: a path, or ``torchvision:<weights>`` (e.g.
    ``torchvision:IMAGENET1K_V1``), the file torchvision's weights of ``arch`` have in torch's hub cache
    (``$TORCH_HOME/hub/checkpoints``, where torchvision downloads them)."""
    if not value.startswith(TORCHVISION):
        return Path(value).expanduser()
    import torch
    from torchvision.models import get_model_weights

    name = value.removeprefix(TORCHVISION)
    try:
        weights = get_model_weights(arch)[name]
    except (KeyError, ValueError):
        raise ModelFileError(f"{key or f'teachers.{arch}.checkpoint'}: {value!r}: torchvision has no weights "
                             f"{name!r} for {arch!r}") from None
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def check_torchvision_hash(path: Path, sha256: str) -> None:
    """torchvision's file names end in the first hex digits of the file's sha256 (``resnet34-b627a593.pth``):
    check them against ``sha256`` (the file's), as torch.hub does on download. Files named otherwise pass."""
    import re

    m = re.search(r"-([a-f0-9]{8,})\.", path.name)
    if m and not sha256.startswith(m.group(1)):
        raise ModelFileError(f"{path}: its sha256 does not start with {m.group(1)}, as its torchvision name says: "
                             "the download is damaged or another file; download it again")


def load_published_checkpoint(path: str | Path, arch: str, num_classes: int | None = None,
                              **model_kwargs: Any) -> nn.Module:
    """Build ``arch`` with ``num_classes`` outputs (default: its family's) and load the weights in
    ``path`` with strict=True.

    The model is returned on the CPU, in training mode like any freshly built module.

    Raises ``KeyError`` if ``arch`` is not registered, and ``ModelFileError`` (a ValueError) naming
    the file when it is missing, unreadable, holds no state_dict, or does not fit ``arch`` exactly.
    """
    return load_model_file(path, arch, num_classes, **model_kwargs)[0]


def load_model_file(path: str | Path, arch: str, num_classes: int | None = None,
                    **model_kwargs: Any) -> tuple[nn.Module, dict | None]:
    """``load_published_checkpoint`` plus what the file says the network was trained on (the
    ``input`` record of our exports: normalisation and image size; None for other files).

    ``model_kwargs`` go to the architecture's factory (detection: the transform's sizes). A loaded
    detector is built as a trained one (FrozenBatchNorm2d): it is a teacher or a model under
    evaluation, where frozen and plain BatchNorm compute the same thing, and torchvision's COCO
    files are saved so."""
    path = Path(path)
    num_classes = num_classes or model_entry(arch).default_classes  # an unknown name fails before the file is read
    obj = _read(path)
    state_dict, declared_arch = _state_dict_from(obj, path)
    detection = model_entry(arch).family == "detection"
    model = create_model(arch, num_classes=num_classes, **(model_kwargs | ({"pretrained_backbone": True}
                                                                          if detection else {})))
    if detection:
        # torchvision's detection modules rewrite a few keys while loading (a COCO_V1 file's older
        # layout, BatchNorm counters for FrozenBatchNorm2d): compare the keys that load will check.
        from tskd.models.detection.weights import torchvision_keys  # lazy: torchvision

        state_dict = torchvision_keys(model, state_dict)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    if found != expected:
        raise ModelFileError(_mismatch_message(path, arch, num_classes, expected, found, declared_arch))
    model.load_state_dict(state_dict, strict=True)
    input_spec = obj.get("input") if isinstance(obj, Mapping) else None
    return model, dict(input_spec) if isinstance(input_spec, Mapping) else None


def _read(path: Path) -> object:
    """``torch.load`` on CPU with the safe (weights-only) unpickler; failures become ValueError."""
    if not path.is_file():
        raise ModelFileError(f"checkpoint file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # refused by the safe unpickler (or not a pickle at all): retry below
    except Exception as exc:  # truncated or corrupt zip, not a torch file, ...
        raise ModelFileError(f"cannot read checkpoint {path} (truncated or not a PyTorch file?): {exc}") from exc
    # Old CRD files may hold numpy scalars (e.g. the accuracy), which the safe unpickler
    # refuses by default. Allow numpy scalars/arrays/dtypes, and nothing else, rather than
    # falling back to unrestricted unpickling (weights_only=False can run arbitrary code).
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(
            f"cannot read checkpoint {path}: the safe loader refused it (corrupt, or it holds objects "
            f"other than tensors and numpy values): {exc}"
        ) from exc


def _numpy_globals() -> list:
    """numpy's scalar/array/dtype constructors, under the names both numpy 1.x and 2.x pickle them as."""
    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed: list = [np.dtype, np.ndarray]
    allowed += list({type(np.dtype(code)) for code in np.typecodes["All"]})
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed.append((multiarray.scalar, f"{module}.scalar"))
        allowed.append((multiarray._reconstruct, f"{module}._reconstruct"))
    return allowed


def _state_dict_from(obj: object, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """Find the state_dict in a loaded checkpoint; also return the ``arch`` it declares, if any."""
    if not isinstance(obj, Mapping):
        raise ModelFileError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict of weights")
    declared = obj.get("arch") if isinstance(obj.get("arch"), str) else None
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    state_dict = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state_dict or len(state_dict) != len(obj):
        raise ModelFileError(
            f"checkpoint {path} has no state_dict under 'model' or 'state_dict' and is not one itself "
            f"(keys: {', '.join(map(str, list(obj)[:10]))})"
        )
    # Weights saved from nn.DataParallel carry a "module." prefix on every key.
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    return state_dict, declared


def _mismatch_message(
    path: Path,
    arch: str,
    num_classes: int,
    expected: dict[str, tuple],
    found: dict[str, tuple],
    declared_arch: str | None,
) -> str:
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & found.keys() if expected[k] != found[k])
    head = f"checkpoint {path} does not fit architecture {arch!r} ({num_classes} classes) with strict=True:"
    lines = [head]
    if missing:
        lines.append(f"  {len(missing)} missing keys, e.g. {', '.join(missing[:_SHOW])}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected keys, e.g. {', '.join(unexpected[:_SHOW])}")
    if reshaped:
        shown = ", ".join(f"{k} file {list(found[k])} vs model {list(expected[k])}" for k in reshaped[:_SHOW])
        lines.append(f"  {len(reshaped)} keys with other shapes, e.g. {shown}")
    if declared_arch is not None and declared_arch != arch:
        lines.append(f"  the file says it holds a {declared_arch!r}")
    match = match_architecture(found)
    if match is not None:
        name, classes = match
        lines.append(f"  this looks like a {name} checkpoint ({classes} classes)")
    return "\n".join(lines)


def _classifier_width(shapes: Mapping[str, tuple]) -> int | None:
    """Number of classes, read from the only 2-D weight (the linear classifier) of a zoo model."""
    linear = [s for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2]
    return linear[0][0] if len(linear) == 1 else None


def match_architecture(shapes: Mapping[str, tuple]) -> tuple[str, int] | None:
    """The registered architecture (and class count) whose state_dict keys and shapes are ``shapes``.

    Candidates are built on the meta device, so no memory is allocated for their weights.
    """
    num_classes = _classifier_width(shapes)
    if num_classes is None:
        return None
    shapes = {k: tuple(s) for k, s in shapes.items()}
    for name in list_models():
        try:
            with torch.device("meta"):
                candidate = create_model(name, num_classes=num_classes)
        except Exception:  # e.g. a factory that loads real weights: not a candidate worth the cost
            continue
        if {k: tuple(v.shape) for k, v in candidate.state_dict().items()} == shapes:
            return name, num_classes
    return None
