"""A model's forward cut short after a feature tap, run with weights passed per call.

Snapshots only feed the first few taps (the stem and early stages), so running them to the
logits would waste a large share of their cost. Rather than ask every model for a
truncation hook, the model is traced with ``torch.fx`` and every op the wanted taps do not
depend on is dropped. The weights come with each call (``torch.func.functional_call``), so
one weight-less (meta) copy serves all k snapshots and no snapshot is ever written to.
"""

from __future__ import annotations

import copy
import logging
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

log = logging.getLogger(__name__)


class _PrefixTracer(fx.Tracer):
    """Traces through every custom module. A branch on a traced value (e.g. VGG's "pool only
    if the map is still larger than 4x4") is guessed, and the node count at the first guess is
    kept: only ops recorded before it are certain to be what the model computes."""

    first_guess: int | None = None

    def to_bool(self, obj) -> bool:
        if self.first_guess is None:
            self.first_guess = len(self.graph.nodes)
        return True


def _trace_prefix(model: nn.Module, last_tap: int) -> fx.GraphModule | None:
    """``model`` traced to return ``taps["feats"][: last_tap + 1]`` only; None when that is unsafe."""
    tracer = _PrefixTracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # any model fx cannot trace keeps its full forward
        log.info("fx cannot trace %s (%s): snapshots run the full forward", type(model).__name__, e)
        return None
    output = next(n for n in graph.nodes if n.op == "output")
    try:
        wanted = tuple(output.args[0][1]["feats"][: last_tap + 1])
    except (TypeError, KeyError, IndexError):
        return None
    if len(wanted) != last_tap + 1 or not all(isinstance(n, fx.Node) for n in wanted):
        return None
    position = {n: i for i, n in enumerate(graph.nodes)}
    output.args = (wanted,)
    traced = fx.GraphModule(model, graph)
    traced.graph.eliminate_dead_code()
    if tracer.first_guess is not None and any(position[n] >= tracer.first_guess for n in traced.graph.nodes
                                              if n.op != "output"):
        return None  # a kept op depends on a guessed branch
    traced.delete_all_unused_submodules()
    traced.recompile()
    return traced


class _BatchNormInPlace(nn.BatchNorm2d):
    """``BatchNorm2d`` that writes its output over its input: on CPU, without autograd, outside
    ``torch.compile`` and autocast, the very kernel ``F.batch_norm`` runs there (``native_batch_norm``,
    here its ``out`` form), so the same values; elsewhere the plain module. For inputs that nothing
    else reads (see ``_in_place``)."""

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling()
                or torch.is_autocast_enabled("cpu") or x.dtype != self.weight.dtype):
            return super().forward(x)
        # BatchNorm2d.forward's arguments, for a module that tracks no running statistics (TapPrefix's).
        assert not self.track_running_stats
        running = (None, None) if self.training else (self.running_mean, self.running_var)
        training = self.training or self.running_mean is None
        momentum = 0.0 if self.momentum is None else self.momentum
        out, _, _ = torch.ops.aten.native_batch_norm.out(
            x, self.weight, self.bias, *running, training, momentum, self.eps,
            out=x, save_mean=x.new_empty(0), save_invstd=x.new_empty(0))
        return out


