"""Contrastive Representation Distillation (Tian et al., ICLR 2020), CRD's/mdistiller's CIFAR default.

Student and teacher pooled features are embedded (linear + L2 norm) to ``feat_dim``. A memory bank
holds one embedding per training sample for each network (momentum-updated with the batch's own
embeddings after use). Each sample is contrasted, in both directions, against its own entry of the
other network's bank (the positive, found through ``indices``) and ``nce_k`` negatives drawn from
that bank, with the NCE loss of the paper's eq. (with noise probability 1/num_train). Loss: CE + CRD.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from tskd.distill.base import Distiller, MethodParams
from tskd.distill.registry import register_method
from tskd.engine import distributed
from tskd.errors import ParamsError
from tskd.models.taps import probe_taps


class CRDParams(MethodParams):
    ce_weight: float = Field(1.0, ge=0, description="weight of the cross-entropy loss (mdistiller CRD: 1)")
    crd_weight: float = Field(0.8, ge=0, description="weight of the CRD loss (mdistiller FEAT_WEIGHT / CRD beta: 0.8)")
    feat_dim: int = Field(128, gt=0, description="embedding width (CRD --feat_dim: 128)")
    nce_k: int = Field(16384, gt=0, description="negatives per sample (CRD --nce_k: 16384); capped at num_train - 1 "
                       "so tiny data sets work")
    nce_t: float = Field(0.07, gt=0, description="temperature of the exp(<v, m>/T) scores (CRD --nce_t: 0.07)")
    nce_momentum: float = Field(0.5, ge=0, lt=1, description="memory-bank momentum (CRD --nce_m: 0.5)")
    negatives: Literal["other_class", "uniform"] = Field(
        "other_class", description="other_class: negatives from samples of other classes (CRD's 'exact' mode, "
        "its CIFAR default; needs the training labels); uniform: from all samples")
    replacement: Literal["if_needed", "always"] = Field(
        "if_needed", description="other-class negatives drawn without replacement unless a class has fewer than "
        "nce_k others (CRD's CIFAR sampler), or always with replacement (mdistiller's ImageNet sampler: "
        "np.random.choice(..., replace=True)); 'always' needs no batch x training-set mask, which at ImageNet's "
        "1.28 M samples would be 1.3 GB per batch of 256")


class Embed(nn.Module):
    """Linear projection to ``dim_out`` followed by L2 normalisation."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


def nce_loss(scores: Tensor, num_data: int, eps: float = 1e-7) -> Tensor:
    """NCE loss of CRD: ``scores`` (B, 1 + K), column 0 the positive, are unnormalised probabilities;
    the noise distribution is uniform, Pn = 1/num_data. Summed over terms, averaged over the batch."""
    m_pn = (scores.shape[1] - 1) / num_data
    log_d1 = torch.log(scores[:, 0] / (scores[:, 0] + m_pn + eps))
    log_d0 = torch.log(m_pn / (scores[:, 1:] + m_pn + eps))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


def fewest_negatives(labels: Tensor) -> int:
    """The fewest other-class rows any training row has."""
    return len(labels) - int(torch.bincount(labels).max())


