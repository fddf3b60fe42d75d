"""``torch.compile`` for TSKD's memory-bound parts, with a clear error where it cannot run.

A review step's extra convolutions already run near a CPU's peak. Of what is left, the
snapshot forwards' train-mode BatchNorm and ReLU, and the attention maps, are chains of
elementwise passes over full feature maps that eager PyTorch runs one pass per op; inductor
fuses each chain. Same math up to float rounding; the kernels are deterministic, so a resumed
run still ends with the uninterrupted run's numbers when both compile. (The ConvLSTM gate
nonlinearities were tried too: fused kernels, no faster within a whole forecaster step.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tskd.errors import TskdError

PARAM = "methods.tskd.compile"


class CompileUnavailable(TskdError, RuntimeError):
    """``compile: true`` on a machine that cannot build the kernels."""


class Compiled:
    """``torch.compile(fn)``; a backend that cannot build here (no C++ compiler, which CPU kernels
    and Triton's CUDA launchers both need; no Triton) raises an error naming the param."""

    def __init__(self, fn: Callable, what: str, param: str = PARAM, **options):
        self._fn, self._what, self._param = torch.compile(fn, **options), what, param

    def __call__(self, *args):
        try:
            return self._fn(*args)
        except torch._dynamo.exc.BackendCompilerFailed as e:
            reason = str(e).strip().splitlines()[0]
            raise CompileUnavailable(f"{self._param}: true, but torch.compile cannot build {self._what} on this "
                                     f"machine ({reason}). Install a C++ compiler (g++; on CUDA also Triton), or set "
                                     f"{self._param}: false") from e


def maybe_compiled(fn: Callable, enabled: bool, what: str, **options) -> Callable:
    return Compiled(fn, what, **options) if enabled else fn


def check_compiles(device: torch.device, param: str = PARAM) -> None:
    """Build and run a tiny kernel on ``device`` now, so that a machine where compiling cannot
    work fails before training rather than at the first review epoch."""
    Compiled(lambda x: torch.sigmoid(x) * x, "a test kernel", param, dynamic=False)(torch.ones(2, device=device))
