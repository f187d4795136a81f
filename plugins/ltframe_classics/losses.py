"""Loss terms."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ltframe.engine.context import StepContext
from ltframe.registry import Registry


@dataclass
class CEParams:
    head: str = "main"  # which head's logits
    part: str = "labeled"  # which inputs (labeled view)
    label_smoothing: float = 0.0


class CrossEntropy:
    """Softmax cross-entropy on the labeled batch (instance-balanced baseline)."""

    def __init__(self, params: CEParams, num_classes: int, class_counts: Tensor) -> None:
        self.p = params

    def __call__(self, ctx: StepContext) -> Tensor:
        logits = ctx.logits(self.p.part, self.p.head)
        return F.cross_entropy(logits, ctx.targets, label_smoothing=self.p.label_smoothing)


def register(registry: Registry) -> None:
    registry.register("loss", "ce", CrossEntropy, CEParams)
