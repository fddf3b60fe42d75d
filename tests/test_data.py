"""CIFAR-100 data: the synthetic writer, the verified torchvision reader, the splits."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from tskd.data import DatasetError, IntegrityError
from tskd.data.cifar import NORMALIZATION, VerifiedCIFAR100, cifar100_datasets, stratified_split
from tskd.data.integrity import MANIFEST_NAME, read_manifest, write_manifest
from tskd.data.synthetic import (
    COARSE_LABEL_NAMES,
    FILES,
    FINE_LABEL_NAMES,
    FINE_TO_COARSE,
    synthetic_cifar100_arrays,
    write_synthetic_cifar100,
)

TRAIN_PER_CLASS, TEST_PER_CLASS = 6, 3


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_cifar100(root, seed=0, train_per_class=TRAIN_PER_CLASS, test_per_class=TEST_PER_CLASS)
    return root


@pytest.fixture
def synth_copy(synth_root, tmp_path) -> Path:
    """A private copy to damage."""
    shutil.copytree(synth_root / "cifar-100-python", tmp_path / "cifar-100-python")
    return tmp_path


def _load(root, **kw):
    return cifar100_datasets(root, download=False, normalization="cifar100", **kw)


# --- format ----------------------------------------------------------------------------------------


def test_official_file_layout(synth_root):
    folder = synth_root / "cifar-100-python"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*FILES, MANIFEST_NAME])
    with open(folder / "train", "rb") as f:
        train = pickle.load(f, encoding="latin1")
    assert list(train) == ["filenames", "batch_label", "fine_labels", "coarse_labels", "data"]
    assert train["data"].dtype == np.uint8 and train["data"].shape == (100 * TRAIN_PER_CLASS, 3072)
    assert [FINE_TO_COARSE[y] for y in train["fine_labels"]] == train["coarse_labels"]
    assert all(isinstance(n, str) for n in train["filenames"])
    with open(folder / "meta", "rb") as f:
        meta = pickle.load(f, encoding="latin1")
    assert meta["fine_label_names"][:3] == ["apple", "aquarium_fish", "baby"]
    assert meta["fine_label_names"][-1] == "worm" and len(set(meta["fine_label_names"])) == 100
    assert len(meta["coarse_label_names"]) == 20 and meta["coarse_label_names"][12] == "medium_mammals"
    assert FINE_TO_COARSE[:10] == (4, 1, 14, 8, 0, 6, 7, 7, 18, 3)  # the official fine -> coarse map


def test_unmodified_torchvision_reader_reads_it(synth_root, monkeypatch):
    # Only the official md5 check stands between the stock reader and our files.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    for train, n in ((True, TRAIN_PER_CLASS), (False, TEST_PER_CLASS)):
        ds = torchvision.datasets.CIFAR100(str(synth_root), train=train)
        assert ds.data.shape == (100 * n, 32, 32, 3)
        assert sorted(set(ds.targets)) == list(range(100))
        assert ds.classes == list(FINE_LABEL_NAMES)


def test_verified_reader_both_splits(synth_root):
    for train, n in ((True, TRAIN_PER_CLASS), (False, TEST_PER_CLASS)):
        ds = VerifiedCIFAR100(synth_root, train=train)
        assert ds.verified_by == "manifest"
        assert ds.data.shape == (100 * n, 32, 32, 3) and ds.data.dtype == np.uint8
        assert np.bincount(ds.targets).tolist() == [n] * 100
        assert ds.classes == list(FINE_LABEL_NAMES) and len(COARSE_LABEL_NAMES) == 20


def test_items_are_image_label_index(synth_root):
    splits = _load(synth_root)
    assert splits.num_classes == 100 and len(splits.train) == 100 * TRAIN_PER_CLASS
    assert splits.val is None
    assert splits.train_labels.dtype == torch.int64 and len(splits.train_labels) == len(splits.train)
    for ds in (splits.train, splits.test):
        for i in (0, 7, len(ds) - 1):
            image, label, index = ds[i]
            assert isinstance(image, torch.Tensor) and image.shape == (3, 32, 32) and image.dtype == torch.float32
            assert type(label) is int and 0 <= label < 100 and label == int(ds.labels[i])
            assert type(index) is int and index == i


# --- determinism and the writer ---------------------------------------------------------------------


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes_other_seed_differs(synth_root, tmp_path):
    again = write_synthetic_cifar100(tmp_path / "a", seed=0, train_per_class=TRAIN_PER_CLASS,
                                     test_per_class=TEST_PER_CLASS)
    other = write_synthetic_cifar100(tmp_path / "b", seed=1, train_per_class=TRAIN_PER_CLASS,
                                     test_per_class=TEST_PER_CLASS)
    assert _bytes(again) == _bytes(synth_root / "cifar-100-python")
    a, b = _bytes(again), _bytes(other)
    assert a["train"] != b["train"] and a["test"] != b["test"] and a["meta"] == b["meta"]


def test_test_size_does_not_change_train():
    small = synthetic_cifar100_arrays(seed=3, train_per_class=2, test_per_class=1)
    large = synthetic_cifar100_arrays(seed=3, train_per_class=2, test_per_class=4)
    assert np.array_equal(small["train"][1], large["train"][1])


def test_rewrite_is_idempotent_replaces_or_refuses(synth_copy):
    folder = synth_copy / "cifar-100-python"
    # An mtime an hour back: a rewrite would set it to now, whatever the filesystem's resolution.
    past = (folder / "train").stat().st_mtime_ns - 3600 * 10**9
    os.utime(folder / "train", ns=(past, past))
    before = (folder / "train").stat().st_mtime_ns
    write_synthetic_cifar100(synth_copy, seed=0, train_per_class=TRAIN_PER_CLASS, test_per_class=TEST_PER_CLASS)
    assert (folder / "train").stat().st_mtime_ns == before  # same params: kept, no rerun triggered
    write_synthetic_cifar100(synth_copy, seed=0, train_per_class=2, test_per_class=1)
    assert read_manifest(folder)["params"]["train_per_class"] == 2
    assert [p.name for p in synth_copy.iterdir()] == ["cifar-100-python"]  # no leftovers
    (folder / MANIFEST_NAME).unlink()  # now it looks like real data: never overwritten
    with pytest.raises(DatasetError, match="refusing to overwrite"):
        write_synthetic_cifar100(synth_copy, seed=0, train_per_class=2, test_per_class=1)


@pytest.mark.parametrize("bad", [{"seed": -1}, {"train_per_class": 0}, {"test_per_class": 1.5}])
def test_writer_rejects_bad_params(tmp_path, bad):
    kw = {"seed": 0, "train_per_class": 1, "test_per_class": 1, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        write_synthetic_cifar100(tmp_path, **kw)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    import tskd.data.synthetic as synthetic

    def crash(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic, "write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        write_synthetic_cifar100(tmp_path, seed=0, train_per_class=1, test_per_class=1)
    assert list(tmp_path.iterdir()) == []


# --- integrity ----------------------------------------------------------------------------------------


def test_flipped_byte_fails_manifest(synth_copy):
    path = synth_copy / "cifar-100-python" / "test"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match=r"cifar-100-python/test: sha256 does not match"):
        _load(synth_copy)


def test_truncated_train_is_named(synth_copy):
    path = synth_copy / "cifar-100-python" / "train"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DatasetError, match=r"cifar-100-python/train: size 5000 bytes"):
        _load(synth_copy)
    # Even with a manifest that agrees, the unpickling error becomes a clear DatasetError.
    write_manifest(path.parent, FILES, params={})
    with pytest.raises(DatasetError, match=r"cannot read .*cifar-100-python/train .*truncated") as e:
        _load(synth_copy)
    assert not isinstance(e.value, pickle.UnpicklingError)


def test_missing_dataset_says_where_and_how(tmp_path):
    where = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as e:
        _load(where)
    msg = str(e.value)
    assert str(where / "cifar-100-python") in msg and "download: true" in msg and "tskd data synth" in msg


def test_incomplete_dataset_names_missing_file(synth_copy):
    (synth_copy / "cifar-100-python" / "meta").unlink()
    with pytest.raises(DatasetError, match="incomplete .missing meta."):
        _load(synth_copy)


def test_without_manifest_official_md5_is_required(synth_copy):
    (synth_copy / "cifar-100-python" / MANIFEST_NAME).unlink()
    with pytest.raises(IntegrityError, match=r"(?s)cifar-100-python: unregistered, not the official CIFAR-100"
                                             r"\n.*its train does not match the\s+official md5"):
        _load(synth_copy)


def test_download_flag_never_replaces_tskd_data(synth_root):
    # Offline machine: with a manifest present nothing is fetched, the data just loads.
    splits = cifar100_datasets(synth_root, download=True, normalization="cifar10")
    assert splits.verified_by == "manifest"


# --- splits and transforms ------------------------------------------------------------------------------


def test_val_split_deterministic_disjoint_stratified(synth_root):
    a = _load(synth_root, val_fraction=0.34, val_seed=5)
    b = _load(synth_root, val_fraction=0.34, val_seed=5)
    c = _load(synth_root, val_fraction=0.34, val_seed=6)
    assert np.array_equal(a.val.rows, b.val.rows) and not np.array_equal(a.val.rows, c.val.rows)
    assert not set(a.train.rows) & set(a.val.rows)
    assert sorted([*a.train.rows, *a.val.rows]) == list(range(100 * TRAIN_PER_CLASS))
    assert np.bincount(a.val.labels).tolist() == [2] * 100  # round(0.34 * 6) of every class
    assert len(a.train_labels) == len(a.train) == 400
    assert torch.equal(a.val[3][0], a.val[3][0])  # evaluation transform: no random augmentation
    assert a.val[3][2] == 3


def test_stratified_split_keeps_every_class():
    keep, held = stratified_split(np.array([0, 0, 1, 2, 2, 2]), 0.9, seed=0)
    assert set(np.array([0, 0, 1, 2, 2, 2])[keep]) == {0, 1, 2} and len(held) == 3
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(np.zeros(3), 1.0, seed=0)


def test_normalisation_constants(synth_root):
    assert NORMALIZATION["cifar100"] == ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
    mean, std = NORMALIZATION["cifar10"]  # ReviewKD/TSKD: x / 255 of (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)
    assert np.allclose(mean, (0.4914, 0.4822, 0.4465), atol=3e-4) and np.allclose(std, (0.2470, 0.2435, 0.2616),
                                                                                   atol=2e-4)
    with pytest.raises(ValueError, match="normalization"):
        cifar100_datasets(synth_root, download=False, normalization="svhn")


# --- learnability ---------------------------------------------------------------------------------------


def test_synthetic_data_is_learnable():
    """Logistic regression on 8x8-pooled pixels, 20 images per class: far above chance (1 %).

    Cheap on purpose; benchmarks/synthetic_learnability.py shows CNN capacity mattering.
    """
    torch.manual_seed(0)
    data = synthetic_cifar100_arrays(seed=11, train_per_class=20, test_per_class=10)

    def features(split):
        labels, pixels = data[split]
        x = torch.from_numpy(pixels).view(-1, 3, 32, 32).float() / 255
        return nn.functional.avg_pool2d(x - 0.5, 4).flatten(1) * 4, torch.from_numpy(labels).long()

    (x, y), (xt, yt) = features("train"), features("test")
    model = nn.Linear(x.shape[1], 100)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2, weight_decay=1e-4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only contend on a busy machine
    try:
        for _ in range(100):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    assert acc > 0.15, f"test accuracy {acc:.3f} (chance 0.01, usually ~0.4): synthetic data not learnable"


# -- a user's own data in the cifar-100-python layout ----------------------------------------------
def _own_data(root: Path, classes: int = 10, per_class: int = 4, label_shift: int = 0) -> Path:
    """A small real-format dataset of someone's own (digits, say): 10 classes, no manifest."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for split in ("train", "test"):
        labels = [c + label_shift for c in range(classes) for _ in range(per_class)]
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        (folder / split).write_bytes(pickle.dumps({"data": data, "fine_labels": labels,
                                                   "coarse_labels": [0] * len(labels)}))
    names = [f"digit_{c}" for c in range(classes)]
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": names, "coarse_label_names": ["digit"]}))
    return root


