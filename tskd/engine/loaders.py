"""DataLoaders for a run, built from the dataset params and the recipe."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from tskd.config import DatasetCfg, RecipeCfg
from tskd.engine.distributed import SINGLE, RankBatches, World


@dataclass
class RunData:
    train: Dataset
    val: Dataset | None  # held out of train, for model selection
    test: Dataset
    num_classes: int
    image_size: tuple[int, int]
    train_labels: torch.Tensor
    identity: str  # what the data is (official checksums or manifest hash), part of a run's identity
    name: str  # the data's own name (tags, metrics, the report): the family's, or the one it was registered under
    normalization: str  # the normalisation the loaders apply: its name, mean and std
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def input_spec(self) -> dict:
        """What a network trained on these loaders sees; recorded in its exported model file."""
        return {"normalization": self.normalization, "mean": list(self.mean), "std": list(self.std),
                "image_size": list(self.image_size)}

    def train_loader(self, batch_size: int, generator: torch.Generator, num_workers: int,
                     world: World = SINGLE) -> DataLoader:
        """Shuffled batches in the order ``generator`` draws; in a data-parallel run, this rank's
        part of each of the very same batches (``batch_size`` is the global batch)."""
        if not world.distributed:
            return DataLoader(self.train, batch_size=batch_size, shuffle=True, generator=generator,
                              num_workers=num_workers, drop_last=False,
                              persistent_workers=False, pin_memory=torch.cuda.is_available())
        # What shuffle=True builds, cut per rank: same permutation, same batches.
        batches = BatchSampler(RandomSampler(self.train, generator=generator), batch_size, drop_last=False)
        return DataLoader(self.train, batch_sampler=RankBatches(batches, world), generator=generator,
                          num_workers=num_workers, persistent_workers=False,
                          pin_memory=torch.cuda.is_available())

    def eval_loader(self, ds: Dataset, batch_size: int, num_workers: int) -> DataLoader:
        return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)


def build_run_data(ds: DatasetCfg, recipe: RecipeCfg) -> RunData:
    """The run's data, from its dataset family (tskd.data.families)."""
    from tskd.data.families import family
    from tskd.data.splits import NORMALIZATION

    splits = family(ds.name).load_splits(ds, recipe)
    mean, std = NORMALIZATION[recipe.normalization]
    return RunData(train=splits.train, val=splits.val, test=splits.test, num_classes=splits.num_classes,
                   image_size=splits.image_size, train_labels=splits.train_labels, identity=splits.identity,
                   name=splits.name, normalization=recipe.normalization, mean=mean, std=std)
