"""The methods on detection (task ``detection``): the same names as on classification, applied
where a Faster R-CNN + FPN has the corresponding signal (METHOD.md §8 and docs/method.md):

* ``vanilla``: the detector's own losses (RPN objectness and box, RoI classification and box);
* ``kd`` / ``dkd``: on the RoI head's class logits, the teacher's head run on the *student's*
  sampled proposals (mdistiller's DKD: alpha 1, beta 0.25, T 1);
* ``reviewkd``: ABF fusion and HCL over the five FPN levels p2-p6;
* ``tskd``: KD on the RoI logits plus the review loss on FPN levels (attention maps, ConvLSTM
  forecasters, snapshots of the student's backbone + FPN).

A detection student is a ``tskd.models.detection`` model: ``train_step(images, targets)``
gives its losses, FPN levels, padded batch and sampled proposals; a teacher gives its FPN levels
of the student's padded batch (``features_of``) and its class logits on given proposals
(``roi_logits_on``).
"""

from tskd.distill.detection import logits, reviewkd, tskd, vanilla  # noqa: F401
