"""A synthetic CIFAR-100, written in the exact ``cifar-100-python`` on-disk format.

The files (``train``, ``test``, ``meta``) are pickled dicts with the official keys, so
torchvision's own CIFAR100 reader loads them; a ``tskd_manifest.json`` records their
hashes and the generator parameters (real data is checked against the official md5).

The task is learnable but not trivial, so that a results table has a real order
(bigger teacher > distilled student >= student alone). Each class is an object drawn
on a background:

* the 20 CIFAR-100 superclasses each own a palette (background, two grating colours,
  accent): classes of one superclass look alike, as in the real data, so a teacher's
  soft labels carry similarity information for distillation;
* within a superclass the 5 classes differ only in shape: the object's grating
  (orientation about 16 degrees apart, frequency), its size and elongation, and the
  position of a small accent blob relative to it;
* every sample gets nuisance: position, phase, orientation and scale jitter, a random
  background gradient, a faint decoy object of another class, clutter blobs drawn over
  the object, brightness/contrast/colour jitter, pixel noise and a random mirror
  (class cues are mirror-safe: training augments with horizontal flips).

Everything comes from numpy Generators seeded by ``seed``, computed in float64 (so SIMD
differences between CPUs cannot flip a rounded pixel) and pickled with a fixed protocol:
equal arguments give equal bytes.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tskd.data.integrity import DatasetError, holds_current, staged_dir, write_manifest

BASE_FOLDER = "cifar-100-python"
FILES = ("train", "test", "meta")
# Bump when the rendering changes: a directory written by another version is then rewritten.
GENERATOR_VERSION = 1
# Protocol 4: native bytes for the image array; any Python >= 3.4 reads it.
PICKLE_PROTOCOL = 4
_SIZE = 32
_CHUNK = 256  # images rendered at once: bounds memory; fixed, so the random stream is too

# Superclass -> its five classes, as in the official CIFAR-100 meta (both lists alphabetical).
SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
COARSE_LABEL_NAMES: tuple[str, ...] = tuple(SUPERCLASSES)
FINE_LABEL_NAMES: tuple[str, ...] = tuple(sorted(n for members in SUPERCLASSES.values() for n in members))
FINE_TO_COARSE: tuple[int, ...] = tuple(
    next(i for i, members in enumerate(SUPERCLASSES.values()) if name in members) for name in FINE_LABEL_NAMES)


@dataclass(frozen=True)
class Nuisance:
    """Per-sample nuisance strengths (recorded in the manifest; tuned with benchmarks/)."""

    shift: float = 6.0  # max object translation from the centre, pixels
    scale_jitter: float = 0.25  # object size multiplied by U(1 - j, 1 + j)
    angle_jitter: float = 0.12  # radians (std) added to the grating orientation
    decoy_opacity: float = 0.45  # max opacity of a half-size object of another class
    clutter_blobs: int = 3  # small random-colour blobs drawn over the object
    contrast_jitter: float = 0.3
    brightness_jitter: float = 0.12
    colour_jitter: float = 0.06  # per-channel gain std
    noise_std: float = 0.07

    def scaled(self, factor: float) -> Nuisance:
        """Every strength multiplied by ``factor`` (< 1: an easier set that small runs learn fast)."""
        return Nuisance(**{k: (round(v * factor) if isinstance(v, int) else v * factor)
                           for k, v in asdict(self).items()})


@dataclass(frozen=True)
class _Classes:
    """Per-class appearance, arrays indexed by fine label."""

    bg: np.ndarray  # (100, 3) background colour
    fg: np.ndarray  # (100, 3) object colour (grating crests)
    fg2: np.ndarray  # (100, 3) grating troughs
    accent: np.ndarray  # (100, 3) accent blob colour
    theta: np.ndarray  # (100,) grating orientation in (0, pi/2): its mirror (pi - theta) is no class's
    freq: np.ndarray  # (100,) grating cycles per image width
    size: np.ndarray  # (100,) object radius (Gaussian sigma), pixels
    aspect: np.ndarray  # (100,) elongation along the grating
    offset: np.ndarray  # (100, 2) accent position relative to the object, in object radii


def _class_table(rng: np.random.Generator) -> _Classes:
    coarse = np.asarray(FINE_TO_COARSE)
    n = len(FINE_LABEL_NAMES)
    slot = np.array([SUPERCLASSES[COARSE_LABEL_NAMES[c]].index(name)
                     for name, c in zip(FINE_LABEL_NAMES, coarse, strict=True)])
    group_bg = rng.uniform(0.15, 0.85, (20, 3))
    group_fg = rng.uniform(0.05, 0.95, (20, 3))
    group_fg2 = rng.uniform(0.05, 0.95, (20, 3))
    group_accent = rng.uniform(0, 1, (20, 3))
    # Each superclass deals its five classes distinct frequencies, in a random order.
    freqs = np.array([1.5, 2.25, 3.0, 3.75, 4.5])
    freq = freqs[np.array([rng.permutation(5) for _ in range(20)])[coarse, slot]]
    angle = rng.uniform(0, 2 * np.pi, n)
    # Colours belong to the superclass only: per-pixel colour statistics (what a linear model
    # sees) then tell the superclass, and the fine class needs shape features.
    return _Classes(
        bg=group_bg[coarse],
        fg=group_fg[coarse],
        fg2=group_fg2[coarse],
        accent=group_accent[coarse],
        theta=(slot + rng.uniform(-0.15, 0.15, n)) * (0.45 * np.pi / 5) + 0.02 * np.pi,
        freq=freq,
        size=rng.uniform(4.0, 7.0, n),
        aspect=rng.uniform(1.0, 1.8, n),
        offset=1.3 * np.stack([np.cos(angle), np.sin(angle)], axis=1),
    )


def _blob(x: np.ndarray, y: np.ndarray, cx: np.ndarray, cy: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Isotropic Gaussian bumps, (n, H, W); centres and sigmas are (n, 1, 1)."""
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))


