"""What a run learns and how it is scored: the seam between the one training loop and a benchmark.

The trainer never assumes classification. It asks the run's task (``task_of(dataset family)``):

* ``to_device(batch, rt)``: a loader's batch as ``(inputs, targets, indices)`` on the run's
  device, laid out as its runtime says (``tskd.engine.runtime.Runtime.place_batch``);
* ``count(targets)``: how many samples a batch holds (loss weighting, epoch means);
* ``train_meter(device)``: what the training epoch accumulates from the student's outputs
  (classification: train top-1), kept on the device so that no step syncs with the host;
* ``evaluate(forward, loader, rt, world)``: the figures of one evaluation split (in a
  data-parallel run, of every rank's shard together);
* ``best``: the figure that picks the best epoch (higher is better), and ``figures``: the ones a
  report shows for the best and the last epoch; ``summarize(history)`` turns the per-epoch rows
  into metrics.json's ``best_*`` / ``last_*`` / ``selected_*`` figures.

Adding a task (COCO detection adds box AP): a module here with an object of that shape, one
line in ``TASKS``, and its dataset families in ``tskd.data.families.TASK_OF``.
"""

from __future__ import annotations

from tskd.data.families import TASK_OF, family
from tskd.tasks.base import Task
from tskd.tasks.classification import CLASSIFICATION
from tskd.tasks.detection import DETECTION

TASKS: dict[str, Task] = {CLASSIFICATION.name: CLASSIFICATION, DETECTION.name: DETECTION}


def task_of(dataset_family: str) -> Task:
    """The task that dataset family ``dataset_family`` poses."""
    family(dataset_family)  # an unknown family is refused there, with the known ones
    return TASKS[TASK_OF[dataset_family]]


__all__ = ["TASKS", "Task", "task_of"]
