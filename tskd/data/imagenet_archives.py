"""A tiny ILSVRC2012 in the official archive formats, for testing the data stage's archive path.

Writes the three files the ``imagenet`` family's data stage expects in ``dataset.root``, each
laid out as torchvision's ``parse_devkit_archive``, ``parse_train_archive`` and
``parse_val_archive`` read the real ones:

* ``ILSVRC2012_img_train.tar``: one ``<wnid>.tar`` per class, each holding ``<wnid>_<n>.JPEG``;
* ``ILSVRC2012_img_val.tar``: flat ``ILSVRC2012_val_<8 digits>.JPEG`` files, classes interleaved;
* ``ILSVRC2012_devkit_t12.tar.gz``: ``ILSVRC2012_devkit_t12/data/meta.mat`` (the ``synsets``
  struct array: leaf synsets, the classes, first, then non-leaf ones with ``num_children`` > 0
  that torchvision leaves out) and ``ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt``
  (one ``ILSVRC2012_ID`` a line, in validation file order).

As in the real devkit, a class's ``ILSVRC2012_ID`` is not its index among the sorted wnids (the
ids are a seeded permutation), so the ground truth has to be read through meta.mat. The images
are the synthetic ImageNet's (``tskd.data.synthetic_imagenet``: the synthetic CIFAR-100 classes,
scaled and JPEG-encoded), wnids the same made-up ``n00000000`` …, class names ImageNet's own.
Equal arguments give equal bytes (fixed tar and gzip headers, member order and MAT-file header),
so equal md5s; each archive is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np

from tskd.data.integrity import DatasetError
from tskd.data.synthetic import synthetic_cifar100_arrays
from tskd.data.synthetic_imagenet import _jpeg, wnid
from tskd.io import atomic_write_bytes

TRAIN, VAL, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"
DEVKIT_DIR = "ILSVRC2012_devkit_t12"
MTIME = 1_337_000_000  # a fixed member time (May 2012): the bytes must not depend on when they were written
# meta.mat's synset fields, in the devkit's order (torchvision reads fields 0-2 and 4 by position).
SYNSET_FIELDS = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
                 "num_train_images")
_MAT_DESCRIPTION = b"MATLAB 5.0 MAT-file, written by tskd.data.imagenet_archives"


def _plan(seed: int, classes: int, val_per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """(ILSVRC2012_ID of each class index, class index of each validation image in file order)."""
    ids = np.random.default_rng([seed, 3]).permutation(classes) + 1
    val = np.random.default_rng([seed, 4]).permutation(np.repeat(np.arange(classes), val_per_class))
    return ids, val


def val_wnids(*, seed: int, classes: int, val_per_class: int) -> list[str]:
    """The wnid of each validation image, in file-name order (what torchvision puts in meta.bin)."""
    return [wnid(int(c)) for c in _plan(seed, classes, val_per_class)[1]]


def _tar(members: list[tuple[str, bytes | None]]) -> bytes:
    """An uncompressed tar of (name, bytes) members, None for a directory; fixed owner and time."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.uname, info.gname = MTIME, 0, 0, "", ""
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _gzip(data: bytes) -> bytes:
    buf = io.BytesIO()
    # No file name and a fixed time in the gzip header (by default both vary).
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=MTIME) as gz:
        gz.write(data)
    return buf.getvalue()


def _meta_mat(classes: int, ids: np.ndarray, train_per_class: int) -> bytes:
    """meta.mat: the leaf synsets (the classes) by ILSVRC2012_ID, then a two-level hierarchy above them."""
    import scipy.io
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    by_id = sorted(range(classes), key=lambda c: ids[c])
    rows = [(int(ids[c]), wnid(c), f"{_IMAGENET_CATEGORIES[c]}, synthetic class {c}",
             f"the synthetic ImageNet's class {c}", 0, np.zeros((0, 0)), 0, train_per_class) for c in by_id]
    # Non-leaf synsets (num_children != 0, not classes): a parent per two leaves, and a root above them.
    leaf_ids = [int(ids[c]) for c in by_id]
    groups = [leaf_ids[i:i + 2] for i in range(0, classes, 2)]
    parent_ids = [classes + 1 + g for g in range(len(groups))]
    for g, (pid, children) in enumerate(zip(parent_ids, groups, strict=True)):
        rows.append((pid, f"n9{g:07d}", f"synthetic group {g}", "a group of classes", len(children),
                     np.array([children]), 1, train_per_class * len(children)))
    rows.append((parent_ids[-1] + 1, "n99999999", "synthetic entity", "every class", len(parent_ids),
                 np.array([parent_ids]), 2, train_per_class * classes))
    synsets = np.empty((len(rows), 1), dtype=[(f, object) for f in SYNSET_FIELDS])
    for i, row in enumerate(rows):
        synsets[i, 0] = row
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": synsets})
    data = bytearray(buf.getvalue())
    # The MAT-file header's 116-byte text carries the writing time; fix it (readers ignore it).
    data[:116] = _MAT_DESCRIPTION.ljust(116, b" ")
    return bytes(data)


def write_imagenet_archives(dest: Path, *, seed: int, classes: int, train_per_class: int, val_per_class: int,
                            image_size: int) -> dict[str, str]:
    """Write the three archives into ``dest``; return each one's md5 by file name."""
    if not 2 <= classes <= 100:
        raise DatasetError(f"ImageNet archives: classes must be 2..100 (the synthetic classes), got {classes}")
    arrays = synthetic_cifar100_arrays(seed=seed, train_per_class=train_per_class, test_per_class=val_per_class)
    images: dict[str, dict[int, list[bytes]]] = {}
    for split, (labels, data) in arrays.items():
        per_class = images[split] = {c: [] for c in range(classes)}
        for label, pixels in zip(labels.tolist(), data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), strict=True):
            if label < classes:
                per_class[label].append(_jpeg(pixels, image_size))
    ids, val_labels = _plan(seed, classes, val_per_class)

    train = _tar([(f"{wnid(c)}.tar", _tar([(f"{wnid(c)}_{k + 1}.JPEG", jpeg)
                                           for k, jpeg in enumerate(images["train"][c])]))
                  for c in range(classes)])
    taken = {c: iter(images["test"][c]) for c in range(classes)}
    val = _tar([(f"ILSVRC2012_val_{j + 1:08d}.JPEG", next(taken[int(c)])) for j, c in enumerate(val_labels)])
    truth = "".join(f"{ids[int(c)]}\n" for c in val_labels).encode()
    devkit = _gzip(_tar([(f"{DEVKIT_DIR}/", None), (f"{DEVKIT_DIR}/data/", None),
                         (f"{DEVKIT_DIR}/data/meta.mat", _meta_mat(classes, ids, train_per_class)),
                         (f"{DEVKIT_DIR}/data/ILSVRC2012_validation_ground_truth.txt", truth)]))

    dest = Path(dest)
    md5s = {}
    for name, data in ((TRAIN, train), (VAL, val), (DEVKIT, devkit)):
        atomic_write_bytes(dest / name, data)
        md5s[name] = hashlib.md5(data).hexdigest()
    return md5s
