"""The device data path (dataset.loader: device): what torchvision's CIFAR augmentation makes, batched.

Every output image is a crop (of the zero-padded source) and optional flip of its source,
normalised to the bit as ToTensor + Normalize do; offsets and flips are uniform and
independent per image; batches, labels and indices are those of the DataLoader path's
order; ranks' parts make up the single-process batch; a seeded epoch replays exactly.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import transforms as T

from tskd.data.cifar import eval_transform
from tskd.data.device_loader import DeviceTrainSet
from tskd.engine.distributed import World
from tskd.engine.loaders import build_run_data
from tskd.spec.config import Cifar100Data, RecipeCfg

pytestmark = pytest.mark.usefixtures("one_thread")

PAD = 4


def _run_data(root: Path, loader: str = "device", augment=("crop", "flip"), val_fraction: float = 0.0,
              normalization: str = "cifar100"):
    recipe = RecipeCfg(epochs=1, batch_size=64, lr=0.1, augment=augment, normalization=normalization)
    return build_run_data(Cifar100Data(root=str(root), loader=loader, val_fraction=val_fraction), recipe)


def _source(data, index: int):
    """The PIL image that the DataLoader path would augment for item ``index``."""
    split = data.train
    return split.source[int(split.rows[index])][0]


def _epoch(data, seed: int, batch_size: int = 64, world: World | None = None):
    loader = data.train_loader(batch_size, torch.Generator().manual_seed(seed), 0, *([world] if world else []))
    return list(loader)


@pytest.mark.parametrize("augment", [("crop", "flip"), ("crop",), ("flip",)])
def test_each_image_is_a_crop_and_flip_of_its_source_normalised_exactly(tiny_cifar, augment):
    data = _run_data(tiny_cifar, augment=augment, val_fraction=0.2, normalization="cifar10")
    assert len(data.train) == 200  # one image of each class held out: the rows are the split's
    # torchvision's own ops on the PIL image: zero padding, ToTensor, Normalize. Normalising is per
    # pixel, so a crop of the normalised padded image is the normalised crop.
    padded = T.Compose([T.Pad(PAD, fill=0), eval_transform("cifar10")])
    seen = set()
    for seed in (0, 1):
        for images, _, indices in _epoch(data, seed):
            assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
            for image, index in zip(images, indices.tolist(), strict=True):
                src = padded(_source(data, index))
                matches = []
                for dy in range(2 * PAD + 1) if "crop" in augment else [PAD]:
                    for dx in range(2 * PAD + 1) if "crop" in augment else [PAD]:
                        crop = src[:, dy:dy + 32, dx:dx + 32]
                        for flip in (False, True) if "flip" in augment else (False,):
                            if torch.equal(image, crop.flip(-1) if flip else crop):
                                matches.append((dy, dx, flip))
                assert matches, f"item {index}: not a crop/flip of its source"
                seen.update(matches)
    # Both flips and the extreme offsets occur: the whole range is in use, not a part of it.
    if "flip" in augment:
        assert {m[2] for m in seen} == {False, True}
    if "crop" in augment:
        assert {m[0] for m in seen} >= {0, 2 * PAD} and {m[1] for m in seen} >= {0, 2 * PAD}


def _coordinate_images(n: int) -> torch.Tensor:
    """Images whose pixels say where they are: channel 0 = row + 1, channel 1 = column + 1 (padding is 0)."""
    rows = torch.arange(1, 33, dtype=torch.uint8).view(32, 1).expand(32, 32)
    images = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    images[:, 0], images[:, 1] = rows, rows.T
    images[:, 2] = torch.arange(n, dtype=torch.uint8).view(n, 1, 1)
    return images


def test_offsets_and_flips_cover_all_162_cases_uniformly_and_independently():
    n, epochs = 64, 80
    data = DeviceTrainSet(_coordinate_images(n), torch.zeros(n, dtype=torch.int64), (0.0,) * 3, (1.0,) * 3)
    counts: Counter = Counter()
    for epoch in range(epochs):
        for images, _, _ in data.epoch(32, torch.Generator().manual_seed(epoch)):
            u = (images * 255).round().to(torch.int64)  # mean 0, std 1: the uint8 values back
            # The centre pixel always reads the source: its row and column give the offset.
            src_row, src_col = u[:, 0, 16, 16] - 1, u[:, 1, 16, 16] - 1
            flip = u[:, 1, 16, 17] < u[:, 1, 16, 16]  # columns run backwards in a flipped image
            dy = src_row - 16 + PAD
            dx = torch.where(flip, src_col - (31 - 16) + PAD, src_col - 16 + PAD)
            counts.update(zip(dy.tolist(), dx.tolist(), flip.tolist(), strict=True))
    cells = {(dy, dx, f) for dy in range(9) for dx in range(9) for f in (False, True)}
    assert set(counts) == cells
    total = n * epochs
    expected = total / len(cells)
    chi2 = sum((counts[c] - expected) ** 2 / expected for c in cells)
    # 161 degrees of freedom: mean 161, sd 18. A fixed seed makes this deterministic; the bound
    # (mean + 8 sd) only catches a real bias (e.g. offsets 0..7, or flips tied to offsets).
    assert chi2 < 161 + 8 * 18, chi2
    flips = sum(v for c, v in counts.items() if c[2]) / total
    assert abs(flips - 0.5) < 0.03


def test_batches_labels_and_indices_are_the_dataloader_paths(tiny_cifar):
    data = _run_data(tiny_cifar)
    reference = _run_data(tiny_cifar, loader="dataloader")
    assert data.train_batches is not None and reference.train_batches is None
    n = len(data.train)
    batches = _epoch(data, seed=5)
    assert len(data.train_loader(64, torch.Generator().manual_seed(5), 0)) == len(batches) == -(-n // 64)
    assert [len(b[2]) for b in batches] == [64] * (n // 64) + ([n % 64] if n % 64 else [])
    indices = torch.cat([b[2] for b in batches])
    assert torch.equal(indices.sort().values, torch.arange(n))  # each item once
    for images, labels, idx in batches:
        assert labels.dtype == torch.int64 and torch.equal(labels, data.train_labels[idx])
        assert images.shape[0] == labels.shape[0] == idx.shape[0]
    # The DataLoader's own order: same generator, same permutation, same batch boundaries.
    ref = _epoch(reference, seed=5)
    assert [b[2].tolist() for b in batches] == [b[2].tolist() for b in ref]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, ref, strict=True))

    again = _epoch(data, seed=5)
    assert all(torch.equal(x, y) for a, b in zip(batches, again, strict=True) for x, y in zip(a, b, strict=True))
    # A run resumed inside the epoch: the remaining batches, as the uninterrupted epoch makes them.
    rest = list(data.train_batches(64, torch.Generator().manual_seed(5), World(), torch.device("cpu"), start=2))
    assert len(rest) == len(batches) - 2
    assert all(torch.equal(x, y) for a, b in zip(batches[2:], rest, strict=True) for x, y in zip(a, b, strict=True))
    other = _epoch(data, seed=6)
    assert not torch.equal(indices, torch.cat([b[2] for b in other]))


@pytest.mark.parametrize("size", [2, 3])
def test_rank_parts_make_up_the_single_process_batch(tiny_cifar, size):
    data = _run_data(tiny_cifar)
    single = _epoch(data, seed=3, batch_size=70)  # 300 = 4 x 70 + 20: a short last batch
    parts = [_epoch(data, seed=3, batch_size=70, world=World(rank, size)) for rank in range(size)]
    assert all(len(p) == len(single) for p in parts)
    for step, whole in enumerate(single):
        for k in range(3):  # images, labels, indices
            joined = torch.cat([p[step][k] for p in parts])
            assert torch.equal(joined, whole[k])
        sizes = [len(p[step][2]) for p in parts]
        assert max(sizes) - min(sizes) <= 1


def test_a_batch_smaller_than_the_world_is_refused():
    from tskd.errors import ParamsError

    data = DeviceTrainSet(_coordinate_images(5), torch.zeros(5, dtype=torch.int64), (0.5,) * 3, (0.2,) * 3)
    with pytest.raises(ParamsError, match="cannot be shared by 3 processes"):
        list(data.epoch(4, torch.Generator().manual_seed(0), World(0, 3)))  # batches of 4, then 1


def test_without_augmentation_the_output_is_the_eval_transform_exactly(tiny_cifar):
    data = _run_data(tiny_cifar, augment=())
    to_tensor = eval_transform("cifar100")
    for images, _, indices in _epoch(data, seed=0):
        expected = torch.stack([to_tensor(_source(data, i)) for i in indices.tolist()])
        assert torch.equal(images, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_epoch_equals_cpu_epoch(tiny_cifar):
    data = _run_data(tiny_cifar)
    cpu = _epoch(data, seed=2)
    gpu = data.train_loader(64, torch.Generator().manual_seed(2), 0, World(), torch.device("cuda"))
    for a, b in zip(cpu, gpu, strict=True):
        assert b[0].is_cuda
        assert all(torch.equal(x, y.cpu()) for x, y in zip(a, b, strict=True))


def test_the_device_path_trains_and_repeats_itself(make_spec, tiny_cifar):
    from tskd.engine.trainer import train

    def run(out: str) -> dict:
        spec = make_spec(out=out, recipe={"epochs": 2, "milestones": [1]},
                         dataset=Cifar100Data(root=str(tiny_cifar), loader="device"))
        assert spec.identity()["dataset"]["loader"] == "device"  # another run than the DataLoader's
        return train(spec)

    a, b = run("a"), run("b")
    assert [r["epoch"] for r in a["history"]] == [1, 2]
    # Wall-clock seconds are the only field allowed to differ between two runs.
    rows = [[{k: v for k, v in r.items() if k != "seconds"} for r in m["history"]] for m in (a, b)]
    assert rows[0] == rows[1]
    assert all(np.isfinite(v) for r in rows[0] for v in r.values() if isinstance(v, float))
