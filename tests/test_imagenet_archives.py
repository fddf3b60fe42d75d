"""ImageNet's archive path: the data stage has torchvision extract tiny archives written in the official
formats (md5-checked), records what it prepared, reads it back, prepares only once, and refuses a
corrupted archive by its path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision.datasets.imagenet as tv_imagenet
from torchvision.models._meta import _IMAGENET_CATEGORIES

from tskd.data import DatasetError
from tskd.data import imagenet as family
from tskd.data.imagenet_archives import DEVKIT, TRAIN, VAL, val_wnids, write_imagenet_archives
from tskd.data.synthetic_imagenet import wnid
from tskd.spec.config import ImageNetData, RecipeCfg

ARGS = {"seed": 0, "classes": 3, "train_per_class": 4, "val_per_class": 2, "image_size": 16}
WNIDS = [wnid(c) for c in range(ARGS["classes"])]
RECIPE = RecipeCfg(epochs=1, batch_size=4, lr=0.05, normalization="imagenet")


def _cfg(root: Path) -> ImageNetData:
    return ImageNetData(name="imagenet", root=str(root), crop=12, resize=14)


@pytest.fixture
def archives(tmp_path, monkeypatch) -> tuple[Path, dict[str, str]]:
    """The three archives in a dataset root, and torchvision told that their md5s are the official ones."""
    root = tmp_path / "imagenet"
    md5s = write_imagenet_archives(root, **ARGS)
    # The only stand-in in this test: the official md5s are those of the real 150 GB archives, which
    # cannot exist here, so both names of torchvision's table (its own, which its parsers check against,
    # and the one tskd.data.imagenet imported by name, which the identity is built from) get ours.
    patched = {split: (name, md5s[name]) for split, (name, _) in tv_imagenet.ARCHIVE_META.items()}
    monkeypatch.setattr(tv_imagenet, "ARCHIVE_META", patched)
    monkeypatch.setattr(family, "ARCHIVE_META", patched)
    return root, md5s


def _files(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every extracted file (and meta.bin) with its inode, mtime and ctime: any rewrite changes one."""
    paths = [root / family.META_FILE, *(p for s in family.SPLITS for p in (root / s).rglob("*"))]
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_ctime_ns)
            for p in paths}


def test_the_archives_are_prepared_once_and_read_back(archives, monkeypatch):
    root, md5s = archives
    identity = "imagenet official archives md5:" + ",".join(md5s[n] for n in (TRAIN, VAL, DEVKIT))
    out = family.prepare(_cfg(root))
    assert out == {"name": "imagenet", "family": "imagenet", "root": str(root), "identity": identity,
                   "synthetic": False, "num_classes": 3, "train": 12, "test": 6}

    # torchvision's layout: a folder per wnid in each split, the inner per-class tars gone.
    for split, per_class in (("train", ARGS["train_per_class"]), ("val", ARGS["val_per_class"])):
        assert sorted(p.name for p in (root / split).iterdir()) == WNIDS
        for w in WNIDS:
            assert len(list((root / split / w).glob("*.JPEG"))) == per_class
    assert sorted(p.name for p in (root / "train" / WNIDS[1]).iterdir()) == [f"{WNIDS[1]}_{k}.JPEG"
                                                                             for k in range(1, 5)]
    # meta.bin from meta.mat: the leaf synsets only (the non-leaf ones are left out), their words split
    # into class names; and the wnid of each validation image, from the ground truth through the ids.
    wnid_to_classes, val_order = torch.load(root / family.META_FILE, weights_only=True)
    assert wnid_to_classes == {w: (_IMAGENET_CATEGORIES[c], f"synthetic class {c}") for c, w in enumerate(WNIDS)}
    expected_val = val_wnids(seed=0, classes=3, val_per_class=2)
    assert val_order == expected_val and len(set(expected_val[:3])) > 1  # classes interleaved, as in the real set
    for j, w in enumerate(expected_val, start=1):
        assert (root / "val" / w / f"ILSVRC2012_val_{j:08d}.JPEG").is_file()

    assert sorted(p.name for p in root.iterdir()) == sorted([TRAIN, VAL, DEVKIT, "meta.bin", family.PREPARED,
                                                             "train", "val"])
    record = json.loads((root / family.PREPARED).read_text())
    assert record == {"identity": identity, "verified_by": "official md5", "classes": 3, "train": 12, "val": 6}

    splits = family.load_splits(_cfg(root), RECIPE)
    assert splits.num_classes == 3 and len(splits.train) == 12 and len(splits.test) == 6
    assert (splits.name, splits.verified_by, splits.identity) == ("imagenet", "official md5", identity)
    assert splits.classes[0] == "tench, synthetic class 0"
    x, y, _ = splits.train[0]
    assert x.shape == (3, 12, 12) and x.dtype == torch.float32 and y == 0
    assert splits.test[0][0].shape == (3, 12, 12) and splits.image_size == (12, 12)

    # Prepared once: with the archives still there, a second data stage extracts nothing and
    # rewrites no file; the record stays the same.
    before = _files(root)

    def no_extraction(*args, **kwargs):
        raise AssertionError(f"extracted again: {args}")

    monkeypatch.setattr(tv_imagenet, "extract_archive", no_extraction)
    assert family.prepare(_cfg(root)) == out
    assert _files(root) == before
    assert json.loads((root / family.PREPARED).read_text()) == record

    # The archives moved away (say, to free their space): the prepared layout is still accepted and
    # keeps the archives' identity, so the runs made on it are not retrained.
    for name in md5s:
        (root / name).rename(root.parent / name)
    again = family.prepare(_cfg(root))
    assert again == out and _files(root) == before
    assert family.load_splits(_cfg(root), RECIPE).identity == record["identity"]


