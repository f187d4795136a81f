"""Unlabeled loss terms of FixMatch, Pseudo-Label and Mean Teacher.

Each is the unsupervised term only: the supervised term is another loss of the recipe (e.g.
`ce` or `la` from the classics) and lambda_u is the term's `weight`:
`loss = ["ce", {name = "fixmatch", weight = 1.0}]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ltframe.config import param
from ltframe.engine.context import StepContext
from ltframe.errors import LtframeError
from ltframe.registry import Registry
from ltframe_ssl.common import (
    linear_ramp,
    masked_unlabeled_ce,
    require_pseudo,
    second_unlabeled_view,
    sigmoid_ramp,
)


@dataclass
class FixMatchParams:
    part: str = "unlabeled:strong"  # the view trained towards the pseudo-labels
    head: str = "main"


class FixMatchLoss:
    """FixMatch's unlabeled term (Sohn et al. 2020): mean over all unlabeled samples of
    mask * CE(logits of the strong view, pseudo-label); masked samples count in the denominator
    (USB semilearn/core/criterions/consistency.py:14-40 with fixmatch.py:48-98;
    google-research/crest fixmatch.py:74-102, divisor 'full'). Soft pseudo-labels
    (`hard = false` on the labeler) give the soft cross-entropy. Needs stage.pseudo_labeler
    ("threshold", or "align" for CReST+); USB and CReST use weight (lambda_u) 1."""

    def __init__(self, params: FixMatchParams) -> None:
        self.p = params

    def __call__(self, ctx: StepContext) -> Tensor:
        logits = ctx.logits(self.p.part, self.p.head)
        return masked_unlabeled_ce(logits, require_pseudo(ctx, "fixmatch", logits.shape[0]))


@dataclass
class PseudoLabelParams:
    part: str = "unlabeled"  # the same view the pseudo-labeler looked at
    head: str = "main"
    warmup: float = param(0.4, ge=0, le=1)  # ramp over this fraction of the stage (USB: 0.4)


class PseudoLabelLoss:
    """Pseudo-Label (Lee 2013, "Pseudo-Label: The Simple and Efficient Semi-Supervised Learning
    Method for Deep Neural Networks") as USB implements it
    (semilearn/algorithms/pseudolabel/pseudolabel.py:44-77): the masked CE of a view towards
    its own thresholded argmax (one weak view; labeler and loss on the same part), times the
    linear ramp min(1, step / (warmup * total_steps)), warmup 0.4. USB's config uses weight 1
    and mu = 1 (`views.unlabeled = ["weak"]`, `unlabeled_ratio = 1`). Unlike USB, the unlabeled
    batch shares the labeled batch's forward (and BatchNorm statistics)."""

    def __init__(self, params: PseudoLabelParams) -> None:
        self.p = params

    def __call__(self, ctx: StepContext) -> Tensor:
        logits = ctx.logits(self.p.part, self.p.head)
        loss = masked_unlabeled_ce(logits, require_pseudo(ctx, "pseudo_label", logits.shape[0]))
        return loss * linear_ramp(ctx.step, ctx.total_steps, self.p.warmup)


@dataclass
class MeanTeacherParams:
    # the student's view; "" = the second unlabeled view (views.unlabeled = ["weak", "weak"]
    # gives "unlabeled:weak" for the teacher and "unlabeled:weak#1" for the student)
    part: str = ""
    teacher_part: str = param("unlabeled", ref="part")  # the teacher's view (the first unlabeled view)
    head: str = "main"
    warmup: float = param(0.4, ge=0, le=1)  # ramp over this fraction of the stage (USB: 0.4)
    ramp: Literal["linear", "sigmoid"] = "linear"  # USB: linear; the paper: exp(-5 (1 - x)^2)


class MeanTeacherLoss:
    """Mean Teacher (Tarvainen & Valpola 2017, "Mean teachers are better role models"):
    mean over samples and classes of (softmax(student) - softmax(teacher))^2, the teacher being
    the engine's no-grad teacher (`ctx.teacher_logits`: the EMA model with stage.ema > 0, USB
    ema_m 0.999) on another augmentation of the same images, times a ramp-up (USB
    semilearn/algorithms/meanteacher/meanteacher.py:36-69: linear over 0.4 of training, weight
    (ulb_loss_ratio) 50, mu = 1; the paper's code: softmax_mse_loss / num_classes / batch, the
    same reduction, with the sigmoid ramp). USB 0.3.0 (commit 7429eee) and USB's master since
    commit 639cfbf (2024-03) feed the teacher's logits (EMA weights, weak view) as the
    student's (meanteacher.py `logits_x_ulb_s = outs_x_ulb_w['logits']`), so their
    consistency term has no gradient (issues #102, #226); 0.3.1 and 0.3.2 (the PyPI
    releases) use the student's strong-view forward.
    We follow the paper: the gradient reaches the student only. USB's teacher normalises
    with batch statistics: set stage.teacher_bn = "batch" to match it."""

    def __init__(self, params: MeanTeacherParams) -> None:
        self.p = params

    def preflight(self, info: Any) -> None:
        """Before the run: the stage needs a teacher model."""
        cfg = info.plan.cfg
        if cfg.teacher == "ema" and cfg.ema <= 0:
            raise LtframeError("loss 'mean_teacher' needs a teacher model but this stage has "
                               "none: set stage.ema > 0 (teacher = \"ema\") or stage.teacher = "
                               "\"start\"")

    def __call__(self, ctx: StepContext) -> Tensor:
        part = self.p.part or second_unlabeled_view(ctx, "loss 'mean_teacher'")
        student = torch.softmax(ctx.logits(part, self.p.head), dim=1)
        teacher = torch.softmax(ctx.teacher_logits(self.p.teacher_part, self.p.head).float(), dim=1)
        ramp = (sigmoid_ramp if self.p.ramp == "sigmoid" else linear_ramp)(
            ctx.step, ctx.total_steps, self.p.warmup)
        return F.mse_loss(student, teacher.detach()) * ramp


def register(registry: Registry) -> None:
    registry.register("loss", "fixmatch", FixMatchLoss, FixMatchParams)
    registry.register("loss", "pseudo_label", PseudoLabelLoss, PseudoLabelParams)
    registry.register("loss", "mean_teacher", MeanTeacherLoss, MeanTeacherParams)
