"""CIFAR data path: the device loader (``dataset.loader: device``) against the DataLoader path.

Two figures per path, on a synthetic CIFAR-sized set (random uint8 32x32 images, 100 classes)
held by a stand-in for torchvision's reader (``.data``, ``.targets``, PIL items), read through
the project's own code (``IndexedSplit`` + ``train_transform`` for the DataLoader, ``train_images``
+ ``DeviceTrainSet`` for the device path, both behind ``RunData.train_loader``):

* loading only: images/s of one epoch of batches, moved to the device as the trainer does;
* an epoch of KD training, teacher resnet32x4 -> student resnet8x4 (as bench_methods.py
  builds it), step = forward_train + backward + SGD step.

Paths alternate within each round (every other round in reverse order), so a shared machine's
drift hits both alike; the fastest round is reported, and ratios are device ÷ dataloader
(time: < 1 means the device path is faster; images/s: > 1 means it is). Not a test:

    .venv/bin/python benchmarks/bench_data_path.py                       # CPU, 2 threads, small set
    .venv/bin/python benchmarks/bench_data_path.py --train-size 50000 --rounds 3
    .venv/bin/python benchmarks/bench_data_path.py --device cuda --train-size 50000 --workers 8
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from tskd.data.cifar import train_images, train_transform
from tskd.data.device_loader import DeviceTrainSet
from tskd.data.splits import NORMALIZATION, IndexedSplit
from tskd.distill import DistillContext, build_distiller
from tskd.engine.loaders import RunData
from tskd.models import create_model

CLASSES = 100


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-size", type=int, default=1536, help="training images (CIFAR-100: 50000)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (presets: 0)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds; each times both paths")
    ap.add_argument("--teacher", default="resnet32x4")
    ap.add_argument("--student", default="resnet8x4")
    ap.add_argument("--no-train", action="store_true", help="loading throughput only")
    return ap.parse_args(argv)


class ArrayCIFAR:
    """What the DataLoader path reads from torchvision's CIFAR100: uint8 N×32×32×3 ``data``,
    ``targets``, ``classes``, and PIL items, made as its ``__getitem__`` makes them."""

    def __init__(self, n: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.data = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.targets = rng.integers(0, CLASSES, n).tolist()
        self.classes = [f"c{i}" for i in range(CLASSES)]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return Image.fromarray(self.data[i]), self.targets[i]


def run_data(split: IndexedSplit, device_path: bool) -> RunData:
    mean, std = NORMALIZATION["cifar100"]
    batches = None
    if device_path:
        images, labels = train_images(split)
        batches = DeviceTrainSet(images, labels, mean, std, augment=("crop", "flip")).epoch
    return RunData(train=split, val=None, test=split, num_classes=CLASSES, image_size=(32, 32),
                   train_labels=split.labels, identity="bench", name="bench", normalization="cifar100",
                   mean=mean, std=std, train_batches=batches)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def load_epoch(data: RunData, args, dev: torch.device, epoch: int) -> float:
    """Seconds to make one epoch's batches and have them on the device."""
    loader = data.train_loader(args.batch, torch.Generator().manual_seed(epoch), args.workers, device=dev)
    sync(dev)
    t0 = time.perf_counter()
    for images, labels, indices in loader:
        images, labels, indices = images.to(dev), labels.to(dev), indices.to(dev)
    sync(dev)
    return time.perf_counter() - t0


class KD:
    def __init__(self, args, dev: torch.device, labels: torch.Tensor):
        torch.manual_seed(0)
        ctx = DistillContext(num_classes=CLASSES, image_size=(32, 32), epochs=240, num_train=len(labels),
                             train_labels=labels)
        student, teacher = create_model(args.student, CLASSES), create_model(args.teacher, CLASSES)
        self.d = build_distiller("kd", student, teacher, {}, ctx).to(dev)
        self.d.train()
        self.opt = torch.optim.SGD(list(self.d.trainable_parameters()), lr=0.01, momentum=0.9, weight_decay=5e-4)
        self.dev = dev

    def epoch(self, data: RunData, args, epoch: int) -> float:
        dev = self.dev
        loader = data.train_loader(args.batch, torch.Generator().manual_seed(epoch), args.workers, device=dev)
        sync(dev)
        t0 = time.perf_counter()
        for images, labels, indices in loader:
            images, labels = images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
            _, losses = self.d.forward_train(images, labels, 1, indices=indices.to(dev))
            self.opt.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            self.opt.step()
        sync(dev)
        return time.perf_counter() - t0


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    split = IndexedSplit(ArrayCIFAR(args.train_size), None, train_transform("cifar100", ("crop", "flip")))
    paths = {"dataloader": run_data(split, False), "device": run_data(split, True)}
    n = args.train_size
    print(f"{n} images, batch {args.batch}, {args.device}, {args.threads} threads, {args.workers} DataLoader "
          f"workers; fastest of {args.rounds} round(s)")

    order = list(paths)
    for name in order:  # warm-up: the device copy, allocator, first-call costs
        load_epoch(paths[name], args, dev, epoch=-1)
    load = {name: [] for name in order}
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            load[name].append(load_epoch(paths[name], args, dev, epoch=r))
    rate = {name: n / min(v) for name, v in load.items()}
    print(f"\nloading only (images/s): dataloader {rate['dataloader']:,.0f}, device {rate['device']:,.0f}; "
          f"device ÷ dataloader {rate['device'] / rate['dataloader']:.2f}")
    if args.no_train:
        return

    kd = KD(args, dev, split.labels)
    warm = IndexedSplit(ArrayCIFAR(2 * args.batch, seed=1), None, split.transform)
    kd.epoch(run_data(warm, True), args, epoch=-1)  # first-step costs, outside the timed epochs
    train = {name: [] for name in order}
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            train[name].append(kd.epoch(paths[name], args, epoch=r))
    best = {name: min(v) for name, v in train.items()}
    print("KD epoch seconds per round: " + "; ".join(f"{k} {', '.join(f'{t:.2f}' for t in v)}"
                                                     for k, v in train.items()))
    steps = -(-n // args.batch)
    print(f"KD {args.teacher} -> {args.student} epoch (s): dataloader {best['dataloader']:.2f} "
          f"({1000 * best['dataloader'] / steps:.1f} ms/step), device {best['device']:.2f} "
          f"({1000 * best['device'] / steps:.1f} ms/step); "
          f"device ÷ dataloader {best['device'] / best['dataloader']:.3f}")
    print(f"  the data path's share of a DataLoader epoch: {n / rate['dataloader'] / best['dataloader']:.1%}, "
          f"of a device epoch: {n / rate['device'] / best['device']:.1%}")


if __name__ == "__main__":
    main()
