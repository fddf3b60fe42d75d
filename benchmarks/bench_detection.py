"""Train-step cost of the methods on detection, relative to the student alone, and peak memory.

Faster R-CNN + FPN, teacher R50-FPN -> student R18-FPN by default (as loaded teachers and
pretrained students are: frozen BatchNorm, torchvision's frozen first layers), random images at a
fixed size with a few boxes each. A step is ``forward_train`` + backward + SGD step. Methods are
timed in interleaved rounds; the ratio is the median over rounds of a step ÷ the same round's
``vanilla`` step (the shared machine's speed drifts within minutes). TSKD is timed in a general
epoch and a review epoch (its k snapshots filled). Peak memory runs each case in a fresh
subprocess (VmHWM on CPU, max_memory_allocated on CUDA) and is also given ÷ vanilla. Not a test:

    .venv/bin/python benchmarks/bench_detection.py [--size 320] [--batch 2] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_methods import peak_rss_kb  # noqa: E402

from tskd.distill import DistillContext, build_distiller, parse_method_params  # noqa: E402
from tskd.models import create_model  # noqa: E402

CASES = ("vanilla", "kd", "reviewkd", "tskd:general", "tskd:review")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="fasterrcnn_resnet50_fpn")
    ap.add_argument("--student", default="fasterrcnn_resnet18_fpn")
    ap.add_argument("--size", type=int, default=320, help="image side, px (min_size = max_size = this)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


class Case:
    def __init__(self, case: str, args: argparse.Namespace):
        method, _, kind = case.partition(":")
        self.device = torch.device(args.device)
        kw = {"min_size": args.size, "max_size": args.size, "pretrained_backbone": True}
        torch.manual_seed(0)
        student = create_model(args.student, num_classes=91, **kw)
        teacher = create_model(args.teacher, num_classes=91, **kw) if method != "vanilla" else None
        ctx = DistillContext(num_classes=91, image_size=(args.size, args.size), epochs=12, num_train=1000,
                             train_labels=None)
        raw = {"delta": 1, "k": 3} if method == "tskd" else {}
        params = parse_method_params(method, raw, task="detection").model_dump(mode="json")
        self.d = build_distiller(method, student, teacher, params, ctx, task="detection").to(self.device)
        self.d.train()
        self.opt = torch.optim.SGD([p for p in self.d.parameters() if p.requires_grad], lr=0.001, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        self.images = [torch.rand(3, args.size, args.size, generator=g).to(self.device) for _ in range(args.batch)]
        s = args.size
        self.targets = [{"boxes": torch.tensor([[0.1 * s, 0.1 * s, 0.5 * s, 0.6 * s], [0.4 * s, 0.3 * s, 0.9 * s,
                                                                                        0.8 * s]]).to(self.device),
                         "labels": torch.tensor([1, 18]).to(self.device)} for _ in range(args.batch)]
        self.epoch = 0
        if kind == "review":  # memory epochs 0, 1, 2 fill the k snapshots; epoch 3 reviews them
            for e in range(3):
                self.d.on_epoch_end(e)
            self.epoch = 3
            self.d.on_epoch_start(3)

    def step(self) -> float:
        t0 = time.perf_counter()
        _, losses = self.d.forward_train(self.images, self.targets, self.epoch)
        self.opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        self.opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def child(args: argparse.Namespace) -> None:
    c = Case(args.child, args)
    for _ in range(2):
        c.step()
    print(json.dumps({"peak_gb": torch.cuda.max_memory_allocated() / 1e9 if c.device.type == "cuda"
                      else peak_rss_kb() / 1e6}))


def peak_memory(case: str, args: argparse.Namespace) -> float:
    cmd = [sys.executable, __file__, "--child", case, "--teacher", args.teacher, "--student", args.student,
           "--size", str(args.size), "--batch", str(args.batch), "--threads", str(args.threads),
           "--device", args.device]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_gb"]


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    print(f"{args.teacher} -> {args.student}, {args.size} px, batch {args.batch}, {args.device}, "
          f"{args.threads} threads; {args.steps} interleaved rounds after {args.warmup} warm-up")
    cases = {c: Case(c, args) for c in args.cases}
    for c in cases.values():
        for _ in range(args.warmup):
            c.step()
    times: dict[str, list[float]] = {c: [] for c in cases}
    for r in range(args.steps):
        for c in (list(cases) if r % 2 == 0 else list(cases)[::-1]):
            times[c].append(cases[c].step())
    base = times["vanilla"]
    print(f"\n{'case':<16}{'median s':>10}{'÷ vanilla (median of rounds)':>30}")
    for c, v in times.items():
        ratio = statistics.median(t / b for t, b in zip(v, base, strict=True))
        print(f"{c:<16}{statistics.median(v):>10.3f}{ratio:>30.2f}")
    if not args.no_memory:
        del cases
        peaks = {c: peak_memory(c, args) for c in args.cases}
        print(f"\n{'case':<16}{'peak GB':>10}{'÷ vanilla':>12}")
        for c, gb in peaks.items():
            print(f"{c:<16}{gb:>10.2f}{gb / peaks['vanilla']:>12.2f}")


if __name__ == "__main__":
    main()