@pytest.mark.slow
def test_own_data_is_registered_with_one_command_and_keeps_its_name(tmp_path, make_spec):
    from tests.conftest import run_cli
    from tskd.engine.trainer import train
    from tskd.spec.config import Cifar100Data

    root = _own_data(tmp_path / "digits")
    with pytest.raises(IntegrityError) as e:
        cifar100_datasets(root, download=False, normalization="cifar100")
    assert f"tskd data register {root} --name <name>" in str(e.value)  # the refusal names the fix

    r = run_cli("data", "register", str(root), "--name", "digits")
    assert r.returncode == 0, r.stderr
    assert "10 classes, 40 train / 40 test images" in r.stdout
    manifest = read_manifest(root / "cifar-100-python")
    assert manifest["params"]["registered_as"] == "digits"
    splits = cifar100_datasets(root, download=False, normalization="cifar100")
    assert splits.num_classes == 10 and splits.name == "digits" and splits.verified_by == "manifest"

    m = train(make_spec(dataset=Cifar100Data(root=str(root)), recipe={"epochs": 1, "milestones": [],
                                                                    "augment": ["crop"]}))
    assert m["dataset"] == "digits"
    before = splits.identity
    (root / "cifar-100-python" / "test").write_bytes((root / "cifar-100-python" / "test").read_bytes())
    run_cli("data", "register", str(root), "--name", "digits")
    assert cifar100_datasets(root, download=False, normalization="cifar100").identity == before  # same bytes


