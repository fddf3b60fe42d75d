"""How learnable is the synthetic CIFAR-100? Train a tiny and a wider CNN, print both accuracies.

Used to tune ``tskd.data.synthetic``: both nets must be far above chance (1 %) and the
wider one clearly ahead, so a demo table (teacher > KD student >= student) shows a real
order. Plain torch loop on CPU, about a minute:

    .venv/bin/python benchmarks/synthetic_learnability.py [--epochs 6] [--train-per-class 40]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tskd.data.synthetic import synthetic_cifar100_arrays

MEAN = torch.tensor([0.5071, 0.4867, 0.4408]).view(1, 3, 1, 1)
STD = torch.tensor([0.2675, 0.2565, 0.2761]).view(1, 3, 1, 1)


def make_cnn(widths: tuple[int, int, int], convs_per_stage: int) -> nn.Module:
    """A VGG-style net: three stages (32, 16, 8 px) of conv-BN-ReLU, global pooling, linear."""
    layers: list[nn.Module] = []
    c_in = 3
    for i, w in enumerate(widths):
        for _ in range(convs_per_stage):
            layers += [nn.Conv2d(c_in, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            c_in = w
        if i < len(widths) - 1:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 100)]
    return nn.Sequential(*layers)


def to_tensor(data: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(data).view(-1, 3, 32, 32).float() / 255
    return (x - MEAN) / STD


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The training recipe's augmentation, batched: random crop 32 with 4 px zero padding, h-flip."""
    n = x.shape[0]
    padded = F.pad(x, (4, 4, 4, 4))
    dx, dy = torch.randint(0, 9, (2, n), generator=gen)
    rows = (dy[:, None] + torch.arange(32))[:, None, :, None].expand(n, 3, 32, 40)
    x = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(32))[:, None, None, :].expand(n, 3, 32, 32)
    x = x.gather(3, cols)
    flip = torch.rand(n, generator=gen) < 0.5
    x[flip] = x[flip].flip(3)
    return x


def train_and_test(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor],
                   test: tuple[torch.Tensor, torch.Tensor], epochs: int, seed: int) -> float:
    """SGD with a one-cycle schedule; returns test top-1 accuracy in percent."""
    gen = torch.Generator().manual_seed(seed)
    x, y = train
    steps = epochs * ((len(x) + 63) // 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 64):
            idx = order[i:i + 64]
            loss = F.cross_entropy(model(augment(x[idx], gen)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(test[0][i:i + 256]).argmax(1) for i in range(0, len(test[0]), 256)])
    return 100.0 * (pred == test[1]).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-per-class", type=int, default=40)
    ap.add_argument("--test-per-class", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    t0 = time.perf_counter()
    arrays = synthetic_cifar100_arrays(seed=a.seed, train_per_class=a.train_per_class,
                                       test_per_class=a.test_per_class)
    print(f"generated {a.train_per_class}+{a.test_per_class} per class in {time.perf_counter() - t0:.1f} s")
    train = (to_tensor(arrays["train"][1]), torch.from_numpy(arrays["train"][0]).long())
    test = (to_tensor(arrays["test"][1]), torch.from_numpy(arrays["test"][0]).long())

    # Reference: a linear model on 8x8-pooled pixels (colour and coarse layout, no shape features).
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    pooled = [F.avg_pool2d(t[0], 4).flatten(1) for t in (train, test)]
    linear = nn.Linear(pooled[0].shape[1], 100)
    opt = torch.optim.Adam(linear.parameters(), lr=2e-2, weight_decay=1e-4)
    for _ in range(100):
        loss = F.cross_entropy(linear(pooled[0]), train[1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = 100.0 * (linear(pooled[1]).argmax(1) == test[1]).float().mean().item()
    print(f"{'linear on 8x8 pixels':32s} {linear.weight.numel() / 1e3:7.1f} k params  test top-1 {acc:5.1f} %  "
          f"({time.perf_counter() - t0:.0f} s)")

    nets = {"tiny (8-16-32, 1 conv/stage)": make_cnn((8, 16, 32), 1),
            "wide (32-64-128, 1 conv/stage)": make_cnn((32, 64, 128), 1)}
    for name, model in nets.items():
        torch.manual_seed(a.seed)
        t0 = time.perf_counter()
        params = sum(p.numel() for p in model.parameters())
        acc = train_and_test(model, train, test, a.epochs, a.seed)
        print(f"{name:32s} {params / 1e3:7.1f} k params  test top-1 {acc:5.1f} %  "
              f"({a.epochs} epochs, {time.perf_counter() - t0:.0f} s)")
    print("chance: 1.0 %")


if __name__ == "__main__":
    main()
