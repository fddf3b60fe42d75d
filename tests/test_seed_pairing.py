"""Seeds pair across methods: with seed s, every method of a pair starts from the same student
initialisation and sees the same images in the same order, augmentation included. The report's
paired statistics (tskd.reporting.paired) rest on it; a method whose own modules (connectors, embeddings,
forecasters) drew from the seed's stream before the student, or whose training consumed the random
stream that the data order reads, would break it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from tskd.distill import list_methods

pytestmark = pytest.mark.usefixtures("one_thread")

PARAMS = {"tskd": {"delta": 1, "k": 1}}  # a review inside the two epochs


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()[:16]


def _observe(spec) -> tuple[dict[str, str], list[tuple]]:
    """The student's initial weights, and every training batch of the run (its indices, labels and
    a digest of its augmented images), as the loop consumed them."""
    from tskd.engine.trainer import Trainer

    trainer = Trainer(spec)
    init = {k: _digest(v) for k, v in trainer.distiller.student.state_dict().items()}
    seen: list[tuple] = []
    loader = trainer.data.train_loader

    class Recording:  # the loop takes len() of what train_loader returns
        def __init__(self, inner):
            self.inner = inner

        def __len__(self):
            return len(self.inner)

        def __iter__(self):
            for batch in self.inner:
                images, labels, indices = batch
                seen.append((tuple(indices.tolist()), tuple(labels.tolist()), _digest(images)))
                yield batch

    trainer.data.train_loader = lambda *args, **kwargs: Recording(loader(*args, **kwargs))
    trainer.run()
    return init, seen


def test_a_seed_gives_every_method_the_same_initialisation_and_data(make_spec):
    from tskd.engine.trainer import train

    teacher = make_spec(out="teacher", recipe={"epochs": 1, "milestones": []})
    train(teacher)
    recipe = {"epochs": 2, "milestones": [], "augment": ["crop", "flip"]}
    observed = {}
    for method in list_methods():
        kw = {} if method == "vanilla" else {"teacher_arch": "resnet8", "teacher_path": f"{teacher.out_dir}/model.pt"}
        spec = make_spec(out=method, method=method, seed=3, recipe=recipe, method_params=PARAMS.get(method, {}), **kw)
        observed[method] = _observe(spec)
    init, seen = observed["vanilla"]
    assert len(seen) == 2 * 6  # 300 images, batches of 50, two epochs
    for method, (m_init, m_seen) in observed.items():
        assert m_init == init, f"{method}: the student's initialisation differs from the student alone's"
        assert m_seen == seen, f"{method}: its batches differ from the student alone's"
    # and the seed matters: another seed, another initialisation and order
    other_init, other_seen = _observe(make_spec(out="vanilla-seed4", seed=4, recipe=recipe))
    assert other_init != init and [b[0] for b in other_seen] != [b[0] for b in seen]
    assert Path(teacher.out_dir, "model.pt").is_file()
