"""The ConvLSTM encoder-forecaster that predicts the next knowledge increment (docs/method.md).

Math as in the authors' code, minus the terms that multiply an all-zero tensor: the encoder
starts from a zero state and the forecaster is fed zeros, so those halves of their gate
convolutions are skipped. The gate nonlinearities have a hand-written backward (see
``_Gates``). Batching the input's share of the gates over all k steps in one convolution
(it does not depend on the hidden state) was tried and is slower: an 8-channel-input
convolution runs far below a CPU's peak, while 8 more input channels on the 64-channel
hidden-state convolution cost little. For the gate convolutions of one 64-wide branch at
batch 128 (k = 3, forward and backward, 2 CPU threads): 430 ms folded, 540 ms batched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

_IN = 8  # channels of the encoder's downsampling conv and the forecaster's upsampling convs
_sigmoid_backward = torch.ops.aten.sigmoid_backward  # (grad, sigmoid(x)) -> grad * s * (1 - s), one pass
_tanh_backward = torch.ops.aten.tanh_backward  # (grad, tanh(x)) -> grad * (1 - t^2), one pass


class _Gates(torch.autograd.Function):
    """``(h', c', gates)`` from the gate pre-activations ``gates`` = ``[i, f, g, o]`` and the previous
    cell ``c``; ``gates`` is overwritten (see below) and comes back as the third output, to be ignored.

    Autograd would build the gates' gradient from four chunk gradients with a concatenation,
    one more full pass over the largest tensor of the step; here each gate's gradient is
    written straight into its slice of one buffer, with PyTorch's fused sigmoid/tanh
    backward kernels. ``c=None`` is the all-zero cell, which the forget gate then multiplies.

    That buffer is ``gates`` itself: the activations overwrite the pre-activations in place (the
    convolution that made them keeps only its input), are kept for the backward in place of four
    copies, and each gate's gradient then overwrites its activation once nothing else reads it.
    The same kernels on the same strides, so the same bits; what is saved is one allocation of
    the step's largest tensor in the forward (the four copies) and one in the backward (the
    gradient): on CPU a fresh tensor that large (>= 32 MB at batch 128) costs as much as a pass
    over it, because glibc maps it from the kernel page by page and unmaps it when freed. A second
    backward through the same graph is refused (the saved activations are then gradients: their
    version has moved, which autograd checks).
    """

    @staticmethod
    def forward(ctx, gates: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        i, f, g, o = gates.chunk(4, dim=1)
        si, tg, so = i.sigmoid_(), g.tanh_(), o.sigmoid_()
        c_new = si * tg
        if c is not None:
            c_new = c_new.addcmul_(f.sigmoid_(), c)  # the forget gate: left as it is for the zero cell
        tc = torch.tanh(c_new)
        ctx.set_materialize_grads(False)
        ctx.mark_dirty(gates)
        ctx.save_for_backward(gates, tc, c)
        return so * tc, c_new, gates

    @staticmethod
    def backward(ctx, dh: Tensor | None, dc: Tensor | None, _: None) -> tuple[Tensor, Tensor | None]:
        gates, tc, c = ctx.saved_tensors
        si, sf, tg, so = gates.chunk(4, dim=1)
        di, df, dg, do = si, sf, tg, so  # each gate's gradient replaces its activation
        if dh is None:
            do.zero_()
            dc_total = dc if dc is not None else torch.zeros_like(tc)
        else:
            dc_total = _tanh_backward(dh * so, tc)  # reads so: before do overwrites it
            _sigmoid_backward(dh * tc, so, grad_input=do)
            if dc is not None:
                dc_total = dc_total.add_(dc)
        # di reads tg and dg reads si: both products first.
        d_si, d_tg = dc_total * tg, dc_total * si
        _sigmoid_backward(d_si, si, grad_input=di)
        _tanh_backward(d_tg, tg, grad_input=dg)
        if c is None:
            df.zero_()
            return gates, None
        dc_prev = dc_total * sf if ctx.needs_input_grad[1] else None  # reads sf: before df overwrites it
        _sigmoid_backward(dc_total * c, sf, grad_input=df)
        return gates, dc_prev


class ConvLSTMCell(nn.Module):
    """Gates ``[i, f, g, o] = Conv([x; h])``; ``c' = s(f)c + s(i)tanh(g)``; ``h' = s(o)tanh(c')``.

    One convolution over the concatenation, as in the authors' code (so also their
    initialisation: fan-in = in + hidden channels). Their peephole weights are never
    registered as parameters and stay zero, so they are left out.
    """

    def __init__(self, in_channels: int, hidden: int, kernel_size: int = 3):
        super().__init__()
        self.in_channels, self.hidden = in_channels, hidden
        self.conv = nn.Conv2d(in_channels + hidden, 4 * hidden, kernel_size, padding=kernel_size // 2)

    def step(self, x: Tensor | None, state: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """One time step. ``x=None`` is an all-zero input, ``state=None`` the all-zero state."""
        conv, n = self.conv, self.in_channels
        if state is None:
            gates = F.conv2d(x, conv.weight[:, :n], conv.bias, padding=conv.padding)
        elif x is None:
            gates = F.conv2d(state[0], conv.weight[:, n:], conv.bias, padding=conv.padding)
        else:
            gates = conv(torch.cat([x, state[0]], dim=1))
        h, c, _ = _Gates.apply(gates, None if state is None else state[1])
        return h, c


class IncrementForecaster(nn.Module):
    """One branch: encode k increment frames, forecast the next one at the same size.

    Encoder: Conv(1->8, k3, s2, p1) + LeakyReLU(0.2), then a ConvLSTM (8->h) over the k
    steps. Forecaster: a ConvLSTM (h->h) started from the encoder's (h, c), fed zeros for
    one step, then ConvTranspose(h->8, k4, s2, p1) + LeakyReLU, Conv(8->8, k3) + LeakyReLU,
    Conv(8->1, k1). For an odd H (or W) the stride-2 pair gives back H+1 rows; the extra
    last row (column) is cropped, so the output always has the input frames' size.
    """

    def __init__(self, hidden: int):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(1, _IN, 3, stride=2, padding=1), nn.LeakyReLU(0.2))
        self.encoder = ConvLSTMCell(_IN, hidden)
        self.forecaster = ConvLSTMCell(hidden, hidden)
        self.up = nn.Sequential(
            nn.ConvTranspose2d(hidden, _IN, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(_IN, _IN, 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(_IN, 1, 1),
        )

    def forward(self, frames: Tensor) -> Tensor:
        """``frames``: (k, B, 1, H, W), oldest first -> the predicted next frame (B, 1, H, W)."""
        k, b, _, height, width = frames.shape
        x = self.down(frames.flatten(0, 1))
        # Channels-last from here on: oneDNN (CPU) and cuDNN run these small-channel convolutions
        # faster in NHWC (on CPU about 10% off a forecaster's step), and a convolution follows its
        # input's layout. The frames have one channel, so they cannot carry the layout themselves,
        # and the forecast is one channel again: nothing outside sees it.
        x = x.contiguous(memory_format=torch.channels_last)
        state = None
        for x_t in x.unflatten(0, (k, b)).unbind(0):  # unbind: its backward is one stack, not k zero-fills
            state = self.encoder.step(x_t, state)
        h, _ = self.forecaster.step(None, state)
        return self.up(h)[..., :height, :width]


def forecast(forecaster: IncrementForecaster, frames: Tensor, recompute: bool) -> Tensor:
    """``forecaster(frames)``; with ``recompute``, the forecaster's activations (its gates and cells,
    over k steps: most of what a review step adds to KD's memory) are not kept for the backward
    but computed again during it (``torch.utils.checkpoint``). The same numbers, bit for bit on
    CPU (tests/test_tskd.py); one more forecaster forward per review step."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(forecaster, frames, use_reentrant=False)
    return forecaster(frames)


