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

import torch
import torch.fx as fx
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
        self.module = (traced if self.truncated else runner).train(train_bn)
        self._names = _tensor_names(self.module)

    def __call__(self, tensors: dict[str, Tensor], images: Tensor) -> list[Tensor]:
        """The first ``last_tap + 1`` feature taps of ``images`` under the weights ``tensors``."""
        out = functional_call(self.module, {n: tensors[n] for n in self._names}, (images,))
        return list(out) if self.truncated else out[1]["feats"][: self.last_tap + 1]

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
