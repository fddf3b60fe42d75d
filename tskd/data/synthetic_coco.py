"""A tiny COCO 2017, written in the official layout that the ``coco`` family reads, and its three zips.

Layout (as cocodataset.org's archives extract): ``train2017/<12-digit id>.jpg``,
``val2017/<12-digit id>.jpg``, ``annotations/instances_train2017.json`` and
``annotations/instances_val2017.json`` with ``info``, ``licenses``, ``images``, ``annotations``
(``id``, ``image_id``, ``category_id``, ``bbox`` XYWH, ``area``, ``iscrowd``, ``segmentation``:
polygons for single objects, uncompressed RLE for crowds, as COCO has them) and ``categories``
(``supercategory``, ``id``, ``name``).

Content, learnable by a small detector in a few CPU epochs: filled shapes, one shape kind and one
saturated colour per category, a third to three fifths of the shorter side, on textured noise of
low saturation. Categories are COCO's own ids and names, taken in order from 1, 3, 7, 18, 44, 62, 85,
90: not contiguous, so ``num_classes`` (max id + 1) and the label of each box are tested as for the
real set. Image ids are sparse and listed out of order, as COCO's are. Each split also holds what
the reader has to handle: images without any annotation, crowd annotations (a cluster of small
shapes, one RLE box), degenerate boxes (a sliver at most 1 px wide or high), tiny but valid boxes
(4-8 px), and an image whose only annotations are a crowd and a degenerate box.

Equal arguments give equal bytes. ``write_synthetic_coco`` records every file's sha256 and the
parameters in ``tskd_manifest.json`` and installs the directory atomically;
``write_synthetic_coco_zips`` writes ``train2017.zip``, ``val2017.zip`` and
``annotations_trainval2017.zip`` (fixed member times) for testing the archive path.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tskd.data.integrity import DatasetError, holds_current, staged_dir, write_manifest
from tskd.io import atomic_write_bytes

GENERATOR_VERSION = 1
JPEG_QUALITY = 90
SPLITS = ("train2017", "val2017")
ANNOTATION_FILES = {s: f"annotations/instances_{s}.json" for s in SPLITS}
ZIPS = {"train2017.zip": "train2017", "val2017.zip": "val2017", "annotations_trainval2017.zip": "annotations"}
ZIP_TIME = (2017, 9, 1, 0, 0, 0)  # a fixed member time: the zips' md5s must not depend on when they were written

# (COCO id, name, supercategory) as in COCO 2017, and the shape and colour (RGB) that stand for it here.
CATEGORIES: tuple[tuple[int, str, str, str, tuple[int, int, int]], ...] = (
    (1, "person", "person", "ellipse", (225, 35, 35)),
    (3, "car", "vehicle", "rectangle", (35, 85, 235)),
    (7, "train", "vehicle", "triangle", (245, 205, 25)),
    (18, "dog", "animal", "diamond", (30, 195, 60)),
    (44, "bottle", "kitchen", "cross", (205, 50, 225)),
    (62, "chair", "furniture", "star", (250, 125, 15)),
    (85, "clock", "indoor", "hexagon", (25, 205, 215)),
    (90, "toothbrush", "indoor", "arrow", (250, 250, 250)),
)
MAX_CATEGORIES = len(CATEGORIES)
# Images of each split with a role other than plain objects: at least one each, about this share.
_ROLE_SHARE = {"empty": 0.08, "crowd": 0.1, "degenerate": 0.1, "tiny": 0.1, "only_dropped": 0.04}


def _outline(kind: str) -> np.ndarray:
    """The shape's polygon, scaled so that its extents are exactly [-1, 1] on both axes."""
    if kind == "rectangle":
        p = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif kind == "ellipse":
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        p = list(zip(np.cos(t), np.sin(t), strict=True))
    elif kind == "triangle":
        p = [(0, -1), (1, 1), (-1, 1)]
    elif kind == "diamond":
        p = [(0, -1), (1, 0), (0, 1), (-1, 0)]
    elif kind == "cross":
        a = 1 / 3
        p = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a),
             (-a, -a)]
    elif kind == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        p = list(zip(r * np.cos(t), r * np.sin(t), strict=True))
    elif kind == "hexagon":
        t = np.arange(6) * np.pi / 3
        p = list(zip(np.cos(t), np.sin(t), strict=True))
    elif kind == "arrow":
        p = [(-1, -0.35), (0.2, -0.35), (0.2, -1), (1, 0), (0.2, 1), (0.2, 0.35), (-1, 0.35)]
    else:
        raise ValueError(kind)
    q = np.asarray(p, dtype=np.float64)
    lo, hi = q.min(axis=0), q.max(axis=0)
    return (q - lo) / (hi - lo) * 2 - 1


