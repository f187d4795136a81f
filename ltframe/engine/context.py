"""What a loss term, pseudo-labeler or input transform sees during one step, and what an
offline pseudo-labeler sees when a whole pool of samples is labelled between stages."""

from __future__ import annotations

from collections.abc import Callable
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
    total_steps: int = 0  # steps of the stage (for ramp-ups)
    steps_per_epoch: int = 0  # steps of one stage epoch (0: not known, e.g. a hand-made context)
    inputs_by_part: dict[str, Tensor] = field(default_factory=dict)  # augmented input batches
    # dataset indices (into the source's train set, on the device) of each part's samples
    indices_by_part: dict[str, Tensor] = field(default_factory=dict)
    # per-sample weights / soft targets of the labeled part from the run's target table
    # (None when every weight is 1 / when the stage's samples have no soft targets)
    weights: Tensor | None = None
    soft_targets: Tensor | None = None
    # the stage's teacher module (the EMA model, or the frozen copy of stage.teacher =
    # "start"; None without one), for a component that keeps part of it in step with its own
    # state (e.g. the EMA copy of a head it trains itself)
    teacher_model: Any = None
    # engine-provided no-grad forwards: (part) -> (features, {head: logits})
    _teacher: Callable[[str], tuple[Tensor, dict[str, Tensor]]] | None = None
    # the teacher's forward on any batch: (inputs) -> (features, {head: logits})
    _teacher_on: Callable[[Tensor], tuple[Tensor, dict[str, Tensor]]] | None = None
    _student_no_grad: Callable[[Tensor], tuple[Tensor, dict[str, Tensor]]] | None = None
    # (inputs, features, logits) of each part's teacher forward
    _teacher_cache: dict[str, tuple[Tensor, Tensor, dict[str, Tensor]]] = field(default_factory=dict)

    def _part(self, part: str, known: dict | None = None) -> str:
        """`part` if it is one of `known`'s keys (default: the model outputs' parts)."""
        known = self.features_by_part if known is None else known
        if part not in known:
            raise LtframeError(f"this stage has no '{part}' inputs (parts: {', '.join(known)}); "
                               "check the stage's data and views")
        return part

    def _input_part(self, part: str) -> str:
        return self._part(part, self.inputs_by_part)

    def features(self, part: str = "labeled") -> Tensor:
        return self.features_by_part[self._part(part)]

    def logits(self, part: str = "labeled", head: str = "main") -> Tensor:
        by_head = self.logits_by_part[self._part(part)]
        if head not in by_head:
            raise LtframeError(f"no head '{head}' in the model (heads: {', '.join(by_head)}); "
                               "add it under [model.heads]")
        return by_head[head]

    def inputs(self, part: str) -> Tensor:
        """The augmented images that produced (or, before the forward, will produce) `part`'s
        outputs."""
        return self.inputs_by_part[self._input_part(part)]

    def indices(self, part: str = "labeled") -> Tensor:
        """Dataset indices (train set, on the device) of `part`'s samples, aligned with its
        rows; for per-sample state such as a memory of earlier predictions."""
        split = part.split(":")[0]
        if split not in self.indices_by_part:
            raise LtframeError(f"this stage has no '{split}' samples (parts: "
                               f"{', '.join(self.indices_by_part)}); check the stage's data")
        return self.indices_by_part[split]

    def has(self, part: str) -> bool:
        return part in self.features_by_part or part in self.inputs_by_part

    def teacher_logits(self, part: str = "unlabeled", head: str = "main") -> Tensor:
        """No-grad logits of the stage's teacher (`stage.teacher`: the EMA model, or a frozen
        copy of the model as the stage started) on `part`'s inputs; computed once per step."""
        by_head = self._teacher_out(part)[1]
        if head not in by_head:
            raise LtframeError(f"no head '{head}' in the teacher (heads: {', '.join(by_head)})")
        return by_head[head]

    def teacher_features(self, part: str = "labeled") -> Tensor:
        """No-grad backbone features of the stage's teacher on `part`'s inputs (the same
        forward as `teacher_logits`, computed once per step and part), e.g. for a feature queue
        of EMA-model features."""
        return self._teacher_out(part)[0]

    def teacher_forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """No-grad (features, {head: logits}) of the stage's teacher on any input batch `x`
        (e.g. images a component drew and augmented itself), with the stage's teacher BatchNorm
        mode and precision; not cached."""
        if self._teacher_on is None:
            raise LtframeError("this stage has no teacher model: set stage.ema > 0 (teacher = "
                               "\"ema\") or stage.teacher = \"start\"")
        return self._teacher_on(x)

    def _teacher_out(self, part: str) -> tuple[Tensor, dict[str, Tensor]]:
        if self._teacher is None:
            raise LtframeError("this stage has no teacher model: set stage.ema > 0 (teacher = "
                               "\"ema\") or stage.teacher = \"start\"")
        key = self._input_part(part)
        x = self.inputs_by_part[key]
        hit = self._teacher_cache.get(key)
        if hit is None or hit[0] is not x:  # inputs replaced by a transform: recompute
            feats, by_head = self._teacher(key)
            self._teacher_cache[key] = (x, feats, by_head)
        return self._teacher_cache[key][1], self._teacher_cache[key][2]

    def predict_no_grad(self, x: Tensor, head: str = "main") -> Tensor:
        """No-grad logits of the model being trained on `x` (BatchNorm normalises with the
        batch's statistics but its running statistics are left unchanged), e.g. for an input
        transform that guesses labels before the training forward."""
        if self._student_no_grad is None:
            raise LtframeError("predict_no_grad is only available during a training step")
        return self._student_no_grad(x)[1][head]


