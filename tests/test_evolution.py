"""Feature-map evolution (tskd.engine.evolution, tskd.distill.tskd.evolution): a TSKD run's attention maps of
fixed test images at each memory node, in evolution.npz; that following them changes no number of the
run; that a resumed run ends with the same file; and the grid the report draws of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.kill import KillAt
from tskd.distill.tskd.attention import attention_map
from tskd.engine.evolution import EVOLUTION_FILE, read_evolution, watched_indices
from tskd.engine.loaders import build_run_data
from tskd.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture
def teacher_path(make_spec):
    from tskd.engine.trainer import train

    teacher = make_spec(out="teacher", recipe={"epochs": 1, "milestones": []})
    train(teacher)
    return str(Path(teacher.out_dir) / "model.pt")


def _spec(make_spec, teacher_path, out, **params):
    # Nodes every epoch, k 2: memory M1, M2 | review | memory M1 (the last epoch, so model.pt is that snapshot).
    return make_spec(out=out, method="tskd", teacher_arch="resnet8", teacher_path=teacher_path,
                     method_params={"delta": 1, "k": 2, **params}, recipe={"epochs": 4, "milestones": [3]})


def test_watched_images_spread_over_the_split():
    assert watched_indices(100, 4) == [0, 25, 50, 75]
    assert watched_indices(3, 8) == [0, 1, 2]  # a split smaller than asked for: all of it


@pytest.mark.slow
def test_memory_nodes_maps_of_fixed_images(make_spec, teacher_path):
    from tskd.engine.trainer import train

    spec = _spec(make_spec, teacher_path, "tskd", evolution_images=3)
    m = train(spec)
    ev = read_evolution(Path(spec.out_dir) / EVOLUTION_FILE)
    assert ev["epochs"].tolist() == [1, 2, 4] and ev["labels"].tolist() == ["M1", "M2", "M1"]
    assert ev["names"] == ["tap0", "tap1", "tap2"]
    data = build_run_data(spec.dataset, spec.recipe)
    assert ev["indices"].tolist() == watched_indices(len(data.test), 3)
    # each image's label and class name, as the test split has them
    targets = [int(data.test[i][1]) for i in ev["indices"]]
    assert ev["targets"].tolist() == targets and len(set(targets)) > 1
    assert ev["class_names"].tolist() == [data.classes[t] for t in targets] and all(ev["class_names"])
    assert ev["images"].shape == (3, 32, 32, 3) and ev["images"].dtype == np.uint8 and ev["images"].std() > 10
    shapes = {"tap0": (32, 32), "tap1": (32, 32), "tap2": (16, 16)}  # resnet8: stem, stage 1, stage 2
    for name, hw in shapes.items():
        maps = ev[f"maps/{name}"].astype(np.float32)
        assert maps.shape == (3, 3, *hw) and ev[f"reference/{name}"].shape == (3, *hw)
        assert (maps >= 0).all() and np.abs(maps[0] - maps[2]).max() > 1e-3  # the student changed
    # The last epoch was a memory node, so its record is the exported model's maps, in eval mode.
    student = create_model("resnet8", num_classes=data.num_classes)
    student.load_state_dict(torch.load(Path(spec.out_dir) / "model.pt", weights_only=True)["model"])
    images = torch.stack([data.test[i][0] for i in ev["indices"]])
    with torch.no_grad():
        feats = student.eval()(images)[1]["feats"]
    for tap in (0, 1, 2):
        want = attention_map(feats[tap])[:, 0].numpy()
        np.testing.assert_allclose(ev[f"maps/tap{tap}"][2].astype(np.float32), want, atol=2e-3, rtol=2e-3)
    # The teacher's maps: resnet8's pre-activation taps, here at the student's resolution already.
    teacher = create_model("resnet8", num_classes=data.num_classes)
    teacher.load_state_dict(torch.load(teacher_path, weights_only=True)["model"])
    with torch.no_grad():
        t_feats = teacher.eval()(images)[1]["preact_feats"]
    np.testing.assert_allclose(ev["reference/tap2"].astype(np.float32), attention_map(t_feats[2])[:, 0].numpy(),
                               atol=2e-3, rtol=2e-3)

    # Following the images changes nothing the run computes.
    quiet = train(_spec(make_spec, teacher_path, "quiet", evolution_images=0))
    assert not (Path(make_spec(out="quiet").out_dir) / EVOLUTION_FILE).exists()
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in m["history"]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in quiet["history"]]
    a = torch.load(Path(spec.out_dir) / "model.pt", weights_only=True)["model"]
    b = torch.load(Path(make_spec(out="quiet").out_dir) / "model.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["observers", "before-observers"])
def test_a_resumed_run_writes_the_same_evolution(make_spec, teacher_path, layout):
    """Killed after M1, M2 and the review, resumed: the same evolution and capture as a run never
    killed. ``before-observers``: the checkpoint as a tskd before the observer loop wrote it (the
    recorder's state at its top level), which a run in flight when tskd is updated resumes from."""
    from tskd.engine import trainer as trainer_mod
    from tskd.engine.checkpoint import load_latest_checkpoint, save_checkpoint

    whole = _spec(make_spec, teacher_path, "whole", evolution_images=2)
    done = trainer_mod.train(whole)
    resumed = _spec(make_spec, teacher_path, "resumed", evolution_images=2)
    with pytest.raises(KeyboardInterrupt):
        trainer_mod.train(resumed, observers=[KillAt(3)])
    if layout == "before-observers":
        ckpt = Path(resumed.out_dir) / "checkpoint.pt"
        state = load_latest_checkpoint(ckpt)
        old = {k: v for k, v in state.items() if k not in ("observers", "version")} | state["observers"]["evolution"]
        assert old["evolution"] and old["capture"]
        save_checkpoint(ckpt, old)
    again = trainer_mod.train(resumed)
    assert again["capture"] == done["capture"]
    a, b = (read_evolution(Path(s.out_dir) / EVOLUTION_FILE) for s in (whole, resumed))
    assert a["names"] == b["names"] and a["epochs"].tolist() == [1, 2, 4]
    for key in a:
        if key != "names":
            assert np.array_equal(a[key], b[key]), key


def test_long_runs_show_evenly_spaced_nodes():
    from tskd.reporting.plots.evolution import shown_nodes

    assert shown_nodes(5) == [0, 1, 2, 3, 4]
    picked = shown_nodes(36)  # 240 epochs, delta 5, k 3
    assert len(picked) == 12 and picked[0] == 0 and picked[-1] == 35 and picked == sorted(set(picked))


def test_the_grid_puts_each_map_in_its_cell_on_its_rows_scale():
    # One mosaic on one axes: row r, column c of cells holds image r's map at node c-1 (the teacher's
    # last), coloured on the row's own scale from 0 to the row's largest value.
    from matplotlib import colormaps

    from tskd.reporting.plots.evolution import CELL, GAP, evolution_grid

    maps = np.zeros((2, 1, 4, 4), dtype=np.float16)  # 2 nodes, 1 image, 4x4 maps
    maps[1, 0] = 1.0
    teacher = np.full((1, 4, 4), 2.0, dtype=np.float16)  # the row's top: node 1 is half of it
    image = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    image[0, :, :, 0] = 255  # red
    ev = {"images": image, "indices": np.array([7]), "epochs": np.array([1, 2]), "labels": np.array(["M1", "M2"]),
          "maps/tap0": maps, "reference/tap0": teacher, "names": ["tap0"]}
    fig = evolution_grid(ev, "one row")
    assert len(fig.axes) == 1
    mosaic = fig.axes[0].images[0].get_array()
    step = CELL + GAP
    assert mosaic.shape[:2] == (CELL, 4 * step - GAP)
    cell = lambda c: mosaic[CELL // 2, c * step + CELL // 2]  # noqa: E731
    magma = colormaps["magma"]
    np.testing.assert_allclose(cell(0), [1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(cell(1), magma(0.0)[:3], atol=1e-6)
    np.testing.assert_allclose(cell(2), magma(0.5)[:3], atol=1e-6)
    np.testing.assert_allclose(cell(3), magma(1.0)[:3], atol=1e-6)
    np.testing.assert_allclose(mosaic[CELL // 2, CELL + 1], [1, 1, 1])  # the gap between cells
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert {"test #7", "ep 1 M1", "ep 2 M2", "teacher", "tap0"} <= set(texts)
    # with the image's class (an ImageNet class by its first name, cut to fit its cell)
    fig = evolution_grid(ev | {"class_names": np.array(["apple"])}, "one row")
    assert "test #7\napple" in [t.get_text() for t in fig.axes[0].texts]
    fig = evolution_grid(ev | {"class_names": np.array(["great white shark, white shark, man-eater"])}, "one row")
    assert "test #7\ngreat white shark" in [t.get_text() for t in fig.axes[0].texts]
    fig = evolution_grid(ev | {"class_names": np.array(["a_very_long_class_name_indeed"])}, "one row")
    assert "test #7\na_very_long_class_n…" in [t.get_text() for t in fig.axes[0].texts]
