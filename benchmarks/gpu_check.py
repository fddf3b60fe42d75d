"""One prepared check of the CUDA training path: correctness, throughput, 240-epoch projection, memory.

Prints ONE table (markdown; progress goes to stderr). Sized to run in under 8 minutes on one
H200; ``--tiny`` runs every code path on a CPU in under a minute (tests/test_gpu_check.py):

    .venv/bin/python benchmarks/gpu_check.py            # on the GPU machine
    .venv/bin/python benchmarks/gpu_check.py --tiny     # anywhere

Rows:

* env: torch, CUDA, cuDNN, the device, and the runtime's decisions (tskd.engine.runtime).
* correctness: one KD step and one TSKD review step on the device against the same step on the
  CPU in fp32 (same weights, same batch; the CPU step is uncompiled eager code): each loss term,
  and the student's gradients after one backward. On CUDA twice, with the run's bf16 autocast and
  in fp32 (TF32 off). On a CPU-only machine the device side is the CPU in fp32 on ``--threads``
  threads (at least 2), the reference on one thread, so the code path runs.
* throughput: images/s of a KD epoch and of TSKD's general and review epochs (teacher -> student
  as in params/cifar100.yaml, its recipe's batch size, optimizer and augmentation), on synthetic
  CIFAR-100 (random uint8 images and labels) through the project's device data path, each step
  as the trainer runs it (incl. its per-step read of the loss, a host sync); each ÷ a
  pure-compute loop of the same steps on one batch already on the device (goal >= 0.9).
* projection: a 240-epoch TSKD run from the measured epochs, TSKD's node schedule, the memory
  snapshots and an evaluation pass per epoch (goal <= 15 min on one H200).
* memory: peak ``torch.cuda.max_memory_allocated`` of TSKD (general + review) ÷ KD, each counted
  from what was allocated before the case began (goal <= 1.3).

Goals are for CUDA; on a CPU their status reads ``n/a (cpu)``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_methods is a sibling script, not a package
from bench_methods import Bench, first_review_epoch  # noqa: E402
from bench_methods import parse_args as bench_args  # noqa: E402

from tskd.data.splits import NORMALIZATION  # noqa: E402
from tskd.distill.registry import parse_method_params  # noqa: E402
from tskd.distill.tskd.compiled import CompileUnavailable, check_compiles  # noqa: E402
from tskd.distill.tskd.schedule import cycle_memory_epochs, summarize_schedule  # noqa: E402
from tskd.engine.runtime import Runtime, select_runtime  # noqa: E402
from tskd.spec.config import TrainCfg, load_preset  # noqa: E402

try:  # the GPU-resident CIFAR loader (tskd.data.device_loader), where this checkout has it
    from tskd.data.device_loader import DeviceTrainSet
except ImportError:
    DeviceTrainSet = None

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")

# Tolerances of a step on the device against the CPU fp32 step: "loss" bounds |Δ|/|ref| of every
# loss term, "grad" bounds ‖Δ‖/‖ref‖ of all the student's gradients as one vector. A broken kernel,
# layout or dtype gives errors of order 1e-1 to 1; these bounds sit well below that.
TOL = {
    # fp32 vs fp32 differ in summation order and algorithm only. Measured on CPU (resnet32x4 ->
    # resnet8x4, one step): loss terms <= 1e-7, grads ~1e-7 (contiguous, 1 vs 2 threads). The CPU's
    # channels_last train-mode BatchNorm backward is much less exact: resnet8x4's grads against
    # float64 are off by 1.5e-3 with it, 7e-7 without. On CUDA, cudnn.benchmark may pick FFT or
    # Winograd convolutions, whose fp32 error is ~1e-4 of a layer's output. Hence 2e-3 for grads.
    "fp32": {"loss": 1e-4, "grad": 2e-3},
    # bf16 (8-bit mantissa, unit roundoff 2^-9 = 2e-3) convolutions and matmuls with fp32
    # accumulation. Calibrated with CPU bf16 autocast + channels_last against CPU fp32, batch 16 and
    # 128, KD and TSKD review steps: loss terms 1.8e-3..2.8e-3, grads 1.0e-2..2.0e-2. Bounds at ~7x
    # and ~4x those.
    "bf16": {"loss": 2e-2, "grad": 8e-2},
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes that run on a CPU in well under a minute")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="of the throughput runs on CUDA")
    ap.add_argument("--params", default=str(REPO / "params" / "cifar100.yaml"))
    ap.add_argument("--recipe", default="tskd_v1", help="the recipe whose batch size, optimizer, augmentation run")
    ap.add_argument("--teacher", default="resnet32x4")
    ap.add_argument("--student", default="resnet8x4")
    ap.add_argument("--train-size", type=int, help="training images (default 50000; --tiny 96)")
    ap.add_argument("--eval-size", type=int, help="test images evaluated per epoch (default 10000; --tiny 64)")
    ap.add_argument("--batch", type=int, help="default: the recipe's (--tiny 32)")
    ap.add_argument("--check-batch", type=int, help="batch of the correctness steps (default: --batch; --tiny 16)")
    ap.add_argument("--warmup", type=int, help="untimed steps per case and batch shape (default 5; --tiny 1)")
    ap.add_argument("--compile", choices=["preset", "on", "off"], default=None,
                    help="TSKD's compile param (default: as the preset says; --tiny: off, a CPU compile takes ~30 s)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's; --tiny 2)")
    ap.add_argument("--epochs", type=int, default=240, help="run length of the projection")
    args = ap.parse_args(argv)
    tiny = {"train_size": 96, "eval_size": 64, "batch": 32, "check_batch": 16, "warmup": 1, "compile": "off",
            "threads": 2}
    full = {"train_size": 50_000, "eval_size": 10_000, "batch": None, "check_batch": None, "warmup": 5,
            "compile": "preset", "threads": None}
    for k, v in (tiny if args.tiny else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


# -- the table ---------------------------------------------------------------------------------

class Table:
    COLUMNS = ("section", "case", "metric", "value", "goal", "status", "detail")

    def __init__(self):
        self.rows: list[tuple[str, ...]] = []

    def add(self, section, case, metric, value, goal="", status="info", detail="") -> None:
        if isinstance(value, float):
            value = f"{value:.3g}" if math.isfinite(value) else str(value)
        row = tuple(map(str, (section, case, metric, value, goal, status, detail)))
        assert not any("|" in cell for cell in row), f"a cell holds the column separator: {row}"
        self.rows.append(row)

    def render(self) -> str:
        widths = [max(len(c), *(len(r[i]) for r in self.rows)) for i, c in enumerate(self.COLUMNS)]
        line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
        return "\n".join([line(self.COLUMNS), line(["-" * w for w in widths]), *map(line, self.rows)])


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def goal_status(ok: bool, on_cuda: bool) -> str:
    return ("PASS" if ok else "FAIL") if on_cuda else "n/a (cpu)"


# -- building cases the way bench_methods.py does ---------------------------------------------

class Setup:
    """What every case shares: the runtime, the preset's method params and recipe, the sizes."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        preset = load_preset(args.params)
        pair = next((p for p in preset.pairs if (p.teacher, p.student) == (args.teacher, args.student)), None)
        if pair is None:
            sys.exit(f"{args.params}: no pair {args.teacher} -> {args.student}")
        self.recipe = preset.recipes[args.recipe].for_method("tskd")
        # Each method's params as the preset writes them for this pair and recipe, defaults filled in.
        self.params = {m: parse_method_params(m, preset.method_params(m, pair, args.recipe)).model_dump(mode="json")
                       for m in ("kd", "tskd")}
        if args.compile != "preset":
            self.params["tskd"]["compile"] = args.compile == "on"
        self.batch = args.batch or self.recipe.batch_size
        self.check_batch = args.check_batch or self.batch
        # TF32 off: the fp32 correctness rows compare IEEE fp32 on both sides.
        cfg = TrainCfg(device=args.device, precision=args.precision, threads=args.threads, deterministic=False,
                       tf32=False)
        self.rt = select_runtime(cfg)
        self.on_cuda = self.rt.device.type == "cuda"
        self.compile_note = ""
        if self.params["tskd"]["compile"]:
            # Fail over to eager kernels rather than lose the whole (scarce) GPU run to a missing compiler.
            try:
                check_compiles(self.rt.device)
            except CompileUnavailable as e:
                self.params["tskd"]["compile"] = False
                self.compile_note = f"; compile unavailable, ran eager: {str(e).splitlines()[0][:160]}"
        self.mean, self.std = NORMALIZATION[self.recipe.normalization]

    def bench(self, method: str, rt: Runtime, params: dict | None = None) -> Bench:
        """A ``bench_methods.Bench`` (distiller, random batch) placed by ``rt``, with the recipe's optimizer."""
        a = self.args
        argv = ["--teacher", a.teacher, "--student", a.student, "--batch", str(self.batch), "--device",
                str(rt.device), "--train-size", str(a.train_size), "--epochs", str(a.epochs),
                *(["--channels-last"] if rt.channels_last else []), *(["--bf16"] if rt.precision == "bf16" else [])]
        b = Bench(method, bench_args(argv), self.params[method] | (params or {}))
        rt.place(b.d)  # the runtime is the authority on device and layout (a no-op after Bench's own .to)
        b.x, b.y, b.idx = rt.place_batch(b.x), rt.place_batch(b.y), rt.place_batch(b.idx)
        r = self.recipe
        b.opt = torch.optim.SGD(list(b.d.trainable_parameters()), lr=r.lr, momentum=r.momentum, nesterov=r.nesterov,
                                weight_decay=r.weight_decay)
        return b


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(b: Bench, rt: Runtime, x, y, idx, epoch: int, read_loss: bool):
    """One training step as tskd.engine.trainer runs it (its per-step loss read included)."""
    with rt.autocast():
        out, losses = b.d.forward_train(x, y, epoch, indices=idx)
    loss = sum(losses.values())
    if read_loss:
        # The trainer reads every step's loss for its NaN check: a host sync per step.
        math.isfinite(float(loss.detach()))
    b.opt.zero_grad(set_to_none=not b.d.keep_zeroed_grads())
    loss.backward()
    b.opt.step()
    return out, losses


