"""The student's attention maps at each memory node, on a fixed set of test images: the picture
behind TSKD's claim that feature maps evolve predictably during training (docs/method.md,
"Feature-map evolution").

At every memory node the snapshot just stored is run on the watched images, with its own
BatchNorm running statistics (as the model would be evaluated at that epoch, and so that an
image's map does not depend on which other images are watched), and its attention map at every
branch's tap is kept. The teacher's maps on the same images, pooled to the student's resolution
as the review target pools them, are the reference. Nothing here changes a number of the run:
no gradient, no RNG draw, no BatchNorm statistic is updated.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tskd.distill.tskd.attention import AtNorm, attention_map
from tskd.distill.tskd.memory import Snapshot
from tskd.distill.tskd.prefix import TapPrefix


def map_name(tap: int) -> str:
    return f"tap{tap}"


class MapEvolution:
    """Records the attention maps of ``taps`` for watched images, one record per memory node."""

    def __init__(self, student: nn.Module, taps: tuple[int, ...], image_size: tuple[int, int], at_norm: AtNorm):
        self.taps, self.at_norm = taps, at_norm
        # Its own prefix in eval mode: the review's may run snapshots with batch statistics.
        self._prefix = TapPrefix(student, max(taps), image_size, train_bn=False)
        self.images: Tensor | None = None
        self._records: list[dict[str, Any]] = []

    def _maps(self, feats: list[Tensor], sizes: list[tuple[int, int]] | None = None) -> dict[str, Tensor]:
        out = {}
        for i, tap in enumerate(self.taps):
            f = feats[tap]
            if sizes is not None and tuple(f.shape[-2:]) != tuple(sizes[i]):
                f = F.adaptive_avg_pool2d(f, sizes[i])
            out[map_name(tap)] = attention_map(f, self.at_norm)[:, 0].float().cpu()
        return out

    @torch.no_grad()
    def reference(self, teacher_feats: list[Tensor], sizes: list[tuple[int, int]]) -> dict[str, Tensor]:
        """The teacher's maps, pooled to the student's ``sizes`` (per branch) as the review target is."""
        return self._maps(teacher_feats, sizes)

    @torch.no_grad()
    def record(self, snapshot: Snapshot, epoch: int, slot: int) -> None:
        """The maps of ``snapshot`` (taken at the end of 0-based ``epoch`` into memory ``slot``)."""
        if self.images is None:
            return
        self._records.append({"epoch": epoch + 1, "label": f"M{slot + 1}",
                              "maps": self._maps(self._prefix(snapshot, self.images))})

    def take(self) -> list[dict[str, Any]]:
        out, self._records = self._records, []
        return out
