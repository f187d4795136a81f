"""Optimizers (sgd, adam, adamw) and lr schedules (constant, cosine, step), all with an
optional linear warm-up. A schedule is a pure function step -> lr factor, so resume is exact."""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch

from ltframe.registry import Registry


@dataclass
class SGDParams:
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4


@dataclass
class AdamParams:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8


def sgd(p: SGDParams, params) -> torch.optim.Optimizer:
    """SGD with (optionally Nesterov) momentum."""
    return torch.optim.SGD(params, lr=p.lr, momentum=p.momentum, nesterov=p.nesterov,
                           weight_decay=p.weight_decay)


def adam(p: AdamParams, params) -> torch.optim.Optimizer:
    """Adam (L2 weight decay)."""
    return torch.optim.Adam(params, lr=p.lr, betas=p.betas, weight_decay=p.weight_decay,
                            eps=p.eps)


def adamw(p: AdamParams, params) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay)."""
    return torch.optim.AdamW(params, lr=p.lr, betas=p.betas, weight_decay=p.weight_decay,
                             eps=p.eps)


def _warmup(epochs: float, steps_per_epoch: int, inner: Callable[[int], float]
            ) -> Callable[[int], float]:
    warm = int(round(epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return inner(step)

    return factor


@dataclass
class ConstantParams:
    warmup_epochs: float = 0.0


def constant(p: ConstantParams, steps_per_epoch: int, total_steps: int) -> Callable[[int], float]:
    """Constant lr (after an optional linear warm-up)."""
    return _warmup(p.warmup_epochs, steps_per_epoch, lambda step: 1.0)


@dataclass
class CosineParams:
    warmup_epochs: float = 0.0
    min_factor: float = 0.0
    form: Literal["annealing", "truncated"] = "annealing"
    cycles: float = 7 / 16  # truncated form: factor cos(pi * cycles * k / K)


def cosine(p: CosineParams, steps_per_epoch: int, total_steps: int) -> Callable[[int], float]:
    """Cosine decay over the stage: annealing 0.5(1 + cos(pi k/K)), or truncated
    cos(pi * cycles * k / K) (cycles 7/16 is FixMatch's, Sohn et al. 2020, google-research/fixmatch)."""
    total = max(total_steps, 1)

    def inner(step: int) -> float:
        t = step / total
        if p.form == "truncated":
            return max(p.min_factor, math.cos(math.pi * p.cycles * t))
        return p.min_factor + (1 - p.min_factor) * 0.5 * (1 + math.cos(math.pi * t))

    return _warmup(p.warmup_epochs, steps_per_epoch, inner)


@dataclass
class StepParams:
    milestones: list[float] = field(default_factory=lambda: [160.0, 180.0])  # epochs
    gamma: float = 0.1  # factor applied at each milestone
    warmup_epochs: float = 0.0


def step(p: StepParams, steps_per_epoch: int, total_steps: int) -> Callable[[int], float]:
    """Multiply the lr by `gamma` at each milestone epoch (LDAM-DRW: [160, 180], 0.01)."""
    bounds = sorted(int(round(m * steps_per_epoch)) for m in p.milestones)
    return _warmup(p.warmup_epochs, steps_per_epoch,
                   lambda s: p.gamma ** bisect.bisect_right(bounds, s))


def register(registry: Registry) -> None:
    registry.register("optimizer", "sgd", sgd, SGDParams)
    registry.register("optimizer", "adam", adam, AdamParams)
    registry.register("optimizer", "adamw", adamw, AdamParams)
    registry.register("lr_schedule", "constant", constant, ConstantParams)
    registry.register("lr_schedule", "cosine", cosine, CosineParams)
    registry.register("lr_schedule", "step", step, StepParams)
