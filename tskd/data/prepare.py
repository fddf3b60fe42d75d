"""The data stage: write the synthetic set, or verify the real one, then mark it ready."""

from __future__ import annotations

from pathlib import Path

from tskd.config import DatasetCfg
from tskd.io import atomic_write_json


def prepare_dataset(ds: DatasetCfg, marker: Path) -> dict:
    """Make ``ds`` usable and write ``marker`` (JSON) only once it loads through the real reader."""
    from tskd.data.cifar import cifar100_datasets

    root = Path(ds.root)
    if ds.synthetic is not None:
        from tskd.data.synthetic import Nuisance, write_synthetic_cifar100

        s = ds.synthetic
        write_synthetic_cifar100(root, seed=s.seed, train_per_class=s.train_per_class,
                                 test_per_class=s.test_per_class, nuisance=Nuisance().scaled(s.nuisance_scale))
    splits = cifar100_datasets(str(root), download=ds.download, normalization="cifar100", augment=(),
                               val_fraction=ds.val_fraction, val_seed=0)
    # The root as given, not resolved: the marker is a DVC output, identical in every clone.
    info = {"name": splits.name, "family": ds.name, "root": str(root), "identity": splits.identity,
            "synthetic": ds.synthetic is not None,
            "num_classes": splits.num_classes, "train": len(splits.train) + (len(splits.val) if splits.val else 0),
            "test": len(splits.test)}
    atomic_write_json(marker, info)
    return info