def recomputed_branches(hidden: tuple[int, ...] | list[int], tap_sizes: list[tuple[int, int]]) -> frozenset[int]:
    """The branches whose forecasters ``recompute_forecasters`` recomputes: the first ones, up to the one
    that holds the most activations (``hidden`` x tap area, the first of equals).

    A review step's memory peaks where its backward starts, every branch's activations held.
    Autograd differentiates the branches last to first and frees each one's activations as it
    goes, so a kept later branch is gone before an earlier one is rebuilt, while a kept earlier
    branch stays through every later one's backward. Recomputing the branches up to the largest
    removes it and all that would be held with it from the peak, which is then about the largest
    branch alone (rebuilt in its backward), as with every branch recomputed, for fewer forwards.
    With the taps in order, largest map first, that is the first branch only.
    """
    sizes = [c * h * w for c, (h, w) in zip(hidden, tap_sizes, strict=True)]
    return frozenset(range(sizes.index(max(sizes)) + 1))


def auto_hidden(tap_sizes: list[tuple[int, int]]) -> tuple[int, ...]:
    """Hidden width per branch: 64 at the largest tap resolution, 32 at smaller ones.

    This one rule gives the authors' hand-picked widths: 64, 64, 32 for ResNet/WRN students
    (taps 32, 32, 16 px) and 64, 32, 32 for VGG-8 (32, 16, 8 px).
    """
    largest = max(h * w for h, w in tap_sizes)
    return tuple(64 if h * w == largest else 32 for h, w in tap_sizes)
