"""Batches of images of similar shape (the detection recipes' aspect-ratio grouping).

A detector pads every image of a batch to the batch's largest height and width; a batch mixing
landscape and portrait images is mostly padding. Both published detection pipelines therefore
draw batches within groups of similar aspect ratio (width / height of the image as the
annotation file records it, so no image is opened):

- ``quantized`` (torchvision's references/detection, ``--aspect-ratio-group-factor k``, 3 by
  default): the ratio is placed among the edges ``2 ** linspace(-1, 1, 2k + 1)``, which gives
  ``2k + 2`` groups;
- ``orientation`` (detectron2, mdistiller's detection code): two groups, wider than high or not.

Given an epoch's shuffled order, images are dealt into per-group buffers in that order and a
buffer is yielded as a batch when it is full, as torchvision's ``GroupedBatchSampler`` does. An
epoch has ``len // batch_size`` batches: what is left in the buffers at the end is completed with
earlier images of the same group (the fullest buffers first) until that count is reached, and the
rest is not drawn this epoch. Every batch is full, so every step has the same global batch.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Literal

import numpy as np

Grouping = Literal["none", "quantized", "orientation"]


def group_ids(aspect_ratios: Sequence[float], grouping: Grouping, k: int = 3) -> list[int]:
    """Each image's group under ``grouping`` (see the module docstring)."""
    if grouping == "orientation":
        return [0 if r > 1 else 1 for r in aspect_ratios]
    if grouping == "quantized":
        edges = sorted((2.0 ** np.linspace(-1, 1, 2 * k + 1)).tolist()) if k > 0 else [1.0]
        return [bisect.bisect_right(edges, float(r)) for r in aspect_ratios]
    raise ValueError(f"no grouping {grouping!r}")


def grouped_batches(order: Sequence[int], groups: Sequence[int], batch_size: int) -> list[list[int]]:
    """The epoch's batches for the shuffled ``order`` of item indices, ``groups[i]`` the group of item ``i``."""
    buffers: dict[int, list[int]] = {}
    seen: dict[int, list[int]] = {}
    batches: list[list[int]] = []
    for i in order:
        g = groups[i]
        buffers.setdefault(g, []).append(i)
        seen.setdefault(g, []).append(i)
        if len(buffers[g]) == batch_size:
            batches.append(buffers.pop(g))
            # Back in at the end of the order, empty, at once (as torchvision's defaultdict does):
            # this order breaks ties between equally full buffers below.
            buffers[g] = []
    want = len(order) // batch_size
    for g, buf in sorted(buffers.items(), key=lambda kv: len(kv[1]), reverse=True):
        if len(batches) == want:
            break
        need = batch_size - len(buf)
        # The group's images of this epoch, repeated as often as needed, in the order drawn.
        fill = (seen[g] * (need // len(seen[g]) + 1))[:need]
        batches.append(buf + fill)
    return batches