# -- correctness --------------------------------------------------------------------------------

def fill_memory(b: Bench, review: int, seed: int = 1) -> None:
    """Snapshots for the review at ``review``, the student nudged before each and after the last (the
    same nudges on every copy), as training between nodes would move it. Unnudged, the increments
    |M1 - M2|, ... would be zero, and the last one, |S - Mk|, mere rounding noise whose sign (abs's
    gradient) differs between any two kernels."""
    p = b.d.params
    g = torch.Generator().manual_seed(seed)

    def nudge():
        with torch.no_grad():
            for t in b.d.student.parameters():
                t.add_(0.02 * t.detach().abs().mean() * torch.randn(t.shape, generator=g).to(t.device))

    for memory_epoch in cycle_memory_epochs(review, p.delta, p.k):
        nudge()
        b.d.on_epoch_end(memory_epoch)
    nudge()


def one_backward(b: Bench, rt: Runtime, x, y, idx, epoch: int, threads: int | None):
    """Loss terms and student gradients (on the CPU, fp32) of one forward + backward."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        b.d.train()
        b.d.on_epoch_start(epoch)
        with rt.autocast():
            _, losses = b.d.forward_train(rt.place_batch(x), rt.place_batch(y), epoch, indices=rt.place_batch(idx))
        b.d.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        sync(rt.device)
        grads = {n: p.grad.detach().float().cpu() for n, p in b.d.student.named_parameters() if p.grad is not None}
        return {k: float(v.detach()) for k, v in losses.items()}, grads
    finally:
        torch.set_num_threads(before)


def built_for_check(setup: Setup, method: str, params: dict | None = None) -> tuple[Bench, int]:
    """A distiller on the CPU, the same weights every time (Bench seeds), and the epoch to step:
    KD's first, TSKD's first review (with its memory filled)."""
    b = setup.bench(method, Runtime(CPU, contextlib.nullcontext, "fp32"), params)
    epoch = 0
    if method == "tskd":
        epoch = first_review_epoch(b.d)
        fill_memory(b, epoch)
    return b, epoch


def check_batch(setup: Setup):
    g = torch.Generator().manual_seed(2)
    n = setup.check_batch
    return (torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 100, (n,), generator=g),
            torch.randperm(setup.args.train_size, generator=g)[:n])


def reference(setup: Setup, method: str, threads: int | None):
    """Loss terms and student gradients of the CPU fp32 step: eager code (TSKD uncompiled), contiguous."""
    ref, epoch = built_for_check(setup, method, {"compile": False} if method == "tskd" else None)
    return one_backward(ref, Runtime(CPU, contextlib.nullcontext, "fp32"), *check_batch(setup), epoch, threads)


def compare(setup: Setup, table: Table, method: str, dev_rt: Runtime, dev_name: str, ref_result,
            dev_threads: int | None) -> None:
    ref_losses, ref_grads = ref_result
    dev, epoch = built_for_check(setup, method)  # TSKD's compile as the preset says
    dev_rt.place(dev.d)  # built as the reference was, then moved: the same weights and snapshots
    dev_losses, dev_grads = one_backward(dev, dev_rt, *check_batch(setup), epoch, dev_threads)
    tol = TOL[dev_rt.precision]
    step_name = f"{method} {'review ' if method == 'tskd' else ''}step"
    # Loss terms: the worst relative difference, named.
    loss_rel = {k: abs(dev_losses[k] - v) / max(abs(v), 1e-12) for k, v in ref_losses.items()}
    worst = max(loss_rel, key=loss_rel.get)
    loss_abs = max(abs(dev_losses[k] - v) for k, v in ref_losses.items())
    terms = ", ".join(f"{k}={v:.4g}" for k, v in ref_losses.items())
    table.add("correctness", f"{step_name}: {dev_name} vs cpu fp32", "loss rel. diff (worst term)",
              loss_rel[worst], f"<= {tol['loss']:g}", "PASS" if loss_rel[worst] <= tol["loss"] else "FAIL",
              f"worst {worst}; max abs diff {loss_abs:.2e}; terms {terms}")
    # Gradients, all student tensors as one vector: ‖Δ‖/‖ref‖ decides (the error of the update the
    # optimizer takes). The worst single tensor is shown, not judged: a small gradient that is a sum
    # with heavy cancellation has a large relative error in any summation order (bf16 on CPU: ~0.2-0.3
    # for one BatchNorm or conv tensor while the whole gradient is within 1-2e-2).
    assert ref_grads.keys() == dev_grads.keys(), "the two sides gave gradients to different parameters"
    flat_ref = torch.cat([t.flatten() for t in ref_grads.values()])
    flat_dev = torch.cat([dev_grads[k].flatten() for k in ref_grads])
    diff = flat_dev - flat_ref
    l2 = (diff.norm() / flat_ref.norm()).item()
    max_abs, ref_max = diff.abs().max().item(), flat_ref.abs().max().item()
    per_tensor = {n: (dev_grads[n] - r).abs().max().item() / max(r.abs().max().item(), 1e-30)
                  for n, r in ref_grads.items()}
    worst = max(per_tensor, key=per_tensor.get)
    table.add("correctness", f"{step_name}: {dev_name} vs cpu fp32", "student grads ‖Δ‖/‖ref‖", l2,
              f"<= {tol['grad']:g}", "PASS" if l2 <= tol["grad"] else "FAIL",
              f"max abs diff {max_abs:.2e} (max abs ref {ref_max:.2e}, rel {max_abs / ref_max:.2e}); worst tensor "
              f"{worst} max abs diff ÷ its max abs ref {per_tensor[worst]:.2e}; {len(ref_grads)} tensors")
    del dev


def correctness(setup: Setup, table: Table) -> None:
    a = setup.args
    for method in ("kd", "tskd"):
        if setup.on_cuda:
            log(f"correctness: {method}, cpu fp32 reference")
            ref = reference(setup, method, a.threads)
            # The run's runtime (bf16 autocast unless --precision fp32), then fp32 with TF32 off.
            runtimes = {f"cuda {setup.rt.precision}": setup.rt}
            if setup.rt.precision != "fp32":
                runtimes["cuda fp32"] = Runtime(setup.rt.device, contextlib.nullcontext, "fp32", channels_last=True)
            for name, rt in runtimes.items():
                log(f"correctness: {method}, {name} vs cpu fp32")
                compare(setup, table, method, rt, name, ref, None)
        else:
            # No GPU: fp32 against fp32 with another thread count, so every line above runs. Contiguous
            # on both sides, as select_runtime runs a CPU: channels_last would add the CPU BatchNorm
            # backward's own error (see TOL), which no CUDA run has.
            threads = max(a.threads or torch.get_num_threads(), 2)
            log(f"correctness: {method}, cpu fp32 {threads} threads vs cpu fp32 1 thread")
            ref = reference(setup, method, 1)
            compare(setup, table, method, setup.rt, f"cpu fp32 {threads} thr (ref 1 thr)", ref, threads)
        gc.collect()


# -- throughput ---------------------------------------------------------------------------------

class Data:
    """Synthetic CIFAR-100 training set, batched on the device by the project's data path if present."""

    def __init__(self, setup: Setup):
        a, self.setup = setup.args, setup
        g = torch.Generator().manual_seed(3)
        self.n = a.train_size
        self.images = torch.randint(0, 256, (self.n, 3, 32, 32), generator=g, dtype=torch.uint8)
        self.labels = torch.randint(0, 100, (self.n,), generator=g)
        dev = setup.rt.device
        if DeviceTrainSet is not None:
            self.set = DeviceTrainSet(self.images, self.labels, setup.mean, setup.std, augment=setup.recipe.augment)
            self.set.on(dev)  # copied to the device once, before any timing
            self.what = (f"tskd.data.device_loader.DeviceTrainSet ({'+'.join(setup.recipe.augment) or 'no'} "
                         "augmentation and normalisation on the device)")
        else:
            self.set = None
            self.dev_images, self.dev_labels = self.images.to(dev), self.labels.to(dev)
            self.what = ("batches gathered on the device (tskd.data.device_loader absent): permutation + "
                         "normalisation, no augmentation")
        self.mean = torch.tensor(setup.mean, device=dev).view(1, 3, 1, 1)
        self.std = torch.tensor(setup.std, device=dev).view(1, 3, 1, 1)

    def epoch(self, batch: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        dev = self.setup.rt.device
        if self.set is not None:
            return self.set.epoch(batch, g, device=dev)
        return self._own_epoch(batch, g, dev)

    def _own_epoch(self, batch, g, dev):
        perm = torch.randperm(self.n, generator=g).to(dev)
        for s in range(0, self.n, batch):
            idx = perm[s:s + batch]
            x = self.dev_images[idx].to(torch.float32).mul_(1 / 255).sub_(self.mean).div_(self.std)
            yield x, self.dev_labels[idx], idx

    def steps(self, batch: int) -> int:
        return -(-self.n // batch)


def timed_epoch(b: Bench, rt: Runtime, data: Data, batch: int, epoch: int, read_loss: bool, seed: int) -> float:
    """Seconds of one epoch as the trainer runs it: batches from the data path, per-term loss sums
    and train accuracy kept on the device, on_epoch_start/end."""
    d = b.d
    sync(rt.device)
    t0 = time.perf_counter()
    d.train()
    d.on_epoch_start(epoch)
    correct = torch.zeros((), dtype=torch.long, device=rt.device)
    sums: dict[str, torch.Tensor] = {}
    for x, y, idx in data.epoch(batch, seed):
        x, y, idx = rt.place_batch(x), rt.place_batch(y), rt.place_batch(idx)
        out, losses = step(b, rt, x, y, idx, epoch, read_loss)
        correct += (out.detach().argmax(1) == y).sum()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.detach().double() * y.shape[0]
    d.on_epoch_end(epoch)  # a no-op here: the cases time general and review epochs, not memory epochs
    float(correct)  # read at the end of the epoch, as the trainer does
    sync(rt.device)
    return time.perf_counter() - t0


def timed_pure(b: Bench, rt: Runtime, steps: int, epoch: int) -> float:
    """Seconds of ``steps`` steps on one batch already on the device: no data path, no host sync."""
    sync(rt.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(b, rt, b.x, b.y, b.idx, epoch, read_loss=False)
    sync(rt.device)
    return time.perf_counter() - t0


def warm_up(b: Bench, rt: Runtime, data: Data, batch: int, epoch: int, steps: int) -> None:
    """Untimed steps at the full batch and at the epoch's last, partial one: cuDNN autotuning and
    torch.compile see every shape before the clock runs."""
    last = data.n - (data.steps(batch) - 1) * batch
    for n in {batch, last}:
        for _ in range(steps):
            step(b, rt, b.x[:n], b.y[:n], b.idx[:n], epoch, read_loss=True)
    sync(rt.device)


def measure_case(setup: Setup, table: Table, data: Data, b: Bench, case: str, epoch: int) -> dict[str, float]:
    rt, batch, a = setup.rt, setup.batch, setup.args
    log(f"throughput: {case} (epoch {epoch})")
    warm_up(b, rt, data, batch, epoch, a.warmup)
    steps = data.steps(batch)
    pure = timed_pure(b, rt, steps, epoch)
    pure_ips = steps * batch / pure
    t = timed_epoch(b, rt, data, batch, epoch, read_loss=True, seed=epoch)
    t_free = timed_epoch(b, rt, data, batch, epoch, read_loss=False, seed=epoch + 1)
    ips, ips_free = data.n / t, data.n / t_free
    table.add("throughput", f"{case}: pure compute ({steps} steps, batch on device)", "img/s", pure_ips)
    table.add("throughput", f"{case}: epoch, trainer's step", "img/s", ips, "", "info", f"{t:.2f} s/epoch")
    table.add("throughput", f"{case}: epoch ÷ pure compute", "ratio", ips / pure_ips, ">= 0.9",
              goal_status(ips / pure_ips >= 0.9, setup.on_cuda), "incl. the trainer's per-step loss read")
    table.add("throughput", f"{case}: epoch without per-step loss read ÷ pure", "ratio", ips_free / pure_ips, "",
              "info", f"{t_free:.2f} s/epoch: the data path's own cost")
    return {"epoch_s": t, "pure_s": pure}


def timed_eval(b: Bench, rt: Runtime, eval_size: int, eval_batch: int) -> float:
    """Seconds of an evaluation pass (student forward, no grad) over ``eval_size`` images: compute only."""
    eval_batch = min(eval_batch, eval_size)
    x = rt.place_batch(torch.randn(eval_batch, 3, 32, 32))
    b.d.eval()
    with torch.no_grad(), rt.autocast():
        b.d(x)  # warm-up (eval-mode BatchNorm is another kernel)
        sync(rt.device)
        t0 = time.perf_counter()
        for _ in range(-(-eval_size // eval_batch)):
            b.d(x)
        sync(rt.device)
    b.d.train()
    return time.perf_counter() - t0


class Peak:
    """Peak CUDA memory of a case, counted from what was allocated when it began."""

    def __init__(self, device: torch.device):
        self.device = device
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)

    def gb(self) -> float:
        if self.device.type != "cuda":
            return float("nan")
        return (torch.cuda.max_memory_allocated(self.device) - self.base) / 1e9


def throughput(setup: Setup, table: Table, data: Data) -> None:
    rt, a = setup.rt, setup.args
    peak = Peak(rt.device)
    kd = setup.bench("kd", rt)
    kd_t = measure_case(setup, table, data, kd, "kd", 1)
    kd_peak = peak.gb()
    kd_eval = timed_eval(kd, rt, a.eval_size, TrainCfg().eval_batch_size)
    del kd
    peak = Peak(rt.device)
    ts = setup.bench("tskd", rt)
    review = first_review_epoch(ts.d)
    general = review + 1
    gen_t = measure_case(setup, table, data, ts, "tskd general", general)
    # A memory epoch is a general epoch plus one snapshot: time the snapshots of the review's cycle.
    p = ts.d.params
    sync(rt.device)
    t0 = time.perf_counter()
    for memory_epoch in cycle_memory_epochs(review, p.delta, p.k):
        ts.d.on_epoch_end(memory_epoch)
    sync(rt.device)
    snapshot_s = (time.perf_counter() - t0) / p.k
    rev_t = measure_case(setup, table, data, ts, "tskd review", review)
    tskd_peak = peak.gb()
    del ts
    gc.collect()

    counts = summarize_schedule(a.epochs, p.delta, p.k).counts
    train_s = ((counts["general"] + counts["memory"]) * gen_t["epoch_s"] + counts["review"] * rev_t["epoch_s"]
               + counts["memory"] * snapshot_s)
    total_min = (train_s + a.epochs * kd_eval) / 60
    table.add("projection", f"tskd {a.epochs} epochs, {data.n} train images", "minutes", total_min, "<= 15",
              goal_status(total_min <= 15, setup.on_cuda),
              f"{counts['general']} general + {counts['memory']} memory × {gen_t['epoch_s']:.2f} s, "
              f"{counts['review']} review × {rev_t['epoch_s']:.2f} s, {counts['memory']} snapshots × "
              f"{snapshot_s * 1e3:.1f} ms, {a.epochs} evals of {a.eval_size} images × {kd_eval:.2f} s (compute only)")
    table.add("projection", f"kd {a.epochs} epochs (for scale)", "minutes",
              (a.epochs * (kd_t["epoch_s"] + kd_eval)) / 60)
    if setup.on_cuda:
        ratio = tskd_peak / kd_peak
        table.add("memory", "tskd peak ÷ kd peak (max_memory_allocated)", "ratio", ratio, "<= 1.3",
                  goal_status(ratio <= 1.3, True), f"kd {kd_peak:.2f} GB, tskd {tskd_peak:.2f} GB (general + review)")
    else:
        table.add("memory", "tskd peak ÷ kd peak", "ratio", "n/a", "<= 1.3", "n/a (cpu)",
                  "torch.cuda.max_memory_allocated is CUDA-only; the CPU has no per-case allocator peak "
                  "(process RSS would count both cases and the data set)")


# -- main ---------------------------------------------------------------------------------------

def env_rows(setup: Setup, table: Table) -> None:
    rt = setup.rt
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    table.add("env", "torch", "version", torch.__version__, "", "info",
              f"CUDA {torch.version.cuda or 'none'}, cuDNN {cudnn or 'none'}, python {platform.python_version()}")
    if setup.on_cuda:
        props = torch.cuda.get_device_properties(rt.device)
        name = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    else:
        name = f"CPU {platform.machine()} {platform.processor() or ''}".strip()
    table.add("env", "device", "name", name, "", "info", f"{torch.get_num_threads()} torch threads")
    table.add("env", "runtime", "precision", rt.precision, "", "info",
              f"device {rt.device}, channels_last {rt.channels_last}, TF32 matmul "
              f"{torch.backends.cuda.matmul.allow_tf32} / cuDNN {torch.backends.cudnn.allow_tf32}, "
              f"cudnn.benchmark {torch.backends.cudnn.benchmark}")
    a = setup.args
    table.add("env", "pair", "batch", setup.batch, "", "info",
              f"{a.teacher} -> {a.student}, recipe {a.recipe} ({setup.recipe.normalization} normalisation), "
              f"kd {json.dumps(setup.params['kd'], separators=(',', ':'))}, tskd delta={setup.params['tskd']['delta']} "
              f"k={setup.params['tskd']['k']} taps={setup.params['tskd']['taps']} "
              f"compile={setup.params['tskd']['compile']}{setup.compile_note}")


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    setup = Setup(args)
    table = Table()
    env_rows(setup, table)
    data = Data(setup)
    table.add("env", "data", "train images", data.n, "", "info", data.what)
    correctness(setup, table)
    throughput(setup, table, data)
    table.add("env", "this check", "seconds", time.perf_counter() - t0)
    print(table.render(), flush=True)
    return 1 if any(r[5] == "FAIL" for r in table.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
