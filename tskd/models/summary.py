"""The model list that ``tskd models`` prints: name, family, parameter count, small-model flag."""

from __future__ import annotations

import torch

from tskd.models.registry import create_model, list_models, model_entry


def count_params(name: str, num_classes: int | None = None) -> int:
    """Parameter count of architecture ``name`` (with its family's class count unless given), built on
    the meta device (no memory, no init cost)."""
    num_classes = num_classes or model_entry(name).default_classes
    try:
        with torch.device("meta"):
            model = create_model(name, num_classes=num_classes)
    except Exception:  # a factory that loads real weights cannot run on meta: build it for real
        model = create_model(name, num_classes=num_classes)
    return sum(p.numel() for p in model.parameters())


def model_table(family: str | None = None) -> list[dict]:
    """One row per registered model (optionally one family): name, family, params, small."""
    rows = []
    for name in list_models(family):
        entry = model_entry(name)
        params = count_params(name)
        rows.append({"name": name, "family": entry.family, "params": params, "small": entry.small})
    return rows


def format_model_table(rows: list[dict]) -> str:
    """Plain aligned text table of ``model_table`` rows; parameters in millions."""
    header = ("name", "family", "params (M)", "small")
    cells = [(r["name"], r["family"], f"{r['params'] / 1e6:.2f}", "yes" if r["small"] else "") for r in rows]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    lines = []
    for row in [header, *cells]:
        name, family, params, small = (c.ljust(w) for c, w in zip(row, widths, strict=True))
        params = row[2].rjust(widths[2])  # numbers right-aligned
        lines.append("  ".join([name, family, params, small]))
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)
