"""Optimizers (sgd, adam, adamw) and lr schedules (constant, cosine, step), all with an
optional linear warm-up. A schedule is a pure function step -> lr factor, so resume is exact.

Warm-up over `warmup_epochs`: `warmup_by = "step"` ramps (k + 1) / warm_steps every step;
`warmup_by = "epoch"` holds (e + 1) / warmup_epochs over 0-based epoch e, as
adjust_learning_rate in kaidic/LDAM-DRW cifar_train.py does (lr * epoch / 5, 1-based epochs)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from ltframe.config import param
from ltframe.errors import RecipeError
from ltframe.registry import Registry

WarmupBy = Literal["step", "epoch"]


@dataclass
class SGDParams:
    lr: float = param(0.1, gt=0)
    momentum: float = param(0.9, ge=0)
    nesterov: bool = False
    weight_decay: float = param(5e-4, ge=0)
    # auto: the fused kernel when every parameter is on CUDA, else PyTorch's default (foreach)
    impl: Literal["auto", "foreach", "fused", "loop"] = "auto"


@dataclass
class AdamParams:
    lr: float = param(1e-3, gt=0)
    betas: tuple[float, float] = param((0.9, 0.999), ge=0, lt=1)
    weight_decay: float = param(0.0, ge=0)
    eps: float = param(1e-8, ge=0)
    impl: Literal["auto", "foreach", "fused", "loop"] = "auto"  # as SGDParams.impl


def _impl(impl: str, params: list) -> dict[str, bool]:
    """Optimizer kernel keywords: fused (one kernel for all parameters, CUDA), foreach
    (batched tensor ops) or a per-parameter loop."""
    tensors = [t for g in params for t in (g["params"] if isinstance(g, dict) else [g])]
    if impl == "auto":
        impl = "fused" if tensors and all(t.is_cuda for t in tensors) else "default"
    if impl == "fused" and not all(t.is_cuda for t in tensors):
        raise RecipeError("optim.impl = \"fused\" needs every parameter on CUDA; use \"auto\"")
    return {"fused": {"fused": True}, "foreach": {"foreach": True},
            "loop": {"foreach": False}}.get(impl, {})


def sgd(p: SGDParams, params) -> torch.optim.Optimizer:
    """SGD with (optionally Nesterov) momentum."""
    params = list(params)
    return torch.optim.SGD(params, lr=p.lr, momentum=p.momentum, nesterov=p.nesterov,
                           weight_decay=p.weight_decay, **_impl(p.impl, params))


def adam(p: AdamParams, params) -> torch.optim.Optimizer:
    """Adam (L2 weight decay)."""
    params = list(params)
    return torch.optim.Adam(params, lr=p.lr, betas=p.betas, weight_decay=p.weight_decay,
                            eps=p.eps, **_impl(p.impl, params))


def adamw(p: AdamParams, params) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay)."""
    params = list(params)
    return torch.optim.AdamW(params, lr=p.lr, betas=p.betas, weight_decay=p.weight_decay,
                             eps=p.eps, **_impl(p.impl, params))


def _warmup(epochs: float, steps_per_epoch: int, inner: Callable[[int], float],
            by: WarmupBy = "step") -> Callable[[int], float]:
    warm = int(round(epochs * steps_per_epoch))
    spe = max(steps_per_epoch, 1)

    def factor(step: int) -> float:
        if step < warm:
            if by == "epoch":
                return min(1.0, (step // spe + 1) / epochs)
            return (step + 1) / warm
        return inner(step)

    return factor


@dataclass
class ConstantParams:
    warmup_epochs: float = param(0.0, ge=0)
    warmup_by: WarmupBy = "step"


def constant(p: ConstantParams, steps_per_epoch: int, total_steps: int) -> Callable[[int], float]:
    """Constant lr (after an optional linear warm-up)."""
    return _warmup(p.warmup_epochs, steps_per_epoch, lambda step: 1.0, p.warmup_by)


@dataclass
class CosineParams:
    warmup_epochs: float = param(0.0, ge=0)
    min_factor: float = param(0.0, ge=0, le=1)
    form: Literal["annealing", "truncated"] = "annealing"
    cycles: float = param(7 / 16, ge=0)  # truncated form: factor cos(pi * cycles * k / K)
    warmup_by: WarmupBy = "step"


def cosine(p: CosineParams, steps_per_epoch: int, total_steps: int) -> Callable[[int], float]:
    """Cosine decay over the stage: annealing 0.5(1 + cos(pi k/K)), or truncated
    cos(pi * cycles * k / K) (cycles 7/16 is FixMatch's, Sohn et al. 2020, google-research/fixmatch)."""
    total = max(total_steps, 1)

    def inner(step: int) -> float:
        t = step / total
        if p.form == "truncated":
            return max(p.min_factor, math.cos(math.pi * p.cycles * t))
        return p.min_factor + (1 - p.min_factor) * 0.5 * (1 + math.cos(math.pi * t))

    return _warmup(p.warmup_epochs, steps_per_epoch, inner, p.warmup_by)


@dataclass
class StepParams:
    milestones: list[float] = param(factory=lambda: [160.0, 180.0], ge=0)  # 0-based epochs
    gamma: float = param(0.01, gt=0)  # factor applied at each milestone
    warmup_epochs: float = param(0.0, ge=0)
    warmup_by: WarmupBy = "step"


def step(p: StepParams, steps_per_epoch: int, total_steps: int) -> Callable[[int], float]:
    """Multiply the lr by `gamma` at each milestone epoch. The defaults are LDAM-DRW's
    (Cao et al. 2019; kaidic/LDAM-DRW cifar_train.py adjust_learning_rate): x0.01 from 0-based
    epoch 160, x0.0001 from 180; add warmup_epochs = 5, warmup_by = "epoch" for its warm-up."""
    bounds = sorted(int(round(m * steps_per_epoch)) for m in p.milestones)
    return _warmup(p.warmup_epochs, steps_per_epoch,
                   lambda s: p.gamma ** bisect.bisect_right(bounds, s), p.warmup_by)


def register(registry: Registry) -> None:
    registry.register("optimizer", "sgd", sgd, SGDParams)
    registry.register("optimizer", "adam", adam, AdamParams)
    registry.register("optimizer", "adamw", adamw, AdamParams)
    registry.register("lr_schedule", "constant", constant, ConstantParams)
    registry.register("lr_schedule", "cosine", cosine, CosineParams)
    registry.register("lr_schedule", "step", step, StepParams)