def _in_place(traced: fx.GraphModule) -> int:
    """Rewrite the ops of ``traced`` whose first input is a fresh tensor that nothing else reads (a
    convolution's or BatchNorm's output, or such an addition's) into in-place ops: BatchNorms (a
    module called only so), ReLUs and residual additions; returns how many. Only for a forward
    without autograd, which snapshots are.

    The same kernels, so the same values; what goes is an allocation per op: on CPU a feature map
    of 32 MB or more (64 channels at 32x32, batch 128) comes fresh from the kernel page by page
    (glibc maps blocks that large and unmaps them when freed), which costs several passes over it."""
    modules = dict(traced.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    for node in traced.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)

    def fresh(node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(modules.get(node.target), nn.Conv2d | nn.BatchNorm2d)
        return node.op == "call_function" and node.target in (operator.add, operator.iadd)

    def sole_reader(node: fx.Node) -> bool:
        first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        return first is not None and len(first.users) == 1 and fresh(first)

    rewritten = 0
    for name, nodes in calls.items():
        m = modules[name]
        if type(m) is nn.BatchNorm2d and all(len(n.args) == 1 and not n.kwargs and sole_reader(n) for n in nodes):
            swapped = _BatchNormInPlace(m.num_features, m.eps, m.momentum, m.affine, track_running_stats=False,
                                        device=m.weight.device, dtype=m.weight.dtype)
            swapped.train(m.training)
            swapped.register_buffer("running_mean", m.running_mean)  # kept for eval mode, as the module's
            swapped.register_buffer("running_var", m.running_var)
            parent, _, child = name.rpartition(".")
            setattr(traced.get_submodule(parent) if parent else traced, child, swapped)
            rewritten += len(nodes)
    for node in traced.graph.nodes:
        if node.op != "call_function" or not sole_reader(node):
            continue
        if node.target is F.relu and len(node.args) == 1 and not node.kwargs.get("inplace", False):
            node.kwargs = {**node.kwargs, "inplace": True}
        elif node.target is operator.add and len(node.args) == 2 and not node.kwargs:
            node.target = operator.iadd  # a tensor's += is add_: the sum lands in the first operand
        else:
            continue
        rewritten += 1
    traced.recompile()
    return rewritten


class TapPrefix:
    """Computes ``model(x)[1]["feats"][: last_tap + 1]`` for any weights of ``model``'s architecture.

    ``train_bn``: BatchNorm normalises with the batch's statistics (True) or with the running
    statistics passed in with the weights (False); running statistics are never updated.
    ``truncated`` says whether the cut worked; if not, the full forward runs (same values).
    """

    def __init__(self, model: nn.Module, last_tap: int, image_size: tuple[int, int], train_bn: bool):
        runner = copy.deepcopy(model).to("meta")  # the architecture only: weights come per call
        for m in runner.modules():
            if hasattr(m, "track_running_stats"):
                m.track_running_stats = False  # train mode then uses batch statistics and updates nothing
        self.last_tap = last_tap
        traced = _trace_prefix(runner, last_tap)
        self.truncated = traced is not None and self._agrees(traced, model, image_size)
        if self.truncated:
            traced = self._with_in_place_ops(traced, model, image_size)
        self.module = (traced if self.truncated else runner).train(train_bn)
        self._names = _tensor_names(self.module)

    @torch.no_grad()  # the graph's in-place ops (see _in_place) would break a backward
    def __call__(self, tensors: dict[str, Tensor], images: Tensor) -> list[Tensor]:
        """The first ``last_tap + 1`` feature taps of ``images`` under the weights ``tensors``."""
        out = functional_call(self.module, {n: tensors[n] for n in self._names}, (images,))
        return list(out) if self.truncated else out[1]["feats"][: self.last_tap + 1]

    def _with_in_place_ops(self, traced: fx.GraphModule, model: nn.Module, image_size: tuple[int, int]
                           ) -> fx.GraphModule:
        """``traced`` with its ReLUs and residual additions in place where that is safe (``_in_place``),
        once a random batch gives exactly its values in both BatchNorm modes; else ``traced`` as it is."""
        rewritten = copy.deepcopy(traced)
        if not _in_place(rewritten):
            return traced
        p = next(model.parameters())
        x = torch.randn(2, 3, *image_size, generator=torch.Generator().manual_seed(1)).to(p.device, p.dtype)
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        names = _tensor_names(traced)
        try:
            with torch.no_grad():
                for train in (True, False):
                    want = functional_call(traced.train(train), {n: tensors[n] for n in names}, (x,))
                    got = functional_call(rewritten.train(train), {n: tensors[n] for n in names}, (x,))
                    if not all(torch.equal(g, w) for g, w in zip(got, want, strict=True)):
                        raise ValueError("different values")
        except Exception as e:  # e.g. an addition that broadcasts its first operand
            log.info("in-place ops change the prefix of %s (%s): snapshots keep out-of-place ones",
                     type(model).__name__, e)
            return traced
        return rewritten

    def _agrees(self, traced: fx.GraphModule, model: nn.Module, image_size: tuple[int, int]) -> bool:
        """Check the cut graph against the real model once, on a random batch, in eval mode."""
        p = next(model.parameters())
        x = torch.randn(2, 3, *image_size, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        was_training = model.training
        model.eval()
        traced.eval()
        try:
            with torch.no_grad():
                want = model(x)[1]["feats"][: self.last_tap + 1]
                got = functional_call(traced, {n: tensors[n] for n in _tensor_names(traced)}, (x,))
        finally:
            model.train(was_training)
        ok = len(got) == len(want) and all(torch.allclose(g, w, rtol=1e-5, atol=1e-6)
                                           for g, w in zip(got, want, strict=True))
        if not ok:
            log.warning("the traced prefix of %s disagrees with its forward: snapshots run the full forward",
                        type(model).__name__)
        return ok


def _tensor_names(module: nn.Module) -> list[str]:
    # A cut graph holds fewer modules than a snapshot names: only its own tensors are passed in.
    return [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
