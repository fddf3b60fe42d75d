"""MLflow's runs table shows about 18 characters of a run's name: there, every parent of a grid
differs from the other parents, and every seed from its siblings (issue #24 §4)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from tskd.spec.config import load_preset
from tskd.tracking.runs import grid_specs, group_name, parent_name, run_name

REPO = Path(__file__).resolve().parents[1]
SHOWN = 18  # characters of the name column, at its default width


@pytest.mark.parametrize("preset", ["smoke", "cifar100"])
def test_names_differ_in_the_characters_the_runs_table_shows(preset):
    specs = grid_specs(load_preset(REPO / f"params/{preset}.yaml"))
    parents = {group_name(s): parent_name(s) for s in specs}
    shown = defaultdict(list)
    for group, name in parents.items():
        shown[name[:SHOWN]].append(group)
    assert not {k: v for k, v in shown.items() if len(v) > 1}
    seeds = defaultdict(list)
    for s in specs:
        seeds[group_name(s)].append(run_name(s)[:SHOWN])
    assert all(len(set(names)) == len(names) for names in seeds.values()), seeds
    teachers = [run_name(s)[:SHOWN] for s in specs if s.role == "teacher"]
    assert len(set(teachers)) == len(teachers)
    assert max(len(v) for v in seeds.values()) > 1  # the presets have seeds to tell apart