class LossTerm(Protocol):
    """A `loss` component: called once per step; returns a scalar tensor."""

    def __call__(self, ctx: StepContext) -> Tensor: ...


class PseudoLabeler(Protocol):
    """A `pseudo_labeler` component: teacher outputs in `ctx` -> targets + mask (online, every
    step). A labeler that can also label a whole pool between stages (offline mode, used by
    `stage.label`) implements `label_pool(pool) -> PoolLabels`."""

    def __call__(self, ctx: StepContext) -> PseudoLabels: ...


class InputTransform(Protocol):
    """A `transform` component: runs after the views and before the training forward. It may
    replace `ctx.inputs_by_part[part]` (same batch size) and put targets it made (e.g. mixed
    soft targets) in `ctx.extras` for its loss; `ctx.predict_no_grad` and
    `ctx.teacher_logits` give label guesses. Logits and features are not yet filled in."""

    def __call__(self, ctx: StepContext) -> None: ...


@dataclass
class PoolPredictions:
    """What an offline pseudo-labeler sees: the evaluation model's class probabilities for every
    sample of a pool (un-augmented images), never the pool's true labels (only the held-out
    labeled `val` split of an `epoch_pool` pass comes with its labels)."""

    index: Tensor  # int64 [N] dataset indices (train set; the val store for split "val")
    probs: Tensor  # float32 [N, C] softmax of the evaluation head (CPU)
    num_classes: int
    class_counts: Tensor  # labeled counts per class (CPU)
    stage_index: int
    stage_name: str
    logits: Tensor | None = None  # float32 [N, C] (e.g. for temperature-scaled soft targets)
    split: str = "unlabeled"  # the pool's split: "unlabeled" (or a labelling pool) or "val"
    labels: Tensor | None = None  # int64 [N] true labels: the "val" split only


@dataclass
class PoolLabels:
    """What an offline pseudo-labeler keeps: a subset of the pool with hard (int64 [K]) or soft
    (float [K, C]) targets and per-sample weights (float [K])."""

    index: Tensor
    targets: Tensor
    weight: Tensor
    confidence: Tensor | None = None  # float [K], for the written list


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
