"""Loss `distill`: knowledge distillation to the per-sample soft labels of the run's target table
(SSD, paper 004 Eq. (3)-(4); MCG-NJU/SSD-LT):

    L_kd = -T^2 sum_i y~_i log softmax(z / T)_i,    y~ = softmax(z_teacher / T)

computed once for the training set by a whole-set labelling (`stage.label` with a soft
`threshold` labeler at temperature T, `label_pool = "labeled"`) and read here from
`ctx.soft_targets`. Default `form = "kl"`: KL(y~ || softmax(z / T)) x T^2, summed over classes
and averaged over the batch as SSD_LT/builder.py SDL.kd_loss; `form = "ce"` adds back the
(constant) entropy of y~ (same gradient). Unlike the reference, which runs the frozen teacher on
each augmented batch, the soft labels here are computed once (un-augmented, evaluation mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor

from ltframe.config import param
from ltframe.engine.context import StepContext
from ltframe.errors import LtframeError
from ltframe.registry import Registry


@dataclass
class DistillParams:
    head: str = "soft"  # the student head trained towards the soft labels
    part: str = "labeled"
    temperature: float = param(2.0, gt=0)  # T (paper 004: 2)
    form: Literal["ce", "kl"] = "kl"  # the reference's F.kl_div (same gradient as "ce")


NEEDS_SOFT = ("loss distill needs soft labels for the stage's samples: label the training set "
              "in an earlier stage (label = { name = \"threshold\", threshold = 0.0, hard = false, "
              "temperature = 2.0 }, label_pool = \"labeled\"), or use the `ssd` scheduler")


class DistillLoss:
    """T^2-scaled soft cross-entropy (or KL) to the table's soft labels; see the module docstring."""

    def __init__(self, params: DistillParams) -> None:
        self.p = params

    def preflight(self, info: Any) -> None:
        """Before the run: an earlier stage must give the training samples soft labels."""
        if not info.soft_labels:
            raise LtframeError(NEEDS_SOFT)

    def __call__(self, ctx: StepContext) -> Tensor:
        if ctx.soft_targets is None:
            raise LtframeError(NEEDS_SOFT)
        t = self.p.temperature
        log_q = F.log_softmax(ctx.logits(self.p.part, self.p.head).float() / t, dim=1)
        soft = ctx.soft_targets.float()
        per = -(soft * log_q).sum(1)
        if self.p.form == "kl":
            per = per + (soft * soft.clamp_min(1e-12).log()).sum(1)
        return t * t * per.mean()


def register(registry: Registry) -> None:
    registry.register("loss", "distill", DistillLoss, DistillParams)
