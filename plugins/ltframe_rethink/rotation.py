"""Rotation pretext (Gidaris et al. 2018, as used for SSP in paper 001): every image is
rotated by k * 90 degrees with k = (position in batch) mod 4, so the rotation labels are exactly
balanced and, because the sampler shuffles images, random per image (YyzHarry/imbalanced-semi-self
utils.py `rotation` draws a shuffled balanced label list per batch instead)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ltframe.config import param
from ltframe.data.views import WeakParams, WeakView
from ltframe.engine.context import StepContext
from ltframe.errors import RecipeError
from ltframe.registry import Registry

#: the rotation pretext task's classes (0, 90, 180, 270 degrees)
ROTATIONS = 4


def rotation_labels(n: int, device: torch.device) -> Tensor:
    return torch.arange(n, device=device) % 4


def rotate_by_position(x: Tensor) -> Tensor:
    """Rotate image i of the batch by (i mod 4) * 90 degrees (square images)."""
    k = rotation_labels(x.shape[0], x.device)
    out = x
    for r in (1, 2, 3):
        out = torch.where((k == r)[:, None, None, None], torch.rot90(x, r, dims=(2, 3)), out)
    return out


@dataclass
class RotateParams(WeakParams):
    """The SSP reference's train transform (imbalanced-semi-self pretrain_rot.py:
    RandomCrop(32, padding=4), RandomHorizontalFlip): zero (black) padding, unlike `weak`."""

    pad: int = param(4, ge=0, le=1024)
    padding_mode: Literal["reflect", "zeros"] = "zeros"


class RotateView(WeakView):
    """Weak augmentation (flip + pad-crop, zero padding by default), then rotation by
    (batch position mod 4) * 90 degrees; per-channel normalisation commutes with the rotation."""

    def apply(self, x: Tensor, draws: tuple) -> Tensor:
        return rotate_by_position(super().apply(x, draws))


@dataclass
class RotationLossParams:
    head: str = param("rot", ref="any_head")  # a 4-way head: { name = "linear", out_features = 4 }
    part: str = "labeled"


class RotationLoss:
    """CE between the 4-way head's logits and the rotation labels of the `rotate` view."""

    def __init__(self, params: RotationLossParams, num_classes: int, class_counts: Tensor) -> None:
        self.p = params

    def preflight(self, info: Any) -> None:
        """Before the run: the head must give (at least) one logit per rotation."""
        width = info.head_widths.get(self.p.head, ROTATIONS)
        if width < ROTATIONS:
            raise RecipeError(f"head '{self.p.head}' has {width} outputs but the rotation loss "
                              f"predicts {ROTATIONS} rotations; set [model.heads] {self.p.head} = "
                              f"{{ name = \"linear\", out_features = {ROTATIONS} }}")

    def __call__(self, ctx: StepContext) -> Tensor:
        logits = ctx.logits(self.p.part, self.p.head)
        return F.cross_entropy(logits, rotation_labels(logits.shape[0], logits.device))


def register(registry: Registry) -> None:
    registry.register("view", "rotate", RotateView, RotateParams)
    registry.register("loss", "rotation", RotationLoss, RotationLossParams)
