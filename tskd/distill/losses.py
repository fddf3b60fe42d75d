"""Loss terms shared by several methods."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton KD: KL(softmax(z_t/T) || softmax(z_s/T)) * T^2, summed over classes, batch mean."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(dim=1)
    return kl.mean() * temperature**2


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """Linear loss warm-up ``min(e / warmup_epochs, 1)`` with ``e`` counted from 1, as in mdistiller
    (its epochs start at 1, ours at 0): 1/20 in the first epoch for a 20-epoch warm-up, 1 from
    epoch index 19 on. ``warmup_epochs = 0`` means no warm-up."""
    if warmup_epochs <= 0:
        return 1.0
    return min((epoch + 1) / warmup_epochs, 1.0)
