"""LADE (Hong et al., CVPR 2021, "Disentangling Label Distribution for Long-tailed Visual
Recognition"), from hyperconnect/LADE (loss/PriorCELoss.py, loss/LADELoss.py,
config/CIFAR100_LT/lade.yaml, README's CIFAR-100 command).

loss `lade` = PriorCE + alpha R:
- PriorCE: CE(z + log pi, y) (= Balanced Softmax / LA with tau 1);
- R = -sum_c pi_c [ T1_c - T2_c - lambda T2_c^2 ], the regularised MINE (ReMINE) bound per
  class over the batch: T1_c = sum_{i: y_i = c} z_ic / (n_c^batch + 1e-8) (0 for a class absent
  from the batch), T2_c = logsumexp_i(z_ic - log pi_c + log(1/C)) - log B over all B samples.
The README's CIFAR-100 command: alpha 0.1, lambda 0.01 (ImageNet-LT 0.05 / 0.5). pi are the
training counts' frequencies (the reference adds 1e-9 inside the logs; here a class without
samples counts as one). Understands the `mixup` transform for the PriorCE term only (R uses the
labels as drawn). Predict with the raw z (the paper's post-hoc target-prior adjustment is
`[eval] posthoc_tau` for a known test prior; uniform test: none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ltframe.config import param
from ltframe.engine.context import StepContext
from ltframe.registry import Registry
from ltframe_ltbase.mixup import mixed_loss


@dataclass
class LadeParams:
    head: str = param("main", ref="head")
    part: str = param("labeled", ref="part")
    alpha: float = param(0.1, ge=0, le=100)  # weight of the LADE regulariser (CIFAR-100: 0.1)
    remine_lambda: float = param(0.01, ge=0, le=100)  # lambda of ReMINE (CIFAR-100 command: 0.01)


class LadeLoss:
    """PriorCE + alpha x the ReMINE regulariser of the label distribution."""

    def __init__(self, params: LadeParams, num_classes: int, class_counts: Tensor) -> None:
        self.p = params
        n = class_counts.double().clamp_min(1)
        self.prior = (n / n.sum()).float()
        self.log_prior = self.prior.log()

    def regulariser(self, logits: Tensor, targets: Tensor) -> Tensor:
        c = logits.shape[1]
        onehot = F.one_hot(targets, c).to(logits.dtype)  # [B, C]
        per_class = onehot.sum(0)
        first = (logits * onehot).sum(0) / (per_class + 1e-8)
        shifted = logits - self.log_prior.to(logits.device) - math.log(c)
        second = torch.logsumexp(shifted, dim=0) - math.log(logits.shape[0])
        bound = first - second - self.p.remine_lambda * second * second
        return -(bound * self.prior.to(logits.device)).sum()

    def __call__(self, ctx: StepContext) -> Tensor:
        logits = ctx.logits(self.p.part, self.p.head).float()
        adjusted = logits + self.log_prior.to(logits.device)
        prior_ce = mixed_loss(ctx, self.p.part, lambda y: F.cross_entropy(adjusted, y))
        if self.p.alpha == 0:
            return prior_ce
        return prior_ce + self.p.alpha * self.regulariser(logits, ctx.targets)


def register(registry: Registry) -> None:
    registry.register("loss", "lade", LadeLoss, LadeParams)