def test_registration_refuses_what_the_reader_would_refuse(tmp_path):
    from tskd.data.cifar import register_cifar100_layout

    bad = _own_data(tmp_path / "bad", label_shift=5)  # labels 5..14 for 10 names
    with pytest.raises(DatasetError, match=r"labels outside 0\.\.9"):
        register_cifar100_layout(bad, "bad")
    assert not (bad / "cifar-100-python" / MANIFEST_NAME).exists()  # no record of data that cannot be read
    with pytest.raises(DatasetError, match=f"{tmp_path / 'none' / 'cifar-100-python'}: missing train"):
        register_cifar100_layout(tmp_path / "none", "none")
    with pytest.raises(DatasetError, match="letters, digits"):
        register_cifar100_layout(_own_data(tmp_path / "named"), "my data")


@pytest.mark.parametrize("parts", [(), ("crop",), ("flip",), ("crop", "flip")])
def test_augmentation_parts_are_separate(parts):
    from tskd.data.cifar import train_transform

    names = [type(t).__name__ for t in train_transform("cifar100", parts).transforms]
    assert names[:-2] == [{"crop": "RandomCrop", "flip": "RandomHorizontalFlip"}[p] for p in parts]
    assert names[-2:] == ["ToTensor", "Normalize"]


def test_a_staged_dataset_directory_is_all_or_nothing(tmp_path):
    from tskd.data.integrity import staged_dir

    target = tmp_path / "data"
    with pytest.raises(RuntimeError), staged_dir(target) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("the writer died")
    assert list(tmp_path.iterdir()) == []  # neither the target nor the partial directory is left
    with staged_dir(target) as tmp:
        (tmp / "whole").write_text("x")
    assert [p.name for p in tmp_path.iterdir()] == ["data"] and (target / "whole").is_file()
    assert target.stat().st_mode & 0o777 == 0o755
