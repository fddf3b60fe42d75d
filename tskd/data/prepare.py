"""The data stage: the family prepares its data (writes, checks, extracts), then the marker is written."""

from __future__ import annotations

from pathlib import Path

from tskd.data.families import family
from tskd.io import atomic_write_json


def prepare_dataset(ds, marker: Path) -> dict:
    """Make ``ds`` usable and write ``marker`` (JSON) only once it loads through the real reader."""
    info = family(ds.name).prepare(ds)
    atomic_write_json(marker, info)
    return info
