"""Write a small dataset of your own in the cifar-100-python layout: six classes of drawn shapes.

It writes exactly what tskd reads for your own data (docs/data.md, "Your own data"), with numpy,
pickle and the standard library only, so that it can serve as a template for converting real data:

    ROOT/cifar-100-python/train   pickled dict: "data" (N x 3072 uint8), "fine_labels" (N ints)
    ROOT/cifar-100-python/test    the same, for the test split
    ROOT/cifar-100-python/meta    pickled dict: "fine_label_names" (one name per class)

Each row of "data" is one 32 x 32 RGB image, planar: 1024 red bytes, then 1024 green, then 1024
blue, each plane row by row from the top-left pixel. Label i names fine_label_names[i].

The images: a circle, square, triangle or cross, or horizontal or vertical stripes, in random
colours at a random place and size, with pixel noise. Every class looks the same when mirrored,
so the default augmentation (random crop and horizontal flip) suits it. The same seed and sizes
give the same bytes.

    python examples/own_data/write_dataset.py data/shapes
    tskd data register data/shapes --name shapes
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np

CLASSES = ("circle", "square", "triangle", "cross", "horizontal_stripes", "vertical_stripes")
SIZE = 32  # the layout's fixed image size
PICKLE_PROTOCOL = 4  # fixed: equal arrays give equal bytes


def _mask(name: str, rng: np.random.Generator) -> np.ndarray:
    """Where the class's shape is, as a boolean 32 x 32 array (rows = y, from the top)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] + 0.5  # pixel centres
    cx, cy = rng.uniform(11, 21, 2)
    r = rng.uniform(6, 10)
    dx, dy = np.abs(x - cx), np.abs(y - cy)
    if name == "circle":
        return dx**2 + dy**2 <= r**2
    if name == "square":
        return np.maximum(dx, dy) <= 0.8 * r
    if name == "triangle":  # apex at the top: its mirror image is itself
        top = cy - r
        return (y >= top) & (y <= cy + r) & (dx <= (y - top) / 2)
    if name == "cross":
        arm = r / 3
        return ((dx <= arm) & (dy <= r)) | ((dy <= arm) & (dx <= r))
    period, phase = rng.uniform(5, 9), rng.uniform(0, 2 * np.pi)
    along = y if name == "horizontal_stripes" else x
    return np.sin(2 * np.pi * along / period + phase) > 0


def _image(name: str, rng: np.random.Generator, noise: float) -> np.ndarray:
    """One image as 3072 uint8: the R plane, then G, then B, each 32 rows of 32 pixels."""
    background = rng.uniform(0, 1, 3)
    # A shape colour far enough from the background to be seen; colours say nothing of the class.
    foreground = (background + rng.uniform(0.35, 0.65, 3) * rng.choice([-1, 1], 3)) % 1.0
    planes = np.where(_mask(name, rng)[None], foreground[:, None, None], background[:, None, None])
    planes = planes + rng.normal(0, noise, planes.shape)  # (3, 32, 32): channel, row, column
    return np.rint(np.clip(planes, 0, 1) * 255).astype(np.uint8).reshape(3 * SIZE * SIZE)


def split(rng: np.random.Generator, per_class: int, noise: float) -> dict:
    """One split's pickled dict: ``per_class`` images of every class, shuffled."""
    labels = rng.permutation(np.repeat(np.arange(len(CLASSES)), per_class))
    data = np.stack([_image(CLASSES[y], rng, noise) for y in labels])  # (N, 3072) uint8
    return {"data": data, "fine_labels": [int(y) for y in labels]}


def write_dataset(root: str | Path, *, seed: int = 0, train_per_class: int = 100, test_per_class: int = 20,
                  noise: float = 0.08) -> Path:
    """Write ``root/cifar-100-python/{train,test,meta}``; return that directory."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    # One generator per split: the test set does not change when the training set grows.
    payloads = {
        "train": split(np.random.default_rng([seed, 1]), train_per_class, noise),
        "test": split(np.random.default_rng([seed, 2]), test_per_class, noise),
        "meta": {"fine_label_names": list(CLASSES)},
    }
    for name, payload in payloads.items():
        (folder / name).write_bytes(pickle.dumps(payload, protocol=PICKLE_PROTOCOL))
    return folder


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="the directory to hold cifar-100-python/ (the preset's dataset.root)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--test-per-class", type=int, default=20)
    ap.add_argument("--noise", type=float, default=0.08, help="pixel noise std, on a 0..1 scale")
    a = ap.parse_args(argv)
    if a.train_per_class < 1 or a.test_per_class < 1:
        ap.error("--train-per-class and --test-per-class must be at least 1")
    folder = write_dataset(a.root, seed=a.seed, train_per_class=a.train_per_class,
                           test_per_class=a.test_per_class, noise=a.noise)
    n = len(CLASSES)
    print(f"wrote {folder}: {n} classes, {n * a.train_per_class} train / {n * a.test_per_class} test images\n"
          f"next: tskd data register {a.root} --name shapes")


if __name__ == "__main__":
    main()
