"""CIFAR training batches made on the run's device: no DataLoader, no PIL, no worker processes.

The training split's uint8 images live on the device once (``DeviceTrainSet``); each epoch
(``DeviceEpoch``) gathers its batches there, with the random crop, the flip and the
normalisation as a few batched tensor ops. This is the approach of Keller Jordan's airbench:
a small-image step is so short on a GPU that a DataLoader decoding PIL images cannot keep up.

It draws what torchvision's ``RandomCrop(32, padding=4)`` and ``RandomHorizontalFlip`` draw,
with the same distribution (offsets uniform on 0..8 per axis, flip with p 0.5, independent per
image), and produces what they produce to the bit (``tests/test_device_loader.py``):

* the padding is added to the uint8 images, as zeros, so a padded pixel becomes 0.0 and then
  ``-mean/std``, exactly as torchvision's zero-filled PIL padding after ToTensor and Normalize;
* ToTensor and Normalize's float ops are done in their order (``/ 255``, ``- mean``, ``/ std``).

Randomness, from the epoch's generator only (``tskd.engine.runtime.seed_epoch``), on the CPU:

* the permutation is drawn as the DataLoader with ``shuffle=True`` draws it (one int64 first,
  its workers' base seed, then ``randperm``), so both paths visit the images in the same order
  and cut the same batches;
* the crop offsets and flips come from a CPU generator seeded with that first int64, drawn for
  the whole epoch at once, in permutation order. An epoch therefore replays exactly from its
  generator (resume, also from inside it: ``start``), on a CPU as on a GPU, and every rank of a
  data-parallel run sees its part of the very batch a single process would. The draws are not the
  DataLoader path's (which draws each image's from its index): same distribution, other values.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from tskd.engine.distributed import SINGLE, World, part_bounds
from tskd.errors import ParamsError

PAD = 4  # px, as torchvision's RandomCrop(32, padding=4) in the CIFAR recipes
AUGMENT = ("crop", "flip")


class DeviceTrainSet:
    """A training split as tensors: ``images`` uint8 N×C×H×W (position i is item index i), ``labels``.

    ``augment`` holds the parts to apply (``crop``, ``flip``); ``mean`` and ``std`` normalise.
    The images are copied to a device on the first epoch there and kept.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 augment: Sequence[str] = AUGMENT, pad: int = PAD) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 N×C×H×W, got {images.dtype} {tuple(images.shape)}")
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        unknown = set(augment) - set(AUGMENT)
        if unknown:
            raise ValueError(f"augment: unknown parts {sorted(unknown)}; known: {', '.join(AUGMENT)}")
        if not len(mean) == len(std) == images.shape[1]:
            raise ValueError(f"mean/std have {len(mean)}/{len(std)} values for {images.shape[1]} channels")
        self.crop, self.flip = "crop" in augment, "flip" in augment
        self.pad = pad if self.crop else 0
        # Padded once here rather than per batch: the crop is then a single gather from the set.
        self.images = torch.nn.functional.pad(images, (self.pad,) * 4) if self.pad else images.contiguous()
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.size = tuple(images.shape[2:])  # H, W of an output image
        self.mean, self.std = tuple(mean), tuple(std)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(padded images, labels) on ``device``, copied there once."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._on:
            self._on[device] = (self.images.to(device), self.labels.to(device))
        return self._on[device]

    def epoch(self, batch_size: int, generator: torch.Generator, world: World = SINGLE,
              device: torch.device | str = "cpu", start: int = 0) -> DeviceEpoch:
        """One epoch's batches, in the order ``generator`` (a CPU generator) draws; drawn now, so
        iterating the epoch again replays it. ``start``: the first batch to make (a run resumed
        inside the epoch); the draws are the whole epoch's all the same."""
        return DeviceEpoch(self, batch_size, generator, world, torch.device(device), start)


class DeviceEpoch:
    """Iterable of ``(images, labels, indices)`` on the device, as the DataLoader path yields them;
    in a data-parallel run, this rank's contiguous part of each global batch."""

    def __init__(self, data: DeviceTrainSet, batch_size: int, generator: torch.Generator, world: World,
                 device: torch.device, start: int = 0) -> None:
        if batch_size < 1 or start < 0:
            raise ValueError(f"batch_size must be >= 1 and start >= 0, got {batch_size} and {start}")
        self.data, self.batch_size, self.world, self.device = data, batch_size, world, device
        self.start = start
        n = len(data)
        # Exactly the DataLoader's draws (its iterator's base seed, then RandomSampler's randperm).
        base_seed = int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())
        self.perm = torch.randperm(n, generator=generator)
        aug = torch.Generator().manual_seed(base_seed)
        # Drawn for every position of the epoch, not per rank: each rank slices the same draws.
        self.offsets = torch.randint(0, 2 * data.pad + 1, (n, 2), generator=aug) if data.crop else None
        self.flips = torch.randint(0, 2, (n,), generator=aug).bool() if data.flip else None

    def __len__(self) -> int:
        """Batches this epoch yields (from ``start`` on)."""
        return max(0, -(-len(self.data) // self.batch_size) - self.start)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        images, labels = self.data.on(self.device)
        dev = images.device
        perm = self.perm.to(dev)
        offsets = None if self.offsets is None else self.offsets.to(dev)
        flips = None if self.flips is None else self.flips.to(dev)
        c = images.shape[1]
        h, w = self.data.size
        ar_c = torch.arange(c, device=dev).view(1, c, 1, 1)
        ar_h, ar_w = torch.arange(h, device=dev), torch.arange(w, device=dev)
        mean = torch.as_tensor(self.data.mean, dtype=torch.float32, device=dev).view(1, c, 1, 1)
        std = torch.as_tensor(self.data.std, dtype=torch.float32, device=dev).view(1, c, 1, 1)
        n = len(self.data)
        for first in range(self.start * self.batch_size, n, self.batch_size):
            lo, hi = first, min(first + self.batch_size, n)
            if self.world.distributed:
                if hi - lo < self.world.size:
                    raise ParamsError(f"a batch of {hi - lo} images cannot be shared by {self.world.size} "
                                      "processes: change the batch size or the number of tasks")
                a, b = part_bounds(hi - lo, self.world.rank, self.world.size)
                lo, hi = lo + a, lo + b
            idx = perm[lo:hi]
            if offsets is None and flips is None:
                batch = images[idx]
            else:
                # Row and column of the padded source that each output pixel reads: the crop is an
                # offset, the flip reverses the columns (torchvision crops first, then flips).
                rows = ar_h.expand(hi - lo, h) if offsets is None else offsets[lo:hi, :1] + ar_h
                x0 = 0 if offsets is None else offsets[lo:hi, 1:]
                cols = x0 + ar_w if flips is None else x0 + torch.where(flips[lo:hi, None], w - 1 - ar_w, ar_w)
                cols = cols.expand(hi - lo, w)
                batch = images[idx.view(-1, 1, 1, 1), ar_c, rows[:, None, :, None], cols[:, None, None, :]]
            # ToTensor's and Normalize's ops, in their order: the same floats to the bit.
            x = batch.to(torch.float32).div_(255).sub_(mean).div_(std)
            yield x, labels[idx], idx
