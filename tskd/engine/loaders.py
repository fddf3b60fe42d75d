"""DataLoaders for a run, built from the dataset params and the recipe."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from tskd.data.aspect_groups import group_ids, grouped_batches
from tskd.data.families import family
from tskd.data.splits import NORMALIZATION, IndexedSplit
from tskd.engine.distributed import SINGLE, RankBatches, World, global_batch_size, part_bounds
from tskd.errors import ParamsError
from tskd.spec.config import DatasetCfg, RecipeCfg


@dataclass
class RunData:
    train: Dataset
    val: Dataset | None  # held out of train, for model selection
    test: Dataset
    num_classes: int
    image_size: tuple[int, int]
    train_labels: torch.Tensor | None  # per-sample labels (classification)
    identity: str  # what the data is (official checksums or manifest hash), part of a run's identity
    name: str  # the data's own name (tags, metrics, the report): the family's, or the one it was registered under
    normalization: str  # the normalisation the loaders apply: its name, mean and std
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # ``(batch_size, generator, world, device, start=0) -> batches`` in place of the DataLoader over ``train``,
    # when the dataset asks for it (CIFAR's ``loader: device``, tskd.data.device_loader); None: DataLoader.
    train_batches: Callable[[int, torch.Generator, World, torch.device], Iterable] | None = None
    # How a batch's items are put together (detection: lists of images and targets of different
    # sizes); None: torch's default, stacking.
    collate: Callable | None = None
    # Keyword arguments the family's models are built with (detection: the transform's sizes).
    model_kwargs: dict = field(default_factory=dict)
    # The class names, by label (the evolution grid names each watched image's class); () when unknown.
    classes: tuple[str, ...] = ()
    # Each training item's aspect-ratio group when the recipe groups batches by shape
    # (tskd.data.aspect_groups); None: batches are consecutive runs of the shuffled order.
    batch_groups: list[int] | None = None
    _train_dl: DataLoader | None = field(default=None, init=False, repr=False)
    _epoch_batches: _EpochBatches | None = field(default=None, init=False, repr=False)

    @property
    def input_spec(self) -> dict:
        """What a network trained on these loaders sees; recorded in its exported model file."""
        return {"normalization": self.normalization, "mean": list(self.mean), "std": list(self.std),
                "image_size": list(self.image_size)}

    def train_loader(self, batch_size: int, generator: torch.Generator, num_workers: int,
                     world: World = SINGLE, device: torch.device | str | None = None, start: int = 0) -> Iterable:
        """Shuffled batches ``(images, labels, indices)`` in the order ``generator`` draws; in a
        data-parallel run, this rank's part of each of the very same batches (``batch_size`` is the
        global batch). A DataLoader, or the dataset's own batches made on ``device`` (default CPU).

        ``start``: the first batch to yield (a run resumed inside the epoch); the batches before it
        are skipped without being read, and the ones after are those of the whole epoch.
        """
        if self.train_batches is not None:
            return self.train_batches(batch_size, generator, world, torch.device(device or "cpu"), start=start)
        # Drawn as a DataLoader with shuffle=True draws them (its iterator's base seed, then the
        # permutation), so the order is the same whether an epoch runs whole or from ``start``.
        draw_seed = int(torch.empty((), dtype=torch.int64).random_(generator=generator))
        perm = torch.randperm(len(self.train), generator=generator).tolist()
        if self.batch_groups is not None:
            batches = grouped_batches(perm, self.batch_groups, batch_size)
        else:
            batches = [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]
        if world.distributed:
            batches = list(RankBatches(batches, world))
        if isinstance(self.train, IndexedSplit) or getattr(self.train, "takes_draw_seed", False):
            # each image's augmentation from (draw_seed, its index): see IndexedSplit
            batches = [[(i, draw_seed) for i in b] for b in batches]
        if self._train_dl is None or self._train_dl.num_workers != num_workers:
            self._epoch_batches = _EpochBatches()
            # One DataLoader for the whole run: its worker processes persist across epochs (each new
            # epoch would otherwise start them again, seconds for ImageNet's readers), the batches
            # go to pinned memory for asynchronous copies to the GPU. It has a generator of its own:
            # without one, it would draw its workers' seed from torch's global stream, which the
            # methods draw from too (a resumed epoch would be one draw off).
            self._train_dl = DataLoader(self.train, batch_sampler=self._epoch_batches, num_workers=num_workers,
                                        generator=torch.Generator().manual_seed(0), collate_fn=self.collate,
                                        persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())
        self._epoch_batches.batches = batches[start:]
        return self._train_dl

    def epoch_steps(self, batch_size: int) -> int:
        """Steps of a whole epoch of the global batch ``batch_size``."""
        n = len(self.train)
        return n // batch_size if self.batch_groups is not None else -(-n // batch_size)

    def global_batch(self, step: int, batch_size: int) -> int:
        """Images in the epoch's batch ``step``: grouped batches are all full; otherwise the last may be short."""
        return batch_size if self.batch_groups is not None else global_batch_size(step, batch_size, len(self.train))

    def eval_loader(self, ds: Dataset, batch_size: int, num_workers: int, world: World = SINGLE) -> DataLoader:
        """``ds`` in order; in a data-parallel run, this rank's contiguous shard of it (the task
        reduces the shards' figures)."""
        if world.distributed:
            ds = Subset(ds, range(*part_bounds(len(ds), world.rank, world.size)))
        return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=self.collate,
                          pin_memory=torch.cuda.is_available())


class _EpochBatches:
    """The batch sampler of a run's one training DataLoader, set to each epoch's batches."""

    def __init__(self) -> None:
        self.batches: list[list] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list]:
        return iter(self.batches)


def build_run_data(ds: DatasetCfg, recipe: RecipeCfg) -> RunData:
    """The run's data, from its dataset family (tskd.data.families)."""
    fam = family(ds.name)
    splits = fam.load_splits(ds, recipe)
    mean, std = NORMALIZATION[recipe.normalization]
    # Optional family entries: CIFAR's own training batches (None: the DataLoader); the keyword
    # arguments its models are built with (detection: the transform's image sizes).
    own_batches = getattr(fam, "train_batches", None)
    model_kwargs = getattr(fam, "model_kwargs", None)
    groups = None
    if recipe.aspect_grouping != "none":
        ratios = getattr(splits.train, "aspect_ratios", None)
        if ratios is None or own_batches is not None:
            raise ParamsError(f"recipe.aspect_grouping: {recipe.aspect_grouping!r} groups images by their aspect "
                              f"ratio, which dataset '{ds.name}' does not record (a detection dataset, coco, "
                              "does); use 'none'")
        groups = group_ids(ratios, recipe.aspect_grouping, recipe.aspect_group_k)
    return RunData(train=splits.train, val=splits.val, test=splits.test, num_classes=splits.num_classes,
                   image_size=splits.image_size, train_labels=splits.train_labels, identity=splits.identity,
                   name=splits.name, normalization=recipe.normalization, mean=mean, std=std,
                   classes=tuple(splits.classes),
                   train_batches=own_batches(ds, recipe, splits) if own_batches else None,
                   collate=getattr(splits, "collate", None), model_kwargs=model_kwargs(ds) if model_kwargs else {},
                   batch_groups=groups)