def _over(img: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha-composite ``colour`` (broadcastable to img) over ``img`` (n, 3, H, W), in place."""
    img += alpha[:, None] * (colour - img)
    return img


def _render(cls: _Classes, labels: np.ndarray, rng: np.random.Generator, nz: Nuisance) -> np.ndarray:
    """Images of ``labels`` as float64 (n, 3, 32, 32) in [0, 1]."""
    n = len(labels)
    col = lambda a: a.reshape(n, 1, 1)  # noqa: E731  per-sample scalar -> broadcast over pixels
    u3 = lambda a: a.reshape(n, 3, 1, 1)  # noqa: E731  per-sample colour
    y, x = np.mgrid[0:_SIZE, 0:_SIZE].astype(np.float64) + 0.5
    c = _SIZE / 2

    # Background: class colour plus a gradient in a random direction.
    g_dir = col(rng.uniform(0, 2 * np.pi, n))
    g_amp = col(rng.uniform(-0.15, 0.15, n))
    grad = g_amp * ((x - c) * np.cos(g_dir) + (y - c) * np.sin(g_dir)) / c
    img = u3(cls.bg[labels]) + grad[:, None]

    # Decoy: a faint half-size object of another class, so the net must find the main one.
    other = (labels + rng.integers(1, 100, n)) % 100
    img = _draw_object(img, cls, other, rng, x, y, c, nz, size_mult=0.5,
                       opacity=rng.uniform(0, nz.decoy_opacity, n), with_accent=False)
    img = _draw_object(img, cls, labels, rng, x, y, c, nz, size_mult=1.0,
                       opacity=rng.uniform(0.75, 1.0, n), with_accent=True)

    for _ in range(nz.clutter_blobs):
        bx, by = (col(rng.uniform(0, _SIZE, n)) for _ in range(2))
        alpha = col(rng.uniform(0.3, 0.9, n)) * _blob(x, y, bx, by, col(rng.uniform(0.8, 2.2, n)))
        img = _over(img, u3(rng.uniform(0, 1, (n, 3))), alpha)

    # Photometric jitter and sensor noise.
    mean = img.mean(axis=(1, 2, 3), keepdims=True)
    contrast = u3(np.repeat(rng.uniform(1 - nz.contrast_jitter, 1 + nz.contrast_jitter, n), 3))
    gain = u3(rng.normal(1, nz.colour_jitter, (n, 3)))
    bright = u3(np.repeat(rng.uniform(-nz.brightness_jitter, nz.brightness_jitter, n), 3))
    img = ((img - mean) * contrast + mean) * gain + bright
    img = img + rng.normal(0, nz.noise_std, img.shape)
    mirror = rng.random(n) < 0.5
    img[mirror] = img[mirror][..., ::-1]
    return np.clip(img, 0, 1)


def _draw_object(img: np.ndarray, cls: _Classes, labels: np.ndarray, rng: np.random.Generator,
                 x: np.ndarray, y: np.ndarray, c: float, nz: Nuisance, *, size_mult: float,
                 opacity: np.ndarray, with_accent: bool) -> np.ndarray:
    """Composite one grating-textured elliptical object (and its accent blob) per image."""
    n = len(labels)
    col = lambda a: a.reshape(n, 1, 1)  # noqa: E731
    cx, cy = (col(c + rng.uniform(-nz.shift, nz.shift, n)) for _ in range(2))
    sigma = col(cls.size[labels] * size_mult * rng.uniform(1 - nz.scale_jitter, 1 + nz.scale_jitter, n))
    theta = col(cls.theta[labels] + rng.normal(0, nz.angle_jitter, n))
    freq = col(cls.freq[labels] * rng.uniform(0.9, 1.1, n))
    phase = col(rng.uniform(0, 2 * np.pi, n))
    # u runs across the grating's stripes, v along them; the ellipse is long along u.
    u = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)
    v = -(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta)
    aspect = col(cls.aspect[labels])
    envelope = np.exp(-((u / aspect) ** 2 + v**2) / (2 * sigma**2))
    stripes = (0.5 + 0.5 * np.cos(2 * np.pi * freq * u / _SIZE + phase))[:, None]
    fg2 = cls.fg2[labels][:, :, None, None]
    colour = fg2 + (cls.fg[labels][:, :, None, None] - fg2) * stripes
    img = _over(img, colour, col(opacity) * np.minimum(1.0, 1.3 * envelope))
    if with_accent:
        ox, oy = cls.offset[labels].T
        ax, ay = cx + col(ox) * sigma, cy + col(oy) * sigma
        alpha = 0.9 * _blob(x, y, ax, ay, 0.35 * sigma)
        img = _over(img, cls.accent[labels][:, :, None, None], alpha)
    return img


def _split(cls: _Classes, rng: np.random.Generator, per_class: int, nz: Nuisance) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled labels and their images as uint8 (n, 3072): R, G, B planes of 32x32, row-major."""
    labels = rng.permutation(np.repeat(np.arange(len(FINE_LABEL_NAMES)), per_class))
    chunks = [_render(cls, labels[i:i + _CHUNK], rng, nz) for i in range(0, len(labels), _CHUNK)]
    img = np.concatenate(chunks) if chunks else np.zeros((0, 3, _SIZE, _SIZE))
    data = np.rint(img * 255).astype(np.uint8).reshape(len(labels), 3 * _SIZE * _SIZE)
    return labels, data


def synthetic_cifar100_arrays(*, seed: int, train_per_class: int, test_per_class: int,
                              nuisance: Nuisance | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (labels, data), "test": (labels, data)}`` as the writer would store them."""
    nz = nuisance or Nuisance()
    # Independent streams: the class look, and each split (test size does not change train).
    cls = _class_table(np.random.default_rng([seed, 0]))
    return {"train": _split(cls, np.random.default_rng([seed, 1]), train_per_class, nz),
            "test": _split(cls, np.random.default_rng([seed, 2]), test_per_class, nz)}


def _batch(split: str, labels: np.ndarray, data: np.ndarray) -> dict:
    # Key order and batch_label as in the official files.
    return {
        "filenames": [f"{FINE_LABEL_NAMES[y]}_s_{i:06d}.png" for i, y in enumerate(labels.tolist())],
        "batch_label": "training batch 1 of 1" if split == "train" else "testing batch 1 of 1",
        "fine_labels": [int(y) for y in labels],
        "coarse_labels": [FINE_TO_COARSE[y] for y in labels.tolist()],
        "data": data,
    }


def _write_file(path: Path, payload: bytes) -> None:
    with open(path, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())


def write_synthetic_cifar100(root: str | Path, *, seed: int, train_per_class: int, test_per_class: int,
                             nuisance: Nuisance | None = None) -> Path:
    """Write ``root/cifar-100-python/{train,test,meta}`` and its manifest; return that directory.

    Idempotent: a directory already written with the same parameters (and still matching
    its manifest) is kept as is, so its mtime does not trigger reruns. A directory from
    other parameters is replaced. A directory without a manifest (real CIFAR-100?) is
    never overwritten. The write is atomic: files go to a temporary directory beside the
    target, which is renamed into place only when complete.
    """
    for name, value, least in (("seed", seed, 0), ("train_per_class", train_per_class, 1),
                               ("test_per_class", test_per_class, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise DatasetError(f"{name} must be an integer >= {least}, got {value!r}")
    nz = nuisance or Nuisance()
    params = {"generator": "tskd.data.synthetic", "version": GENERATOR_VERSION, "seed": int(seed),
              "train_per_class": train_per_class, "test_per_class": test_per_class, "nuisance": asdict(nz)}
    root = Path(root)
    target = root / BASE_FOLDER
    if holds_current(target, params, required=FILES, what="real CIFAR-100"):
        return target

    # A concurrent writer may install its copy between our check and our rename: theirs is kept if
    # it is the same data.
    with staged_dir(target, same=lambda: holds_current(target, params, required=FILES,
                                                      what="real CIFAR-100")) as tmp:
        arrays = synthetic_cifar100_arrays(seed=seed, train_per_class=train_per_class,
                                           test_per_class=test_per_class, nuisance=nz)
        for split, (labels, data) in arrays.items():
            _write_file(tmp / split, pickle.dumps(_batch(split, labels, data), protocol=PICKLE_PROTOCOL))
        meta = {"fine_label_names": list(FINE_LABEL_NAMES), "coarse_label_names": list(COARSE_LABEL_NAMES)}
        _write_file(tmp / "meta", pickle.dumps(meta, protocol=PICKLE_PROTOCOL))
        write_manifest(tmp, FILES, params=params)
    return target
