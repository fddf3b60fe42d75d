"""A tiny ImageNet, written in the layout torchvision's ``ImageNet`` reads once it has prepared
the official archives: ``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG`` and ``meta.bin``.

The images are the synthetic CIFAR-100 classes (``tskd.data.synthetic``: objects of class-specific
shape on superclass palettes, with nuisance), scaled up to ``image_size`` and JPEG-encoded, so
the set is learnable. wnids are made up (``n00000000`` …); class names are ImageNet's own
(torchvision's category list). A ``tskd_manifest.json`` records every file's sha256 and the
parameters; equal parameters give equal bytes, and the directory is written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from tskd.data.integrity import DatasetError, holds_current, staged_dir, write_manifest
from tskd.data.synthetic import synthetic_cifar100_arrays

GENERATOR_VERSION = 1
META_FILE = "meta.bin"
JPEG_QUALITY = 90


def wnid(index: int) -> str:
    """The made-up WordNet id of class ``index`` (real ones look the same: ``n`` and 8 digits)."""
    return f"n{index:08d}"


def _jpeg(pixels: np.ndarray, size: int) -> bytes:
    from PIL import Image

    image = Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def write_synthetic_imagenet(root: str | Path, *, seed: int, classes: int, train_per_class: int,
                             val_per_class: int, image_size: int) -> Path:
    """Write the prepared layout into ``root`` (a directory of its own); return ``root``.

    Kept as is when ``root`` already holds intact data of the same parameters; replaced when it
    holds other tskd-written data; refused (DatasetError) when it holds anything else.
    """
    import torch
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    if not 2 <= classes <= 100:
        raise DatasetError(f"synthetic ImageNet: classes must be 2..100 (the synthetic classes), got {classes}")
    params = {"generator": "tskd.data.synthetic_imagenet", "version": GENERATOR_VERSION, "seed": seed,
              "classes": classes, "train_per_class": train_per_class, "val_per_class": val_per_class,
              "image_size": image_size}
    root = Path(root)
    if holds_current(root, params, required=(META_FILE,), what="a real ImageNet"):
        return root
    arrays = synthetic_cifar100_arrays(seed=seed, train_per_class=train_per_class, test_per_class=val_per_class)
    with staged_dir(root) as tmp:
        files = []
        val_wnids = []
        for split, (labels, data) in (("train", arrays["train"]), ("val", arrays["test"])):
            images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            counts: dict[int, int] = {}
            for label, pixels in zip(labels, images, strict=True):
                if label >= classes:
                    continue
                k = counts[label] = counts.get(label, -1) + 1
                # Official names: n…_<k>.JPEG in train, ILSVRC2012_val_<8 digits>.JPEG in val.
                name = (f"{wnid(label)}_{k}.JPEG" if split == "train" else
                        f"ILSVRC2012_val_{label * val_per_class + k + 1:08d}.JPEG")
                rel = f"{split}/{wnid(label)}/{name}"
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(_jpeg(pixels, image_size))
                files.append(rel)
                if split == "val":
                    val_wnids.append((name, wnid(label)))
        # meta.bin as torchvision writes it from the devkit: (wnid -> class names, wnid of each
        # validation image in file-name order).
        wnid_to_classes = {wnid(i): (_IMAGENET_CATEGORIES[i],) for i in range(classes)}
        torch.save((wnid_to_classes, [w for _, w in sorted(val_wnids)]), tmp / META_FILE)
        files.append(META_FILE)
        write_manifest(tmp, files, params=params)
    return root