def test_a_corrupted_devkit_is_refused_by_its_path(archives):
    root, _ = archives
    devkit = root / DEVKIT
    data = bytearray(devkit.read_bytes())
    data[-9] ^= 0xFF  # one byte of the gzip stream: the md5 is no longer the official one
    devkit.write_bytes(bytes(data))
    with pytest.raises(DatasetError) as e:
        family.prepare(_cfg(root))
    assert str(devkit) in str(e.value) and str(root / TRAIN) not in str(e.value)
    assert "preparing the train split from the archives failed" in str(e.value)
    assert "is not present in the root directory or is corrupted" in str(e.value)
    # Refused before anything was extracted or recorded.
    assert sorted(p.name for p in root.iterdir()) == sorted([TRAIN, VAL, DEVKIT])


def test_an_interrupted_extraction_is_redone(archives, monkeypatch):
    root, _ = archives
    extract = tv_imagenet.extract_archive
    calls = []

    def killed_midway(from_path, *args, **kwargs):
        # The devkit, the outer train tar and one class's tar extract; the run is killed on the next class.
        calls.append(Path(from_path).name)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return extract(from_path, *args, **kwargs)

    monkeypatch.setattr(tv_imagenet, "extract_archive", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        family.prepare(_cfg(root))
    assert (root / "train").is_dir() and calls[:2] == [DEVKIT, TRAIN]
    monkeypatch.setattr(tv_imagenet, "extract_archive", extract)
    assert family.prepare(_cfg(root))["train"] == 12
    for w in WNIDS:
        assert len(list((root / "train" / w).glob("*.JPEG"))) == ARGS["train_per_class"]
    assert not list((root / "train").glob("*.tar"))
    assert sorted(p.name for p in root.iterdir()) == sorted([TRAIN, VAL, DEVKIT, "meta.bin", family.PREPARED,
                                                             "train", "val"])  # no marker left


def test_an_interrupted_extraction_without_its_archives_is_refused(archives, monkeypatch):
    root, _ = archives
    family.prepare(_cfg(root))
    (root / ".train.tskd-extracting").touch()  # as a kill during train's extraction leaves it
    for name in (TRAIN, VAL, DEVKIT):
        (root / name).unlink()
    with pytest.raises(DatasetError, match=f"{root / 'train'}: its extraction from the archives was interrupted"):
        family.prepare(_cfg(root))


def test_equal_arguments_give_equal_archives(tmp_path):
    md5s = write_imagenet_archives(tmp_path / "a", **ARGS)
    assert write_imagenet_archives(tmp_path / "b", **ARGS) == md5s
    assert not [p for p in (tmp_path / "a").iterdir() if p.name not in md5s]  # no temporary file left
    other = write_imagenet_archives(tmp_path / "c", **{**ARGS, "seed": 1})
    assert all(other[n] != md5s[n] for n in md5s)
