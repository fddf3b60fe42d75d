"""Train-step cost of every registered method, relative to KD, and TSKD's whole-run overhead.

One teacher->student pair (default resnet32x4 -> resnet8x4), random 32x32 inputs. A step is
``forward_train`` + backward + SGD step. Methods are timed in interleaved rounds (every other
one in reverse order), and two ratios are given: fastest step ÷ fastest KD step (other load
only ever adds time), and the median over rounds of step ÷ the same round's KD step (a shared
machine's speed drifts by tens of percent within minutes; a ratio taken seconds apart cancels
most of that). TSKD is timed in its three kinds of epoch:
general (= memory-epoch step), review (with the default eager kernels, and with
``compile: true`` as the cifar100 preset runs it), and the snapshot taken at the end of a
memory epoch. The whole-run projection uses the default 240-epoch schedule (192 general,
36 memory, 12 review). Peak memory runs KD and each TSKD review case in a fresh subprocess
(VmHWM on CPU, max_memory_allocated on CUDA), also with ``recompute_forecasters: false``. On a
shared CPU both drift from run to run (by about 0.05 in the ratios): repeat a run to see the
spread. Not a test:

    .venv/bin/python benchmarks/bench_methods.py [--batch 128] [--steps 10] [--warmup 2]
    .venv/bin/python benchmarks/bench_methods.py --device cuda --bf16 --channels-last --steps 50
    # ImageNet: R34 -> R18 at 224 px, TSKD as params/imagenet.yaml runs it
    .venv/bin/python benchmarks/bench_methods.py --teacher resnet34 --student resnet18 --size 224 \
        --classes 1000 --train-size 1281167 --epochs 100 --batch 64 --methods kd tskd \
        --tskd '{"delta": 2, "k": 3, "taps": [1, 2, 3], "T": 1.0}'
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from tskd.distill import DistillContext, build_distiller, list_methods
from tskd.distill.tskd.schedule import node_at, summarize_schedule
from tskd.models import create_model


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="resnet32x4")
    ap.add_argument("--student", default="resnet8x4")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10, help="timed steps (rounds) per method")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--methods", nargs="*", help="default: every registered method")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--size", type=int, default=32, help="input side, px")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--train-size", type=int, default=50_000, help="training images (steps per epoch, CRD bank)")
    ap.add_argument("--epochs", type=int, default=240, help="run length of the whole-run projection")
    ap.add_argument("--tskd", default="{}", help="TSKD params (JSON) for every TSKD case, e.g. delta, k, taps")
    ap.add_argument("--child", help=argparse.SUPPRESS)  # "<method>:<case>": one peak-memory run
    return ap.parse_args(argv)


class Bench:
    """One distiller with its optimizer and a fixed random batch; ``step()`` times one train step."""

    def __init__(self, method: str, args: argparse.Namespace, params: dict | None = None):
        self.args, self.device = args, torch.device(args.device)
        torch.manual_seed(0)
        n, classes, size = args.train_size, args.classes, args.size
        ctx = DistillContext(num_classes=classes, image_size=(size, size), epochs=args.epochs, num_train=n,
                             train_labels=torch.randint(0, classes, (n,)))
        student, teacher = create_model(args.student, classes), create_model(args.teacher, classes)
        params = (json.loads(args.tskd) if method == "tskd" else {}) | (params or {})
        self.d = build_distiller(method, student, teacher, params, ctx).to(self.device)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        self.d.to(memory_format=fmt)
        for t in self.d._teacher:
            t.to(memory_format=fmt)
        self.d.train()
        self.opt = torch.optim.SGD(list(self.d.trainable_parameters()), lr=0.01, momentum=0.9, weight_decay=5e-4)
        self.x = torch.randn(args.batch, 3, size, size, device=self.device).contiguous(memory_format=fmt)
        self.y = torch.randint(0, classes, (args.batch,), device=self.device)
        self.idx = torch.randint(0, n, (args.batch,), device=self.device)

    def autocast(self):
        if self.args.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self, epoch: int) -> float:
        self.sync()
        t0 = time.perf_counter()
        with self.autocast():
            _, losses = self.d.forward_train(self.x, self.y, epoch, indices=self.idx)
        self.opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        self.opt.step()
        self.sync()
        return time.perf_counter() - t0

    def fill_memory(self, review_epoch: int) -> float:
        """Take the snapshots a review at ``review_epoch`` needs; returns seconds per snapshot."""
        p = self.d.params
        self.sync()
        t0 = time.perf_counter()
        for slot in range(p.k):
            self.d.on_epoch_end(review_epoch - (p.k - slot) * p.delta)
        self.sync()
        return (time.perf_counter() - t0) / p.k


def first_review_epoch(d) -> int:
    p = d.params
    epochs = d.ctx.epochs
    return next(e for e in range(epochs) if node_at(e, epochs, p.delta, p.k).kind == "review")


def time_all(args: argparse.Namespace) -> dict[str, list[float]]:
    """Step seconds per case and round; cases are method names, and for TSKD 'tskd:general',
    'tskd:review', 'tskd:review[compile=true]' and 'tskd:general[teacher_bn=train]'."""
    cases: dict[str, tuple[Bench, int]] = {}
    snapshot_s = None
    methods = args.methods or list_methods()
    for m in ["kd", *(m for m in methods if m != "kd")]:  # KD: each round's reference
        try:
            b = Bench(m, args)
        except Exception as e:  # a method this pair or these defaults do not suit
            print(f"  skip {m}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            continue
        if m == "tskd":
            review = first_review_epoch(b.d)
            snapshot_s = b.fill_memory(review)
            b.d.on_epoch_start(review)
            cases["tskd:general"], cases["tskd:review"] = (b, review + 1), (b, review)
            # The review step with the compiled kernels (methods.tskd.compile: true, as the cifar100
            # preset runs it); its compile happens in the warm-up steps.
            compiled = Bench(m, args, {"compile": True})
            compiled.fill_memory(review)
            compiled.d.on_epoch_start(review)
            cases["tskd:review[compile=true]"] = (compiled, review)
            # The authors' teacher in train-mode BatchNorm (teacher_bn: train), to show what it costs.
            cases["tskd:general[teacher_bn=train]"] = (Bench(m, args, {"teacher_bn": "train"}), review + 1)
        else:
            cases[m] = (b, 1)
    times: dict[str, list[float]] = {c: [] for c in cases}
    for i in range(args.warmup + args.steps):  # interleaved rounds: load changes hit all cases alike
        # Every other round runs backwards, so no case always sits next to KD or always runs last.
        for c, (b, epoch) in (list(cases.items()) if i % 2 == 0 else list(cases.items())[::-1]):
            try:
                t = b.step(epoch)
            except Exception as e:
                print(f"  skip {c}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
                times.pop(c, None)
                continue
            if i >= args.warmup and c in times:
                times[c].append(t)
        cases = {c: v for c, v in cases.items() if c in times}
    if snapshot_s is not None:
        times["tskd:snapshot"] = [snapshot_s]
    return times


def peak_memory(method: str, case: str, args: argparse.Namespace) -> float:
    """Peak memory (GB) of a fresh process that builds ``method`` and runs two steps of ``case``."""
    cmd = [sys.executable, __file__, "--child", f"{method}:{case}", "--batch", str(args.batch),
           "--device", args.device, "--threads", str(args.threads), "--teacher", args.teacher,
           "--student", args.student, "--size", str(args.size), "--classes", str(args.classes),
           "--train-size", str(args.train_size), "--epochs", str(args.epochs), "--tskd", args.tskd,
           *(["--bf16"] if args.bf16 else []),
           *(["--channels-last"] if args.channels_last else [])]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_gb"]


def case_params(case: str) -> dict:
    """The TSKD params a case names: 'review[compile=true]' -> {"compile": True}."""
    if not case.endswith("]"):
        return {}
    key, value = case[case.index("[") + 1:-1].split("=")
    return {key: json.loads(value)}


def child(args: argparse.Namespace) -> None:
    method, case = args.child.split(":")
    b = Bench(method, args, case_params(case))
    epoch = 1
    if case.startswith("review"):
        epoch = first_review_epoch(b.d)
        b.fill_memory(epoch)
    for _ in range(2):
        b.step(epoch)
    print(json.dumps({"peak_gb": torch.cuda.max_memory_allocated() / 1e9 if b.device.type == "cuda"
                      else peak_rss_kb() / 1e6}))


def peak_rss_kb() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over an
    exec, so a child started by a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            return float(next(line.split()[1] for line in f if line.startswith("VmHWM:")))
    except (OSError, StopIteration):
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    print(f"{args.teacher} -> {args.student}, batch {args.batch}, {args.device}, {args.threads} threads, "
          f"{'bf16' if args.bf16 else 'fp32'}{', channels-last' if args.channels_last else ''}; "
          f"{args.steps} interleaved rounds after {args.warmup} warm-up")
    times = time_all(args)
    if "kd" not in times:
        sys.exit("KD could not be timed: no reference")
    fastest = {c: min(v) for c, v in times.items()}
    paired = {c: statistics.median(t / k for t, k in zip(v, times["kd"], strict=True))
              for c, v in times.items() if c != "tskd:snapshot"}
    print(f"\n{'method / case':<36}{'fastest s':>10}{'÷ KD':>8}{'median of rounds ÷ KD':>24}")
    for c in sorted(paired):
        print(f"{c:<36}{fastest[c]:>10.3f}{fastest[c] / fastest['kd']:>8.2f}{paired[c]:>24.2f}")
    if "tskd:review" in times:
        tskd = {"delta": 5, "k": 3} | json.loads(args.tskd)
        epochs = args.epochs
        counts = summarize_schedule(epochs, tskd["delta"], tskd["k"]).counts
        steps = -(-args.train_size // args.batch)
        snapshot = counts["memory"] * fastest["tskd:snapshot"] / (epochs * steps * fastest["kd"])

        def whole_run(general: float, review: float) -> float:
            return ((counts["general"] + counts["memory"]) * general + counts["review"] * review) / epochs + snapshot

        print(f"{'tskd:snapshot':<36}{fastest['tskd:snapshot']:>10.4f}   (once per memory epoch, per slot)")
        print(f"\nwhole run, {epochs} epochs ({counts['general']} general, {counts['memory']} memory, "
              f"{counts['review']} review, {steps} steps/epoch), TSKD ÷ KD:")
        for review in ("tskd:review", "tskd:review[compile=true]"):
            if review not in times:
                continue
            general = fastest["tskd:general"] / fastest["kd"]
            print(f"  {review}: {whole_run(general, fastest[review] / fastest['kd']):.3f} (fastest steps), "
                  f"{whole_run(paired['tskd:general'], paired[review]):.3f} (medians of rounds)")
            # A general step runs exactly KD's ops, so its measured ratio is KD's own noise (+-5% here);
            # this line keeps only what TSKD adds: the review epochs and the snapshots.
            print(f"    with general = KD: {whole_run(1.0, fastest[review] / fastest['kd']):.3f} (fastest steps), "
                  f"{whole_run(1.0, paired[review]):.3f} (medians of rounds)")
        if not args.no_memory:
            mem_kd = peak_memory("kd", "general", args)
            print(f"peak memory: KD {mem_kd:.2f} GB", end="")
            # recompute_forecasters=false: every forecaster's activations kept, as the authors' code keeps them.
            for case in ("review", "review[compile=true]", "review[recompute_forecasters=false]"):
                mem = peak_memory("tskd", case, args)
                print(f", TSKD {case} {mem:.2f} GB (÷ KD {mem / mem_kd:.2f})", end="")
            print()


if __name__ == "__main__":
    main()
