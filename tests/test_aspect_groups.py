"""Aspect-ratio grouping of detection batches: the groups of torchvision's and detectron2's recipes,
torchvision's batching order worked out by hand, and the loader's batches on a tiny COCO."""

from __future__ import annotations

import pytest
import torch

from tskd.data import coco as family
from tskd.data.aspect_groups import group_ids, grouped_batches
from tskd.engine.loaders import build_run_data
from tskd.errors import ParamsError
from tskd.spec.config import CocoData, CocoSyntheticCfg, RecipeCfg

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")


def test_quantized_groups_are_torchvisions_bins():
    # k 3: edges 2 ** linspace(-1, 1, 7) = 0.5, 0.63, 0.79, 1, 1.26, 1.59, 2; a ratio equal to an edge
    # goes above it (bisect_right), so a square image is in group 4.
    ratios = [0.4, 0.5, 0.7, 0.99, 1.0, 1.3, 1.99, 2.0, 3.0]
    assert group_ids(ratios, "quantized", 3) == [0, 1, 2, 3, 4, 5, 6, 7, 7]
    assert group_ids([0.5, 1.0, 2.0], "quantized", 0) == [0, 1, 1]
    assert len(set(group_ids([2 ** (x / 10) for x in range(-20, 21)], "quantized", 2))) == 6


def test_orientation_groups_are_detectron2s():
    assert group_ids([1.5, 0.75, 1.0, 1.01], "orientation") == [0, 1, 1, 0]


def test_batches_fill_per_group_in_the_drawn_order_and_leftovers_complete_the_epoch():
    order = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    groups = [0, 1, 0, 1, 0, 0, 1, 1, 2, 0]
    # 0, 2, 4 fill group 0; 1, 3, 6 fill group 1; left: group 0 [5, 9], group 1 [7], group 2 [8].
    # 10 // 3 = 3 batches: the fullest buffer, group 0, is completed with its first image, 0.
    assert grouped_batches(order, groups, 3) == [[0, 2, 4], [1, 3, 6], [5, 9, 0]]


def test_ties_between_leftovers_go_by_when_the_group_was_last_emptied():
    # Group 0 empties at image 1 and goes back to the end of the order at once, before group 1
    # first appears (at 2), as torchvision's sampler's defaultdict does: both end with one image
    # left, and group 0's leftover is completed first, with its first image.
    assert grouped_batches([0, 1, 2, 3], [0, 0, 1, 0], 2) == [[0, 1], [3, 0]]
    # Group 1 appears before group 0 empties: group 1 goes first.
    assert grouped_batches([0, 1, 2, 3], [0, 1, 0, 0], 2) == [[0, 2], [1, 1]]


def test_every_batch_is_full_and_of_one_group():
    g = torch.Generator().manual_seed(0)
    groups = torch.randint(0, 5, (103,), generator=g).tolist()
    order = torch.randperm(103, generator=g).tolist()
    batches = grouped_batches(order, groups, 8)
    assert len(batches) == 103 // 8
    assert all(len(b) == 8 and len({groups[i] for i in b}) == 1 for b in batches)
    # Images appear at most once, except those repeated to complete a leftover batch.
    flat = [i for b in batches for i in b]
    assert len(set(flat)) >= len(flat) - 5 * 7


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco") / "coco"
    synthetic = CocoSyntheticCfg(seed=0, train_images=24, val_images=8, min_image_size=48, max_image_size=96,
                                 categories=3)
    family.prepare(CocoData(name="coco", root=str(root), min_size=48, max_size=96, synthetic=synthetic))
    return root, synthetic


def _recipe(**kw) -> RecipeCfg:
    return RecipeCfg(epochs=1, batch_size=4, lr=0.01, normalization="imagenet", augment=(), **kw)


def test_the_loader_draws_grouped_batches_from_the_annotations_sizes(coco_root):
    root, synthetic = coco_root
    cfg = CocoData(name="coco", root=str(root), min_size=48, max_size=96, synthetic=synthetic)
    data = build_run_data(cfg, _recipe(aspect_grouping="orientation"))
    ratios = data.train.aspect_ratios
    assert len(ratios) == len(data.train) and len({r > 1 for r in ratios}) == 2  # both orientations occur
    batches = list(data.train_loader(4, torch.Generator().manual_seed(1), 0))
    assert len(batches) == data.epoch_steps(4) == len(data.train) // 4
    for images, _, indices in batches:
        assert len(indices) == 4 == data.global_batch(0, 4)
        assert len({ratios[i] > 1 for i in indices.tolist()}) == 1
        # the images as they are read: each batch's images share their orientation
        assert len({im.shape[-1] > im.shape[-2] for im in images}) == 1
    plain = build_run_data(cfg, _recipe())
    assert plain.epoch_steps(4) == -(-len(plain.train) // 4)


def test_grouping_a_dataset_without_image_sizes_is_refused_by_key(tiny_cifar):
    from tskd.spec.config import Cifar100Data

    with pytest.raises(ParamsError, match=r"recipe.aspect_grouping: 'quantized'.*cifar100"):
        build_run_data(Cifar100Data(root=str(tiny_cifar)), _recipe(aspect_grouping="quantized"))
