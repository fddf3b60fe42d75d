"""A network's size as the papers' tables give it: its parameters and its multiply-accumulates per
image at the input size it was trained on, counted by torch's own FLOP counter on the exported
model file (``model.pt`` records the architecture, the classes and the input size)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class NetworkCost:
    params: int
    macs: int | None  # per image; None where the size of an input is not fixed (detection)
    image_size: tuple[int, int] | None

    def cell(self) -> str:
        """``0.86 M params · 125.8 M MACs``."""
        macs = "" if self.macs is None else f" · {_scaled(self.macs)} MACs"
        return f"{_scaled(self.params)} params{macs}"


def _scaled(n: int) -> str:
    return f"{n / 1e9:.2f} G" if n >= 1e9 else f"{n / 1e6:.2f} M"


def network_cost(model_file: Path) -> NetworkCost:
    """Parameters and MACs of the network a ``model.pt`` holds. MACs are half of the FLOPs that
    torch.utils.flop_counter counts for one image (a multiply-add is two FLOPs), in eval mode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tskd.models import create_model, model_entry  # lazy: torch

    blob = torch.load(model_file, map_location="cpu", weights_only=True)
    arch = blob["arch"]
    model = create_model(arch, num_classes=blob["num_classes"])
    params = sum(p.numel() for p in model.parameters())
    size = (blob.get("input") or {}).get("image_size")
    if model_entry(arch).family == "detection" or not size:
        return NetworkCost(params, None, None)
    h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, h, w))
    return NetworkCost(params, counter.get_total_flops() // 2, (h, w))
