"""What a TSKD run keeps for the report's attention figure, and that keeping it changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from tskd.distill.tskd.recorder import FigureRecorder
from tskd.engine.trainer import Trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _rows(m: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in m["history"]]


@pytest.mark.slow
def test_tskd_keeps_one_review_steps_attention_without_changing_the_run(make_spec):
    teacher = make_spec(out="teacher", recipe={"epochs": 1, "milestones": []})
    train(teacher)
    spec = make_spec(out="tskd", method="tskd", method_params={"delta": 1, "k": 2}, teacher_arch="resnet8",
                     teacher_path=str(Path(teacher.out_dir) / "model.pt"), recipe={"epochs": 3, "milestones": [2]})
    m = train(spec)
    cap = m["capture"]
    # Epochs 1-2 are memory nodes, epoch 3 the first review: its k=2 frames, forecast and target.
    assert cap["epoch"] == 3 and cap["tap"] == 0 and len(cap["frames"]) == 2
    assert all(len(g) == 32 and len(g[0]) == 32 for g in (*cap["frames"], cap["forecast"], cap["target"]))
    assert max(max(row) for row in cap["target"]) > 0
    # Epochs are numbered from 1, as the log's "epoch 3/3"; every row has every column (the review
    # loss is None outside review epochs), which DVC's plots need.
    assert [r["epoch"] for r in m["history"]] == [1, 2, 3] and 1 <= m["best_epoch"] <= 3
    assert [r["train_review"] is None for r in m["history"]] == [True, True, False]

    # The same run without the capture: the same numbers to the last bit.
    quiet = make_spec(out="quiet", method="tskd", method_params={"delta": 1, "k": 2}, teacher_arch="resnet8",
                      teacher_path=str(Path(teacher.out_dir) / "model.pt"), recipe={"epochs": 3, "milestones": [2]})
    t = Trainer(quiet)
    t.observers = [o for o in t.observers if not isinstance(o, FigureRecorder)]  # nobody asks for it
    plain = t.run()
    assert "capture" not in plain and _rows(plain) == _rows(m)


def test_other_methods_keep_nothing(make_spec):
    m = train(make_spec(recipe={"epochs": 1, "milestones": []}))
    assert "capture" not in m and [r["epoch"] for r in m["history"]] == [1] and m["best_epoch"] == 1
