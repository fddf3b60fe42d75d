"""The ConvLSTM encoder-forecaster that predicts the next knowledge increment (METHOD.md §2).

Math as in the authors' code; two savings that do not change it: the half of a gate
convolution that reads the input does not depend on the hidden state, so it runs for all
time steps in one batched convolution; and the terms that multiply an all-zero tensor
(the encoder's initial state, the forecaster's zero input) are skipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_IN = 8  # channels of the encoder's downsampling conv and the forecaster's upsampling convs


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

    def input_gates(self, x: Tensor) -> Tensor:
        """The input's share of the gate pre-activations (bias included), for any number of steps."""
        return F.conv2d(x, self.conv.weight[:, : self.in_channels], self.conv.bias, padding=self.conv.padding)

    def step(self, gates_x: Tensor, state: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """One time step from the input's gate share; ``state=None`` is the all-zero state."""
        gates = gates_x
        if state is not None:
            gates = gates + F.conv2d(state[0], self.conv.weight[:, self.in_channels :], padding=self.conv.padding)
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(i) * torch.tanh(g)
        if state is not None:
            c = c + torch.sigmoid(f) * state[1]
        return torch.sigmoid(o) * torch.tanh(c), c


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
        if self.encoder.conv.weight.is_contiguous(memory_format=torch.channels_last):
            # A 1-channel input cannot carry channels-last on by itself: follow the module's format.
            x = x.contiguous(memory_format=torch.channels_last)
        gates_x = self.encoder.input_gates(x).unflatten(0, (k, b))
        state = None
        for step_gates in gates_x.unbind(0):  # unbind, not indexing: its backward is one stack, not k zero-fills
            state = self.encoder.step(step_gates, state)
        # Zero input: its gate share is the bias alone.
        h, _ = self.forecaster.step(self.forecaster.conv.bias.view(1, -1, 1, 1), state)
        return self.up(h)[..., :height, :width]


def auto_hidden(tap_sizes: list[tuple[int, int]]) -> tuple[int, ...]:
    """Hidden width per branch: 64 at the largest tap resolution, 32 at smaller ones.

    This one rule gives the authors' hand-picked widths: 64, 64, 32 for ResNet/WRN students
    (taps 32, 32, 16 px) and 64, 32, 32 for VGG-8 (32, 16, 8 px).
    """
    largest = max(h * w for h, w in tap_sizes)
    return tuple(64 if h * w == largest else 32 for h, w in tap_sizes)
