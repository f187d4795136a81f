"""What a loss term or pseudo-labeler sees during one step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from ltframe.errors import LtframeError


@dataclass
class PseudoLabels:
    """targets: int64 [B] (hard) or float [B, C] (soft); mask: float [B] sample weights."""

    targets: Tensor
    mask: Tensor


@dataclass
class StepContext:
    """One step's inputs and model outputs, split back into named parts.

    Parts are "labeled" (first labeled view), "labeled:<view>", "unlabeled" (first unlabeled
    view) and "unlabeled:<view>". All parts went through the model in one forward pass.
    """

    step: int
    epoch: int
    num_classes: int
    class_counts: Tensor  # labeled counts per class (on the device)
    targets: Tensor | None  # labels of the labeled batch
    features_by_part: dict[str, Tensor]
    logits_by_part: dict[str, dict[str, Tensor]]
    pseudo: PseudoLabels | None = None
    losses: dict[str, Tensor] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    model: Any = None  # the LTModel being trained (e.g. for a momentum encoder)
    inputs_by_part: dict[str, Tensor] = field(default_factory=dict)  # augmented input batches

    def _part(self, part: str) -> str:
        if part not in self.features_by_part:
            raise LtframeError(
                f"this stage has no '{part}' inputs (parts: {', '.join(self.features_by_part)}); "
                "check the stage's data and views"
            )
        return part

    def features(self, part: str = "labeled") -> Tensor:
        return self.features_by_part[self._part(part)]

    def logits(self, part: str = "labeled", head: str = "main") -> Tensor:
        by_head = self.logits_by_part[self._part(part)]
        if head not in by_head:
            raise LtframeError(f"no head '{head}' in the model (heads: {', '.join(by_head)}); "
                               "add it under [model.heads]")
        return by_head[head]

    def inputs(self, part: str) -> Tensor:
        """The augmented images that produced `part`'s outputs."""
        return self.inputs_by_part[self._part(part)]

    def has(self, part: str) -> bool:
        return part in self.features_by_part


class LossTerm(Protocol):
    """A `loss` component: called once per step; returns a scalar tensor."""

    def __call__(self, ctx: StepContext) -> Tensor: ...


class PseudoLabeler(Protocol):
    """A `pseudo_labeler` component: teacher outputs in `ctx` -> targets + mask."""

    def __call__(self, ctx: StepContext) -> PseudoLabels: ...


def split_outputs(feats: Tensor, logits: dict[str, Tensor], sizes: dict[str, int]
                  ) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    names = list(sizes)
    counts = [sizes[n] for n in names]
    f_parts = dict(zip(names, torch.split(feats, counts), strict=True))
    l_parts: dict[str, dict[str, Tensor]] = {n: {} for n in names}
    for head, out in logits.items():
        for n, chunk in zip(names, torch.split(out, counts), strict=True):
            l_parts[n][head] = chunk
    return f_parts, l_parts