def _polygon(kind: str, box: tuple[float, float, float, float]) -> np.ndarray:
    """The shape's vertices (k x 2, x then y) filling ``box`` = (x0, y0, x1, y1) exactly."""
    x0, y0, x1, y1 = box
    q = _outline(kind)
    return np.stack([x0 + (q[:, 0] + 1) / 2 * (x1 - x0), y0 + (q[:, 1] + 1) / 2 * (y1 - y0)], axis=1)


def _shoelace(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _rle(mask: np.ndarray) -> dict[str, Any]:
    """Uncompressed RLE, as COCO's crowd annotations hold it: run lengths over the column-major
    pixels, starting with a run of zeros (0 when the first pixel is set)."""
    flat = mask.flatten(order="F").astype(np.uint8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Textured noise of low saturation: a tinted grey, smooth blotches, a stripe pattern, pixel noise."""
    from PIL import Image

    base = rng.uniform(70, 160) + rng.uniform(-12, 12, size=3)
    blotches = np.stack([
        np.asarray(Image.fromarray(rng.integers(0, 256, size=(5, 5), dtype=np.uint8)).resize(
            (w, h), Image.Resampling.BICUBIC), dtype=np.float64) - 128 for _ in range(3)], axis=-1)
    blotches = blotches.mean(axis=-1, keepdims=True) * 0.3 + blotches * 0.05  # mostly grey
    yy, xx = np.mgrid[0:h, 0:w]
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 24)
    stripes = 12 * np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period)[..., None]
    noise = rng.normal(0, 10, size=(h, w, 3))
    return base + blotches + stripes + noise


def _categories(rng: np.random.Generator, n: int) -> Iterator[int]:
    """Category indices in shuffled blocks of all n: every category is drawn about as often."""
    while True:
        yield from rng.permutation(n).tolist()


def _free_box(rng: np.random.Generator, w: int, h: int, bw: float, bh: float, taken: list[tuple[float, ...]],
              *, must: bool = False) -> tuple[float, float, float, float] | None:
    """A ``bw`` x ``bh`` box inside the image (1 px margin) that meets none of the ``taken`` ones (shapes
    drawn over each other would make a few epochs' learning harder), or None when none was found
    (``must``: then one that may overlap)."""
    bw, bh = min(w - 3.0, bw), min(h - 3.0, bh)
    for attempt in range(30):
        x0, y0 = float(rng.uniform(1, w - 1 - bw)), float(rng.uniform(1, h - 1 - bh))
        box = (x0, y0, x0 + bw, y0 + bh)
        free = all(box[2] <= t[0] or t[2] <= box[0] or box[3] <= t[1] or t[3] <= box[1] for t in taken)
        if free or (must and attempt == 29):
            taken.append(box)
            return box
    return None


def _round(values: Any) -> list[float]:
    return [round(float(v), 2) for v in values]


def _plan_roles(rng: np.random.Generator, n: int) -> list[str]:
    roles = ["objects"] * n
    order = iter(rng.permutation(n).tolist())
    for role, share in _ROLE_SHARE.items():
        for _ in range(max(1, round(share * n))):
            roles[next(order)] = role
    return roles


def _draw_image(rng: np.random.Generator, image_id: int, role: str, w: int, h: int, cats: tuple,
                draw_category: Iterator[int], next_ann: Iterator[int]) -> tuple[bytes, list[dict]]:
    """One JPEG image of ``role`` and its annotations."""
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(np.clip(_background(rng, h, w), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    taken: list[tuple[float, ...]] = []
    annotations: list[dict] = []

    def colour(c: int) -> tuple[int, ...]:
        return tuple(int(np.clip(v + rng.integers(-12, 13), 0, 255)) for v in cats[c][4])

    def add(c: int, bbox: list[float], area: float, segmentation: Any, crowd: int) -> None:
        annotations.append({"segmentation": segmentation, "area": round(float(area), 2), "iscrowd": crowd,
                            "image_id": image_id, "bbox": _round(bbox), "category_id": cats[c][0],
                            "id": next(next_ann)})

    def shape(c: int, box: tuple[float, ...]) -> None:
        poly = _polygon(cats[c][3], box)
        draw.polygon([tuple(v) for v in poly], fill=colour(c))
        add(c, [box[0], box[1], box[2] - box[0], box[3] - box[1]], _shoelace(poly), [_round(poly.reshape(-1))], 0)

    short = min(w, h)
    # The special cases first, so that they find room; then the plain objects, where they fit.
    if role in ("crowd", "only_dropped"):
        # A crowd: several small shapes of one category close together, annotated as one RLE box.
        c = next(draw_category)
        region = _free_box(rng, w, h, short * 0.35, short * 0.35, taken, must=True)
        mask_image = Image.new("L", (w, h), 0)
        mask_draw = ImageDraw.Draw(mask_image)
        rw, rh = region[2] - region[0], region[3] - region[1]
        for _ in range(5):
            s = min(rw, rh) * rng.uniform(0.25, 0.4)
            x0, y0 = region[0] + rng.uniform(0, rw - s), region[1] + rng.uniform(0, rh - s)
            poly = [tuple(v) for v in _polygon(cats[c][3], (x0, y0, x0 + s, y0 + s))]
            draw.polygon(poly, fill=colour(c))
            mask_draw.polygon(poly, fill=1)
        mask = np.asarray(mask_image, dtype=np.uint8)
        ys, xs = np.nonzero(mask)
        add(c, [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1], mask.sum(), _rle(mask), 1)
    if role in ("degenerate", "only_dropped"):
        # A sliver at most 1 px across (COCO has a few such boxes): dropped from training targets.
        c = next(draw_category)
        thin, long = float(rng.choice([0.5, 1.0])), float(rng.uniform(10, short * 0.4))
        bw, bh = (thin, long) if rng.random() < 0.5 else (long, thin)
        x0, y0, _, _ = _free_box(rng, w, h, bw, bh, taken, must=True)
        draw.rectangle([x0, y0, x0 + bw, y0 + bh], fill=colour(c))
        poly = np.array([(x0, y0), (x0 + bw, y0), (x0 + bw, y0 + bh), (x0, y0 + bh)])
        add(c, [x0, y0, bw, bh], bw * bh, [_round(poly.reshape(-1))], 0)
    if role == "tiny":
        side = rng.uniform(4, 8)
        shape(next(draw_category), _free_box(rng, w, h, side, side * rng.uniform(0.8, 1.25), taken, must=True))
    for k in range({"empty": 0, "only_dropped": 0}.get(role, int(rng.integers(1, 4)))):
        side = short * rng.uniform(0.3, 0.6)
        # The first plain object always (every such image trains); the others only where they fit.
        box = _free_box(rng, w, h, side * rng.uniform(0.8, 1.25), side * rng.uniform(0.8, 1.25), taken,
                        must=k == 0)
        if box is not None:
            shape(next(draw_category), box)
    # Mild noise over the objects too, so that no pixel value alone gives a category away.
    out = np.asarray(canvas, dtype=np.float64) + rng.normal(0, 5, size=(h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), annotations


def _draw_split(rng: np.random.Generator, split: str, image_ids: list[int], next_ann: Iterator[int],
                cats: tuple, size_range: tuple[int, int]) -> tuple[dict[str, bytes], list[dict], list[dict]]:
    """The JPEG files of one split, its ``images`` and its ``annotations`` entries."""
    files: dict[str, bytes] = {}
    images: list[dict] = []
    annotations: list[dict] = []
    draw_category = _categories(rng, len(cats))
    for image_id, role in zip(image_ids, _plan_roles(rng, len(image_ids)), strict=True):
        w, h = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
        jpeg, anns = _draw_image(rng, image_id, role, w, h, cats, draw_category, next_ann)
        annotations += anns
        name = f"{image_id:012d}.jpg"  # COCO's file names: the image id, 12 digits
        files[f"{split}/{name}"] = jpeg
        images.append({"license": 1, "file_name": name, "coco_url": "", "height": h, "width": w,
                       "date_captured": "2013-11-14 11:18:45", "flickr_url": "", "id": image_id})
    return files, images, annotations


def synthetic_coco_files(*, seed: int, train_images: int, val_images: int, image_size: tuple[int, int],
                         categories: int) -> dict[str, bytes]:
    """Every file of the set (relative path -> bytes): both image folders and both instances files."""
    if not 1 <= categories <= MAX_CATEGORIES:
        raise DatasetError(f"synthetic COCO: categories must be 1..{MAX_CATEGORIES}, got {categories}")
    if min(train_images, val_images) < 8:
        raise DatasetError(f"synthetic COCO: at least 8 train and 8 val images (each split holds empty, crowd, "
                           f"degenerate and tiny cases), got {train_images} and {val_images}")
    lo, hi = image_size
    if not 48 <= lo <= hi:
        raise DatasetError(f"synthetic COCO: image_size must be a range (min, max) with 48 <= min <= max, got "
                           f"{image_size}")
    cats = CATEGORIES[:categories]
    # Sparse image ids, unique over both splits, listed out of order (COCO's are).
    ids = np.random.default_rng([seed, 0]).choice(np.arange(1, 600_000), size=train_images + val_images,
                                                  replace=False).tolist()
    ann_ids = iter(range(900_001, 10**9))  # unique over both files, as COCO's are
    files: dict[str, bytes] = {}
    info = {"description": "tskd synthetic COCO 2017", "url": "", "version": "1.0", "year": 2017,
            "contributor": "tskd.data.synthetic_coco", "date_created": "2017/09/01"}
    licenses = [{"url": "", "id": 1, "name": "synthetic, no rights reserved"}]
    categories_json = [{"supercategory": sup, "id": cid, "name": name} for cid, name, sup, _, _ in cats]
    for k, (split, split_ids) in enumerate(((SPLITS[0], ids[:train_images]), (SPLITS[1], ids[train_images:]))):
        images_files, images, annotations = _draw_split(np.random.default_rng([seed, 1 + k]), split, split_ids,
                                                        ann_ids, cats, (lo, hi))
        files |= images_files
        instances = {"info": info, "licenses": licenses, "images": images, "annotations": annotations,
                     "categories": categories_json}
        files[ANNOTATION_FILES[split]] = json.dumps(instances, separators=(",", ":")).encode()
    return files


def write_synthetic_coco(root: str | Path, *, seed: int, train_images: int, val_images: int,
                         image_size: tuple[int, int], categories: int = 5) -> Path:
    """Write the tiny COCO into ``root`` (a directory of its own) with its manifest; return ``root``.

    ``image_size`` = (smallest, largest) width or height, px. Kept as is when ``root`` already holds
    intact data of the same parameters; replaced when it holds other tskd-written data; refused
    (DatasetError) when it holds anything else.
    """
    params = {"generator": "tskd.data.synthetic_coco", "version": GENERATOR_VERSION, "seed": seed,
              "train_images": train_images, "val_images": val_images, "image_size": list(image_size),
              "categories": categories}
    root = Path(root)
    required = tuple(ANNOTATION_FILES.values())
    if holds_current(root, params, required=required, what="a real COCO"):
        return root
    files = synthetic_coco_files(seed=seed, train_images=train_images, val_images=val_images,
                                 image_size=image_size, categories=categories)
    with staged_dir(root) as tmp:
        for rel, data in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        write_manifest(tmp, files, params=params)
    return root


def _zip(members: dict[str, bytes], folder: str) -> bytes:
    """A zip of ``folder/`` and its members in name order, fixed times and modes: equal input, equal bytes.
    JPEG files are stored (deflate gains nothing on them), JSON deflated, as in the official archives."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        entry = zipfile.ZipInfo(f"{folder}/", date_time=ZIP_TIME)
        entry.external_attr = (0o40755 << 16) | 0x10
        z.writestr(entry, b"")
        for name in sorted(members):
            info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            info.external_attr = 0o100644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED if name.endswith(".json") else zipfile.ZIP_STORED
            z.writestr(info, members[name])
    return buf.getvalue()


def write_synthetic_coco_zips(dest: str | Path, *, seed: int, train_images: int, val_images: int,
                              image_size: tuple[int, int], categories: int = 5) -> dict[str, str]:
    """Write ``train2017.zip``, ``val2017.zip`` and ``annotations_trainval2017.zip`` of the tiny COCO
    into ``dest`` (each atomically); return each zip's md5, by file name."""
    files = synthetic_coco_files(seed=seed, train_images=train_images, val_images=val_images,
                                 image_size=image_size, categories=categories)
    dest = Path(dest)
    md5s = {}
    for name, folder in ZIPS.items():
        data = _zip({rel: b for rel, b in files.items() if rel.startswith(f"{folder}/")}, folder)
        atomic_write_bytes(dest / name, data)
        md5s[name] = hashlib.md5(data).hexdigest()
    return md5s


def category_table(categories: int) -> dict[int, str]:
    """COCO id -> name of the first ``categories`` synthetic categories."""
    return {cid: name for cid, name, *_ in CATEGORIES[:categories]}


__all__ = ["CATEGORIES", "ZIPS", "category_table", "synthetic_coco_files", "write_synthetic_coco",
           "write_synthetic_coco_zips"]
