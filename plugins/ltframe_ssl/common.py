"""Helpers shared by the semi-supervised components: ramp-ups, (soft) cross-entropy, and how
a component finds the views of a step.

Views and parts: `stage.views.unlabeled = ["weak", "strong"]` (the default) makes the parts
"unlabeled:weak" and "unlabeled:strong"; "unlabeled" is an alias of the first. A view named
twice gets its position appended from the second on: `views.unlabeled = ["weak", "weak"]`
makes "unlabeled:weak" and "unlabeled:weak#1" (two independent weak augmentations of the same
images). Labeled views work the same way ("labeled" = the first labeled view).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ltframe.engine.context import PseudoLabels, StepContext
from ltframe.errors import LtframeError


def linear_ramp(step: int, total_steps: int, warmup: float) -> float:
    """USB's ramp-up of an unsupervised weight: clip(step / (warmup * total_steps), 0, 1)
    (e.g. semilearn/algorithms/pseudolabel/pseudolabel.py, `unsup_warmup`). 1 when there is no
    warm-up or the stage length is unknown (total_steps = 0)."""
    if warmup <= 0 or total_steps <= 0:
        return 1.0
    return min(1.0, max(0.0, step / (warmup * total_steps)))


def sigmoid_ramp(step: int, total_steps: int, warmup: float) -> float:
    """The Mean Teacher paper's ramp-up exp(-5 (1 - x)^2), x = clip(step / (warmup * total));
    (Tarvainen & Valpola 2017, after Laine & Aila 2017)."""
    x = linear_ramp(step, total_steps, warmup)
    return math.exp(-5.0 * (1.0 - x) ** 2)


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-sample -sum_c targets_c log softmax(logits)_c; hard int64 targets give plain CE."""
    if targets.dim() == 1:
        return F.cross_entropy(logits, targets, reduction="none")
    return -(targets.to(logits.dtype) * F.log_softmax(logits, dim=1)).sum(1)


def require_pseudo(ctx: StepContext, who: str, rows: int) -> PseudoLabels:
    """The step's pseudo-labels, checked to have `rows` rows."""
    pseudo = ctx.pseudo
    if pseudo is None:
        raise LtframeError(f"loss '{who}' trains on pseudo-labels but this stage has none; set "
                           "stage.pseudo_labeler (e.g. \"threshold\", or \"align\" for "
                           "distribution alignment)")
    if pseudo.targets.shape[0] != rows:
        raise LtframeError(f"loss '{who}': the pseudo-labels have {pseudo.targets.shape[0]} rows "
                           f"but the logits {rows}; the pseudo-labeler's `part` must be an "
                           "unlabeled view (e.g. \"unlabeled\")")
    return pseudo


def masked_unlabeled_ce(logits: Tensor, pseudo: PseudoLabels) -> Tensor:
    """mean_i mask_i * CE(logits_i, target_i) over ALL rows (masked rows count in the
    denominator), as FixMatch (Sohn et al. 2020) and USB's consistency_loss reduce it."""
    return (soft_cross_entropy(logits, pseudo.targets) * pseudo.mask.to(logits.dtype)).mean()


def view_parts(ctx: StepContext, split: str) -> list[str]:
    """The parts of `split`'s views in view order ("unlabeled:weak", "unlabeled:weak#1", ...),
    without the bare alias."""
    names = ctx.logits_by_part or ctx.inputs_by_part
    return [p for p in names if p.startswith(f"{split}:")]


def second_unlabeled_view(ctx: StepContext, who: str) -> str:
    parts = view_parts(ctx, "unlabeled")
    if len(parts) < 2:
        raise LtframeError(f"{who} needs two unlabeled views (parts: {', '.join(parts) or 'none'});"
                           " set stage.views.unlabeled = [\"weak\", \"weak\"] (parts "
                           "\"unlabeled:weak\" and \"unlabeled:weak#1\") or name the part")
    return parts[1]


def state_device(device: torch.device | str | None, *like: Tensor | None) -> torch.device:
    """Where a component keeps its state: the factory's `device` (the run's device), else that
    of the first given tensor (the engine puts `class_counts` / `labeled_counts` on the run's
    device), else the CPU. State made there at construction is never copied in a step."""
    if device is not None:
        return torch.device(device)
    for t in like:
        if t is not None:
            return t.device
    return torch.device("cpu")


def normalize(x: Tensor, dim: int = -1) -> Tensor:
    return x / x.sum(dim=dim, keepdim=True)


def one_hot(targets: Tensor, num_classes: int) -> Tensor:
    return F.one_hot(targets, num_classes).to(torch.float32)
