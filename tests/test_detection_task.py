"""The detection task's evaluation: detections scored by pycocotools' COCOeval against a real
instances file, in COCO's non-contiguous category ids, crowd regions ignored as COCOeval does."""

from __future__ import annotations

import json

import pytest
import torch

from tskd.engine.runtime import select_runtime
from tskd.tasks import task_of
from tskd.tasks.detection import DETECTION, coco_box_ap, to_coco_results


def _gt(tmp_path):
    from pycocotools.coco import COCO

    images = [{"id": 11, "file_name": "a.jpg", "width": 100, "height": 80},
              {"id": 12, "file_name": "b.jpg", "width": 60, "height": 60}]
    anns = [{"id": 1, "image_id": 11, "category_id": 3, "bbox": [10, 10, 40, 30], "area": 1200, "iscrowd": 0},
            {"id": 2, "image_id": 11, "category_id": 7, "bbox": [60, 20, 30, 50], "area": 1500, "iscrowd": 0},
            {"id": 3, "image_id": 12, "category_id": 3, "bbox": [5, 5, 50, 50], "area": 2500, "iscrowd": 1},
            {"id": 4, "image_id": 12, "category_id": 7, "bbox": [20, 20, 20, 20], "area": 400, "iscrowd": 0}]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 3, "name": "square"}, {"id": 7, "name": "disc"}]}))
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def _det(boxes, labels, scores=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    return {"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64),
            "scores": torch.tensor(scores or [0.9] * len(labels))}


def test_xyxy_detections_become_coco_xywh_results():
    res = to_coco_results([_det([[10, 10, 50, 40]], [3]), _det([], [])], [11, 12])
    assert res == [{"image_id": 11, "category_id": 3, "bbox": [10.0, 10.0, 40.0, 30.0],
                    "score": pytest.approx(0.9)}]


def test_box_ap_of_perfect_shifted_and_no_detections(tmp_path):
    gt = _gt(tmp_path)
    perfect = to_coco_results([_det([[10, 10, 50, 40], [60, 20, 90, 70]], [3, 7]), _det([[20, 20, 40, 40]], [7])],
                              [11, 12])
    ap = coco_box_ap(gt, perfect, [11, 12])
    assert ap["AP"] == pytest.approx(100.0) and ap["AP50"] == pytest.approx(100.0)
    # The crowd region of image 12 is ignored: no penalty for not detecting it, none for hitting it.
    with_crowd_hit = perfect + to_coco_results([_det([[5, 5, 55, 55]], [3], [0.5])], [12])
    assert coco_box_ap(gt, with_crowd_hit, [11, 12])["AP"] == pytest.approx(100.0)
    shifted = to_coco_results([_det([[14, 13, 54, 43], [60, 20, 90, 70]], [3, 7]), _det([[20, 20, 40, 40]], [7])],
                              [11, 12])
    lower = coco_box_ap(gt, shifted, [11, 12])
    assert 0 < lower["AP"] < 100 and lower["AP50"] == pytest.approx(100.0)
    assert coco_box_ap(gt, [], [11, 12]) == dict.fromkeys(DETECTION.figures, 0.0)


def test_evaluate_runs_a_detector_over_a_loader_and_picks_ap(tmp_path):
    gt = _gt(tmp_path)

    class Split(torch.utils.data.Dataset):
        coco = gt

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.zeros(3, 8, 8), {"image_id": (11, 12)[i]}, i

    def detector(images):  # what a detector's eval forward returns: one dict per image
        assert all(im.dim() == 3 for im in images)
        return [_det([[10, 10, 50, 40], [60, 20, 90, 70]], [3, 7]), _det([[20, 20, 40, 40]], [7])][:len(images)] \
            if len(images) == 2 else [_det([], [])]

    loader = torch.utils.data.DataLoader(Split(), batch_size=2, collate_fn=lambda b: tuple(zip(*b, strict=True)))
    res = DETECTION.evaluate(detector, loader, select_runtime(_cpu()))
    assert res["AP"] == pytest.approx(100.0)
    m = DETECTION.summarize([{"epoch": 0, **{f"test_{k}": 1.0 for k in DETECTION.figures}},
                             {"epoch": 1, **{f"test_{k}": 2.0 for k in DETECTION.figures}}])
    assert m["best_epoch"] == 1 and m["best_AP"] == 2.0 and "best_top1" not in m
    assert DETECTION.best == "AP"


def _cpu():
    from tskd.spec.config import TrainCfg

    return TrainCfg(device="cpu")


def test_the_detection_task_is_registered():
    from tskd.tasks import TASKS

    assert TASKS["detection"] is DETECTION
    assert task_of("cifar100").name == "classification"
