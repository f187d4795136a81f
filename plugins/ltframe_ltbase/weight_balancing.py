"""Weight balancing (Alshammari et al., CVPR 2022, "Long-Tailed Recognition via Weight
Balancing"), from ShadeAlsha/LTR-weight-balancing (demo1_first-stage-training.py,
demo2_second-stage-training.py, utils/class_balanced_loss.py, utils/regularizers.py).

Stage 1 is plain CE with a strong weight decay (5e-3; optimizer values in the recipe). Stage 2
trains only the classifier (the frozen backbone in train mode: `frozen_bn = "update"`) with
weight decay 0.1 and:
- loss `weight_balancing`: the repo's class-balanced "softmax" loss, which is binary
  cross-entropy on the softmax probabilities against the one-hot label, each sample weighted by
  the CB weight of its label (beta 0.9999, normalised to sum to C) and averaged over B x C
  (F.binary_cross_entropy(softmax(z), onehot, weight=w_y)); not softmax-CE. With
  `max_norm > 0` it also applies the MaxNorm constraint below to the head it trains.
- `MaxNorm` (a generic constraint object any component can hold; `weight_balancing` does):
  MaxNorm via projected gradient descent (MaxNorm_via_PGD). The threshold
  min_c ||w_c|| + t (max_c ||w_c|| - min_c ||w_c||) (t = 0.1) is fixed from the head's rows
  when the stage starts (its first step, before any update); after each epoch's last optimizer
  step (`every = "epoch"`, the repo's train_model; "step" projects after every step) rows above
  it are scaled onto it. The bias is not constrained. The projection runs in the
  `ltframe_step_end` event, so it precedes the epoch's evaluation and checkpoint; the
  threshold is checkpointed. Projected: the weight `parameter` (default "weight": a linear
  head's [C, D] rows; "fc.weight" for an `lws` head).
The demos pick the epoch with the best test accuracy (`[eval] report = "best"` reproduces it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ltframe import hookimpl
from ltframe.config import param
from ltframe.engine.context import StepContext
from ltframe.errors import RecipeError
from ltframe.registry import Registry
from ltframe_classics.losses import cb_weights
from ltframe_ltbase.mixup import mixed_loss


@dataclass
class MaxNormParams:
    head: str = param("main", ref="head")  # the head whose rows are constrained
    parameter: str = "weight"  # its [C, D] weight ("fc.weight" for an lws head)
    thresh: float = param(0.1, ge=0, le=1)  # t: threshold = min + t (max - min) of the row norms
    every: Literal["epoch", "step"] = "epoch"  # projection after each epoch (the repo) or step


class MaxNorm:
    """Row-norm cap on a head's weight, projected after optimizer steps. A holder calls
    `start(model)` in its first step and forwards its `ltframe_step_end` event (the engine
    broadcasts step events to a stage's components; a stage has no slot for a component that
    is not a loss, labeler or transform, so the constraint rides with its loss)."""

    def __init__(self, params: MaxNormParams) -> None:
        self.p = params
        self.threshold: Tensor | None = None  # fixed when the stage starts; checkpointed

    def weight(self, model: Any) -> Tensor:
        heads = getattr(model, "heads", {})
        if self.p.head not in heads:
            raise RecipeError(f"max_norm: no head '{self.p.head}' in the model")
        try:
            w = heads[self.p.head].get_parameter(self.p.parameter)
        except AttributeError:
            raise RecipeError(f"max_norm: head '{self.p.head}' has no parameter '{self.p.parameter}' "
                              "(a linear head: \"weight\"; an lws head: \"fc.weight\")") from None
        if w.dim() != 2:
            raise RecipeError(f"max_norm: {self.p.head}.{self.p.parameter} is not a [classes, features] "
                              "matrix")
        return w

    def preflight(self, info: Any) -> None:
        """Before the run: the head and its [C, D] weight exist."""
        self.weight(info.model)

    @torch.no_grad()
    def start(self, model: Any) -> None:
        """The threshold from the rows as they are (once per stage; kept on resume)."""
        if self.threshold is None:
            norms = self.weight(model).detach().float().norm(dim=1)
            self.threshold = norms.min() + self.p.thresh * (norms.max() - norms.min())

    @torch.no_grad()
    def project(self, model: Any) -> None:
        w = self.weight(model)
        norms = w.detach().float().norm(dim=1, keepdim=True)
        scale = (self.threshold / norms.clamp_min(1e-12)).clamp(max=1.0)
        w.mul_(scale.to(w.dtype))

    def due(self, ctx: StepContext) -> bool:
        """After this step: every step, or the last step of a stage epoch."""
        if self.p.every == "step":
            return True
        done = ctx.step + 1
        spe = ctx.steps_per_epoch
        return done == ctx.total_steps or (spe > 0 and done % spe == 0)

    @hookimpl
    def ltframe_step_end(self, run: Any, stage: Any, step: int, ctx: Any) -> None:
        if self.threshold is not None and ctx is not None and self.due(ctx):
            self.project(ctx.model)

    def state_dict(self) -> dict:
        return {} if self.threshold is None else {"threshold": self.threshold.clone()}

    def load_state_dict(self, state: dict) -> None:
        if "threshold" in state:
            self.threshold = state["threshold"].clone()


@dataclass
class WeightBalancingParams:
    head: str = param("main", ref="head")
    part: str = param("labeled", ref="part")
    beta: float = param(0.9999, ge=0, lt=1)  # CB weights (effective number)
    max_norm: float = param(0.1, ge=0, le=1)  # MaxNorm threshold t; 0 = no constraint
    parameter: str = "weight"  # the head's [C, D] weight that MaxNorm constrains
    every: Literal["epoch", "step"] = "epoch"  # MaxNorm projection after each epoch / step


def cb_softmax_bce(logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """mean over B x C of w_{y_i} BCE(softmax(z)_ic, onehot_ic) (utils/class_balanced_loss.py
    CB_loss, loss_type "softmax")."""
    probs = logits.float().softmax(dim=1)
    onehot = F.one_hot(targets, logits.shape[1]).float()
    w = weights[targets][:, None].expand_as(probs)
    return F.binary_cross_entropy(probs, onehot, weight=w)


class WeightBalancing:
    """Weight balancing's stage-2 loss (CB softmax-BCE) with its MaxNorm constraint."""

    def __init__(self, params: WeightBalancingParams, num_classes: int, class_counts: Tensor,
                 device: Any = None) -> None:
        self.p = params
        self.cb = cb_weights(class_counts, params.beta).to(class_counts.device)
        self.max_norm = (MaxNorm(MaxNormParams(params.head, params.parameter, params.max_norm,
                                               params.every))
                         if params.max_norm > 0 else None)

    def preflight(self, info: Any) -> None:
        if self.max_norm is not None:
            self.max_norm.preflight(info)

    def __call__(self, ctx: StepContext) -> Tensor:
        if self.max_norm is not None:
            self.max_norm.start(ctx.model)
        logits = ctx.logits(self.p.part, self.p.head)
        cb = self.cb.to(logits.device)
        return mixed_loss(ctx, self.p.part, lambda y: cb_softmax_bce(logits, y, cb))

    @hookimpl
    def ltframe_step_end(self, run: Any, stage: Any, step: int, ctx: Any) -> None:
        if self.max_norm is not None:
            self.max_norm.ltframe_step_end(run, stage, step, ctx)

    def state_dict(self) -> dict:
        return self.max_norm.state_dict() if self.max_norm is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.max_norm is not None:
            self.max_norm.load_state_dict(state)


def register(registry: Registry) -> None:
    registry.register("loss", "weight_balancing", WeightBalancing, WeightBalancingParams)
