"""MiSLAS (Zhong et al., CVPR 2021, "Improving Calibration for Long-Tailed Recognition"), from
dvlab-research/MiSLAS (methods.py, train_stage1.py, train_stage2.py, config/cifar*/).

- Stage 1: the `mixup` transform (alpha 1) with a cross-entropy that mixes the two targets: the
  loss `mislas` with smooth_head = smooth_tail = 0 is exactly that CE.
- Stage 2 (10 epochs, class-aware sampler with 4 images per class and n_max x C draws per epoch,
  lr 0.1 cosine): only the classifier trains; the backbone runs without gradients, in train
  mode when `shift_bn` (CIFAR-100: `frozen_bn = "update"`, BatchNorm statistics re-estimated,
  "shift learning") or eval mode (CIFAR-10's config: `frozen_bn = "frozen"`).
  - loss `mislas`: label-aware smoothing, eps_c = eps_t + (eps_h - eps_t) sin(pi (n_c - n_min) /
    (2 (n_max - n_min))) (shape "concave"; "linear", "convex", "exp" as methods.py), loss
    (1 - eps_y) NLL + eps_y mean_c(-log p_c), batch mean; (eps_h, eps_t) = (0.3, 0.0) for
    CIFAR-10, (0.4, 0.1) for CIFAR-100.
  - head `scaled_linear`: the stage-1 linear classifier followed by a learnable per-class scale
    (LearnableWeightScaling, initialised to 1); train only `heads.main.fc` in stage 1 (the scale
    stays 1) and `heads.main` in stage 2.
  - optimizer `sgd_scaled`: SGD whose parameter groups follow each parameter's `lr_scale`
    attribute (the scaled_linear head puts `linear_lr_scale` on its linear layer): the
    classifier at lr_factor x lr (0.5 CIFAR-10, 0.2 CIFAR-100), the scale at the full lr, as
    train_stage2.py's two optimizer groups.
Differences: stage 2's cosine is per step here (the reference sets it once per epoch, epoch
e of E at 0.5 (1 + cos(pi e / E))); a class distribution with n_max = n_min gives every class
eps_t (the reference divides by zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ltframe.builtin.optim import SGDParams, _impl
from ltframe.config import param
from ltframe.engine.context import StepContext
from ltframe.registry import Registry
from ltframe_ltbase.mixup import mixed_loss


@dataclass
class MislasParams:
    head: str = param("main", ref="head")
    part: str = param("labeled", ref="part")
    smooth_head: float = param(0.3, ge=0, le=1)  # eps of the most frequent class (C10 0.3, C100 0.4)
    smooth_tail: float = param(0.0, ge=0, le=1)  # eps of the rarest class (C10 0.0, C100 0.1)
    shape: Literal["concave", "linear", "convex", "exp"] = "concave"
    power: float = param(1.0, gt=0, le=100)  # shape "exp": eps_t + (eps_h - eps_t) r^power


def smoothing(counts: Tensor, head: float, tail: float, shape: str, power: float = 1.0) -> Tensor:
    """Per-class eps_c of label-aware smoothing (methods.py LabelAwareSmoothing)."""
    n = counts.double()
    span = n.max() - n.min()
    r = (n - n.min()) / span if span > 0 else torch.zeros_like(n)
    if shape == "concave":
        eps = tail + (head - tail) * torch.sin(r * math.pi / 2)
    elif shape == "linear":
        eps = tail + (head - tail) * r
    elif shape == "convex":
        eps = head + (head - tail) * torch.sin(1.5 * math.pi + r * math.pi / 2)
    else:
        eps = tail + (head - tail) * r.pow(power)
    return eps.float()


class LabelAwareSmoothing:
    """(1 - eps_y) NLL + eps_y mean_c(-log p_c); understands the `mixup` transform."""

    def __init__(self, params: MislasParams, num_classes: int, class_counts: Tensor) -> None:
        self.p = params
        self.eps = smoothing(class_counts, params.smooth_head, params.smooth_tail, params.shape,
                             params.power).to(class_counts.device)

    def per_target(self, logp: Tensor, y: Tensor) -> Tensor:
        eps = self.eps.to(logp.device)[y]
        nll = -logp.gather(1, y[:, None]).squeeze(1)
        return ((1.0 - eps) * nll + eps * -logp.mean(dim=1)).mean()

    def __call__(self, ctx: StepContext) -> Tensor:
        logp = F.log_softmax(ctx.logits(self.p.part, self.p.head), dim=1)
        return mixed_loss(ctx, self.p.part, lambda y: self.per_target(logp, y))


@dataclass
class ScaledLinearParams:
    bias: bool = True
    linear_lr_scale: float = param(1.0, gt=0, le=1e3)  # lr factor of the linear layer under sgd_scaled


class ScaledLinear(nn.Module):
    """Linear classifier then a learnable per-class scale (MiSLAS's classifier + LWS)."""

    def __init__(self, p: ScaledLinearParams, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes, bias=p.bias)
        self.scale = nn.Parameter(torch.ones(num_classes))
        for t in self.fc.parameters():
            t.lr_scale = p.linear_lr_scale  # read by the `sgd_scaled` optimizer

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.scale.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) * self.scale


def sgd_scaled(p: SGDParams, params) -> torch.optim.Optimizer:
    """SGD with one parameter group per distinct `lr_scale` attribute (default 1): lr x scale."""
    params = list(params)
    groups: dict[float, list] = {}
    for t in params:
        groups.setdefault(float(getattr(t, "lr_scale", 1.0)), []).append(t)
    table = [{"params": ts, "lr": p.lr * s} for s, ts in sorted(groups.items())]
    return torch.optim.SGD(table, lr=p.lr, momentum=p.momentum, nesterov=p.nesterov,
                           weight_decay=p.weight_decay, **_impl(p.impl, table))


def register(registry: Registry) -> None:
    registry.register("loss", "mislas", LabelAwareSmoothing, MislasParams,
                      aliases=("label_aware_smoothing",))
    registry.register("head", "scaled_linear", ScaledLinear, ScaledLinearParams)
    registry.register("optimizer", "sgd_scaled", sgd_scaled, SGDParams)
