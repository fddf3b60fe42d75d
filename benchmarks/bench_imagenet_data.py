"""How many loader workers an ImageNet run needs: the data path's images/s per worker against the
images/s of a training step, measured in the same process.

The data path is the one a run uses (tskd.data.imagenet): PIL decode of a JPEG, RandomResizedCrop
224, horizontal flip, ToTensor, Normalize, one worker (num_workers = 0 is exactly one worker's
work). The images are JPEGs of ImageNet's typical size (500 x 375, quality 90) with textured
content, written to a temporary folder. The step is R34 -> R18 KD at batch 64, 224 px, on the
device given (CPU by default; on a GPU add --device cuda --bf16).

    python benchmarks/bench_imagenet_data.py [--images 256] [--steps 3] [--device cpu] [--bf16]
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tskd.data.imagenet import train_transform  # noqa: E402
from tskd.distill import DistillContext, build_distiller  # noqa: E402
from tskd.models import create_model  # noqa: E402


def write_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """Textured 500 x 375 JPEGs: smoothed noise at several scales, so they decode like photos."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        img = np.zeros((375, 500, 3))
        for scale in (4, 16, 64):
            coarse = rng.random((375 // scale + 2, 500 // scale + 2, 3))
            img += np.kron(coarse, np.ones((scale, scale, 1)))[:375, :500] / scale**0.5
        img = (255 * (img - img.min()) / np.ptp(img)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        path = folder / f"{i:05d}.JPEG"
        path.write_bytes(buf.getvalue())
        paths.append(path)
    return paths


def loader_rate(paths: list[Path], rounds: int = 3) -> tuple[float, float]:
    """Images/s of one worker (median of rounds), and the mean file size in KB."""
    tf = train_transform(224, 256, "imagenet", ("crop", "flip"))
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for p in paths:
            with Image.open(p) as im:
                tf(im.convert("RGB"))
        rates.append(len(paths) / (time.perf_counter() - t0))
    return statistics.median(rates), statistics.mean(p.stat().st_size for p in paths) / 1e3


def step_rate(device: str, bf16: bool, steps: int, batch: int = 64) -> float:
    """Images/s of R34 -> R18 KD training steps (median of ``steps`` after one warm-up step)."""
    dev = torch.device(device)
    torch.manual_seed(0)
    ctx = DistillContext(num_classes=1000, image_size=(224, 224), epochs=100, num_train=1_281_167)
    d = build_distiller("kd", create_model("resnet18"), create_model("resnet34"), {"T": 1.0}, ctx).to(dev).train()
    opt = torch.optim.SGD(list(d.trainable_parameters()), lr=0.2, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, 224, 224, device=dev)
    y = torch.randint(0, 1000, (batch,), device=dev)
    times = []
    for i in range(steps + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            _, losses = d.forward_train(x, y, epoch=5)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true")
    a = ap.parse_args()
    print(f"torch threads {torch.get_num_threads()}, device {a.device}{' bf16' if a.bf16 else ''}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), a.images)
        per_worker, kb = loader_rate(paths)
    print(f"data path, one worker: {per_worker:8.1f} images/s  ({a.images} JPEGs of 500x375, {kb:.0f} KB mean)",
          flush=True)
    step = step_rate(a.device, a.bf16, a.steps)
    print(f"R34 -> R18 KD step, batch 64 at 224 px: {step:8.1f} images/s")
    print(f"workers to keep the step fed: {step / per_worker:.2f} (step images/s / one worker's images/s)")
    epoch_h = 1_281_167 / step / 3600
    print(f"one 1.28 M-image epoch at the step's rate: {epoch_h:.1f} h; 100 epochs: {100 * epoch_h:.0f} h")


if __name__ == "__main__":
    main()