@register_method("crd")
class CRD(Distiller):
    Params = CRDParams

    def __init__(self, student, teacher, params, ctx):
        super().__init__(student, teacher, params, ctx)
        if ctx.num_train < 2:
            raise ParamsError(f"method 'crd': needs at least 2 training samples, got num_train={ctx.num_train}")
        self.embed_s = Embed(probe_taps(student, ctx.image_size).pooled, params.feat_dim)
        self.embed_t = Embed(probe_taps(teacher, ctx.image_size).pooled, params.feat_dim)
        self.num_k = min(params.nce_k, ctx.num_train - 1)
        stdv = 1.0 / math.sqrt(params.feat_dim / 3)
        # Banks and normalising constants are buffers: in state_dict(), so a resumed run is exact.
        self.register_buffer("memory_s", torch.rand(ctx.num_train, params.feat_dim) * 2 * stdv - stdv)
        self.register_buffer("memory_t", torch.rand(ctx.num_train, params.feat_dim) * 2 * stdv - stdv)
        self.register_buffer("z_norm", torch.full((2,), -1.0))  # (Z_s, Z_t); set from the first batch
        self._z_fixed = False
        labels = None
        if params.negatives == "other_class":
            if ctx.train_labels is None or len(ctx.train_labels) != ctx.num_train:
                raise ParamsError("method 'crd': negatives='other_class' needs train_labels for all "
                                 f"{ctx.num_train} training samples; set crd.negatives: uniform otherwise")
            labels = torch.as_tensor(ctx.train_labels, dtype=torch.long)
            if labels.unique().numel() < 2:
                raise ParamsError("method 'crd': negatives='other_class' needs at least two classes")
        self.register_buffer("train_labels", labels, persistent=False)  # derived from the data set
        # The training set sorted by class, and where each class's block starts (CSR-like): other-class
        # negatives drawn by position, with no (batch x N) mask. Derived from the data set, not saved.
        order = starts = None
        if labels is not None:
            order = torch.argsort(labels, stable=True)
            counts = torch.bincount(labels)
            starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        # Whether even the largest class leaves k negatives: then no batch ever needs replacement.
        self._always_enough = labels is not None and fewest_negatives(labels) >= self.num_k
        self.register_buffer("by_class", order, persistent=False)
        self.register_buffer("class_starts", starts, persistent=False)

    def sample_indices(self, indices: Tensor) -> Tensor:
        """(B, 1 + K) bank rows: the sample itself, then K negatives."""
        n, k = self.memory_s.shape[0], self.num_k
        if self.train_labels is None:
            neg = torch.randint(0, n, (indices.shape[0], k), device=indices.device)
        elif self.params.replacement == "always":
            neg = self._other_class_with_replacement(indices, k)
        else:
            allowed = (self.train_labels[None, :] != self.train_labels[indices][:, None]).float()
            # Without replacement when every row has enough negatives (CRD's rule), else with. When
            # every class has enough (always, on the full datasets), that needs no look at the batch,
            # which would wait for the GPU every step.
            short = not self._always_enough and bool(allowed.sum(1).min() < k)
            neg = torch.multinomial(allowed, k, replacement=short)
        return torch.cat([indices[:, None], neg], dim=1)

    def _other_class_with_replacement(self, indices: Tensor, k: int) -> Tensor:
        """k uniform draws per row among the rows of other classes, in O(batch x k) memory: a position
        in the class-sorted order with the row's own class block cut out."""
        c = self.train_labels[indices]
        start, end = self.class_starts[c], self.class_starts[c + 1]
        others = (self.by_class.shape[0] - (end - start)).to(torch.float64)
        u = torch.rand(indices.shape[0], k, device=indices.device, dtype=torch.float64)
        pos = torch.minimum((u * others[:, None]).long(), (others - 1).long()[:, None])
        pos = pos + (pos >= start[:, None]) * (end - start)[:, None]
        return self.by_class[pos]

    def contrast(self, v_s: Tensor, v_t: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Scores exp(<v, m>/T)/Z of each embedding against the other network's bank rows ``idx``."""
        t = self.params.nce_t
        out_s = torch.exp(torch.bmm(self.memory_t[idx], v_s[:, :, None]).squeeze(2) / t)
        out_t = torch.exp(torch.bmm(self.memory_s[idx], v_t[:, :, None]).squeeze(2) / t)
        if not self._z_fixed:
            # Read from the device once, not per step (each read waits for the GPU).
            with torch.no_grad():
                for i, out in enumerate((out_s, out_t)):
                    if self.z_norm[i] < 0:  # CRD fixes Z from the first batch: mean score x bank size
                        # The global batch's mean in a data-parallel run: the same Z on every rank.
                        mean = distributed.global_mean(out) if distributed.active() else out.mean()
                        self.z_norm[i] = mean * self.memory_s.shape[0]
            self._z_fixed = True
        return out_s / self.z_norm[0], out_t / self.z_norm[1]

    def _load_from_state_dict(self, *args, **kwargs):
        self._z_fixed = False  # the loaded z_norm may be unset
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def update_memory(self, v_s: Tensor, v_t: Tensor, indices: Tensor) -> None:
        if distributed.active():
            # Every rank updates the banks with the whole global batch, as one process does; from
            # its own part alone, the ranks' banks would drift apart.
            v_s, v_t, indices = (distributed.gather_rows(x) for x in (v_s, v_t, indices))
        m = self.params.nce_momentum
        for bank, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
            bank.index_copy_(0, indices, F.normalize(bank[indices] * m + v.to(bank.dtype) * (1 - m), dim=1))

    def forward_train(self, images, labels, epoch, indices=None):
        if indices is None:
            raise ParamsError("method 'crd' needs the dataset indices of the batch (indices=...)")
        indices = indices.long()
        logits, taps = self.student(images)
        _, t_taps = self.teacher_forward(images)
        # exp(x/0.07) overflows half precision: the contrast runs in fp32 whatever the autocast.
        with torch.autocast(images.device.type, enabled=False):
            v_s = self.embed_s(taps["pooled_feat"].float())
            v_t = self.embed_t(t_taps["pooled_feat"].float())
            idx = self.sample_indices(indices)
            out_s, out_t = self.contrast(v_s, v_t, idx)
            crd = nce_loss(out_s, self.memory_s.shape[0]) + nce_loss(out_t, self.memory_s.shape[0])
            self.update_memory(v_s.detach(), v_t.detach(), indices)
        p = self.params
        return logits, {"ce": p.ce_weight * F.cross_entropy(logits, labels), "crd": p.crd_weight * crd}
