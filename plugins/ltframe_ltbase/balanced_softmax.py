"""Balanced Softmax (Ren et al., NeurIPS 2020, "Balanced Meta-Softmax for Long-Tailed Visual
Recognition"), from jiawei-ren/BalancedMetaSoftmax-Classification loss/BalancedSoftmaxLoss.py:
L = CE(z + log n_c, y), prediction with the raw z.

It is logit adjustment with tau = 1 (Menon et al. 2021; LADE's PriorCE): log n_c and log pi_c
differ by a constant that the softmax cancels. As a `ltframe_classics` CE it takes the shared
re-weighting policy (`reweight = "none" | "cb" | "drw"`, PyTorch's weighted mean), label
smoothing, and the `mixup` transform (lam L(y) + (1 - lam) L(y[perm])), so Balanced Softmax
under DRW, with post-hoc LA at evaluation, after SSP or as the labeled term of a FixMatch stage
is a recipe value. `class_counts` are the counts of what the stage trains on (labeled plus any
pseudo-labelled samples). Difference: a class without samples counts as one (the reference's
log 0 = -inf would make its logit -inf; here it is merely unlikely).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ltframe.engine.context import StepContext
from ltframe.registry import Registry
from ltframe_classics.losses import CEParams, CrossEntropy
from ltframe_ltbase.mixup import mixed_loss


@dataclass
class BalancedSoftmaxParams(CEParams):
    """CEParams: head, part, reweight (none / cb / drw), beta, drw_epoch, label_smoothing."""


class BalancedSoftmax(CrossEntropy):
    """CE(z + log n_c, y) with the classics' CB / DRW weights; understands `mixup`."""

    def __init__(self, params: BalancedSoftmaxParams, num_classes: int, class_counts: Tensor) -> None:
        super().__init__(params, num_classes, class_counts)
        self.offset = class_counts.double().clamp_min(1).log().float()

    def adjusted_logits(self, ctx: StepContext) -> Tensor:
        logits = ctx.logits(self.p.part, self.p.head)
        return logits + self.offset.to(logits.device)

    def __call__(self, ctx: StepContext) -> Tensor:
        weights = self.class_weights(ctx)
        logits = self.adjusted_logits(ctx)
        return mixed_loss(ctx, self.p.part,
                          lambda y: self.reduce(self.per_sample(logits, y, weights), y, weights))


def register(registry: Registry) -> None:
    registry.register("loss", "balanced_softmax", BalancedSoftmax, BalancedSoftmaxParams)
