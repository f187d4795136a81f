"""Classic long-tailed losses with a shared class re-weighting policy.

- ce: softmax cross-entropy.
- focal: Lin et al. 2017, (1 - p_y)^gamma * CE (gamma = 1 as in paper 001's setting); with class
  weights it is the LDAM-DRW code's CB-focal (weight inside the focal factor, batch mean).
- ldam: Cao et al. 2019, "Learning Imbalanced Datasets with Label-Distribution-Aware Margin
  Loss" (kaidic/LDAM-DRW): margin m_c ~ n_c^(-1/4), max 0.5, scale s = 30, on a cosine head.
- la: Menon et al. 2021, "Long-tail learning via logit adjustment": CE(logits + tau log prior).
Every loss takes `reweight`: "none", "cb" (Cui et al. 2019, class-balanced weights
(1 - beta) / (1 - beta^n_c) normalised to sum to C) or "drw" (deferred re-weighting, Cao et
al. 2019: weights 1 until `drw_epoch`, CB weights after), so CB-CE, CB-focal, CE-DRW and
LDAM-DRW are the same losses with another policy. Weighted ce / ldam / la take PyTorch's
weighted mean (sum w_y l / sum w_y), as F.cross_entropy(weight=...) does in kaidic/LDAM-DRW.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ltframe.config import param
from ltframe.engine.context import StepContext
from ltframe.registry import Registry

Reweight = Literal["none", "cb", "drw"]


def cb_weights(counts: Tensor, beta: float) -> Tensor:
    """Class-balanced weights (1 - beta) / (1 - beta^n_c), normalised to sum to C.

    A class without samples gets the weight of a one-sample class (finite, never used by CE).
    """
    n = counts.double().clamp_min(1)
    eff = (1.0 - torch.pow(torch.full_like(n, beta), n)) / (1.0 - beta)
    w = 1.0 / eff
    return (w / w.sum() * counts.numel()).float()


@dataclass
class CEParams:
    head: str = "main"  # which head's logits
    part: str = "labeled"  # which inputs (labeled view)
    reweight: Reweight = "none"
    beta: float = param(0.9999, ge=0, lt=1)  # CB / DRW effective-number beta
    drw_epoch: int = param(160, ge=0)  # DRW: 0-based stage epoch from which CB weights apply
    label_smoothing: float = param(0.0, ge=0, le=1)


class CrossEntropy:
    """Softmax cross-entropy on the labeled batch, with optional CB / DRW class weights."""

    def __init__(self, params: CEParams, num_classes: int, class_counts: Tensor) -> None:
        self.p = params
        self.num_classes = num_classes
        self.cb = cb_weights(class_counts, params.beta)

    def class_weights(self, ctx: StepContext) -> Tensor | None:
        if self.p.reweight == "cb" or (self.p.reweight == "drw" and ctx.epoch >= self.p.drw_epoch):
            return self.cb.to(ctx.targets.device)
        return None

    def adjusted_logits(self, ctx: StepContext) -> Tensor:
        return ctx.logits(self.p.part, self.p.head)

    def per_sample(self, logits: Tensor, targets: Tensor, weights: Tensor | None) -> Tensor:
        return F.cross_entropy(logits, targets, weight=weights, reduction="none",
                               label_smoothing=self.p.label_smoothing)

    def reduce(self, losses: Tensor, targets: Tensor, weights: Tensor | None) -> Tensor:
        """PyTorch's weighted mean: sum_i l_i / sum_i w_{y_i} (plain mean without weights)."""
        if weights is None:
            return losses.mean()
        return losses.sum() / weights[targets].sum()

    def __call__(self, ctx: StepContext) -> Tensor:
        weights = self.class_weights(ctx)
        losses = self.per_sample(self.adjusted_logits(ctx), ctx.targets, weights)
        return self.reduce(losses, ctx.targets, weights)


@dataclass
class FocalParams(CEParams):
    gamma: float = param(1.0, ge=0)


class Focal(CrossEntropy):
    """Focal loss (Lin et al. 2017) in the form of kaidic/LDAM-DRW losses.py (FocalLoss,
    focal_loss; also YyzHarry/imbalanced-semi-self losses.py): ce_w = w_y * CE,
    p = exp(-ce_w), loss = mean over the batch of (1 - p)^gamma * ce_w. The class weight sits
    inside the focal factor and the mean is over samples, not over the sum of weights.
    `label_smoothing` is not used (the reference has none)."""

    def per_sample(self, logits: Tensor, targets: Tensor, weights: Tensor | None) -> Tensor:
        ce_w = F.cross_entropy(logits, targets, weight=weights, reduction="none")
        p = torch.exp(-ce_w)
        return (1 - p) ** self.p.gamma * ce_w

    def reduce(self, losses: Tensor, targets: Tensor, weights: Tensor | None) -> Tensor:
        return losses.mean()


@dataclass
class LDAMParams(CEParams):
    max_margin: float = param(0.5, ge=0)
    scale: float = param(30.0, gt=0)


class LDAM(CrossEntropy):
    """LDAM: subtract m_y = C / n_y^(1/4) (max `max_margin`) from the true-class cosine logit,
    scale by s (Cao et al. 2019; kaidic/LDAM-DRW). Use it with the `cosine` head."""

    def __init__(self, params: LDAMParams, num_classes: int, class_counts: Tensor) -> None:
        super().__init__(params, num_classes, class_counts)
        m = 1.0 / class_counts.double().clamp_min(1).pow(0.25)
        self.margins = (m * (params.max_margin / m.max())).float()

    def adjusted_logits(self, ctx: StepContext) -> Tensor:
        logits = ctx.logits(self.p.part, self.p.head)
        margin = self.margins.to(logits.device)[ctx.targets]
        onehot = F.one_hot(ctx.targets, logits.shape[1]).to(logits.dtype)
        return self.p.scale * (logits - onehot * margin[:, None])


@dataclass
class LAParams(CEParams):
    tau: float = 1.0


class LogitAdjusted(CrossEntropy):
    """Logit-adjusted loss: CE(logits + tau * log prior) (Menon et al. 2021;
    google-research/google-research/logit_adjustment)."""

    def __init__(self, params: LAParams, num_classes: int, class_counts: Tensor) -> None:
        super().__init__(params, num_classes, class_counts)
        prior = class_counts.double().clamp_min(1) / class_counts.double().clamp_min(1).sum()
        self.offset = (params.tau * prior.log()).float()

    def adjusted_logits(self, ctx: StepContext) -> Tensor:
        logits = ctx.logits(self.p.part, self.p.head)
        return logits + self.offset.to(logits.device)


def register(registry: Registry) -> None:
    registry.register("loss", "ce", CrossEntropy, CEParams)
    registry.register("loss", "focal", Focal, FocalParams)
    registry.register("loss", "ldam", LDAM, LDAMParams)
    registry.register("loss", "la", LogitAdjusted, LAParams, aliases=("logit_adjusted",))
