"""Input / label mixup (Zhang et al. 2018) as a generic input transform, in the form MiSLAS's
stage 1 uses it (dvlab-research/MiSLAS methods.py mixup_data / mixup_criterion):

- transform `mixup`: lam ~ Beta(alpha, alpha) (one per step), a random permutation of the
  batch, x <- lam x + (1 - lam) x[perm] for the labeled part; the pair (perm, lam) goes to
  `ctx.extras["mixup"][part]`.
- a loss that understands it (`mixed_loss`: `balanced_softmax`, `mislas`, `weight_balancing`)
  returns lam L(z, y) + (1 - lam) L(z, y[perm]) (mixup_criterion); without the transform it
  is the plain loss.

MiSLAS draws lam as it is; `symmetric = true` takes max(lam, 1 - lam) (USB's mixup). The
draws are a pure function of (`seed`, the stage's seed, the step): lam on the host (numpy, no
device sync), the permutation by a generator on the inputs' device, so a resumed stage is
bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ltframe.config import param
from ltframe.engine.context import StepContext
from ltframe.errors import LtframeError
from ltframe.registry import Registry

KEY = "mixup"  # ctx.extras key: {part: (perm, lam)}


@dataclass
class MixupParams:
    alpha: float = param(1.0, gt=0, le=1000)  # lam ~ Beta(alpha, alpha) (MiSLAS CIFAR: 1.0)
    part: str = param("labeled", ref="part")  # the input batch mixed (its loss must name the same part)
    symmetric: bool = False  # lam = max(lam, 1 - lam) (USB); MiSLAS keeps lam as drawn
    seed: int = param(0, ge=0, lt=2**31)  # combined with the stage's seed and the step


def draw(seed: int, step: int, n: int, alpha: float, symmetric: bool,
         device: torch.device | str = "cpu") -> tuple[float, Tensor]:
    """lam ~ Beta(alpha, alpha) (a host number) and a permutation of n rows on `device`: a
    function of (seed, step) only."""
    rng = np.random.default_rng([seed, step])
    lam = float(rng.beta(alpha, alpha))
    if symmetric:
        lam = max(lam, 1.0 - lam)
    gen = torch.Generator(device=device).manual_seed(int(rng.integers(2**62)))
    return lam, torch.randperm(n, generator=gen, device=device)


class Mixup:
    """Mixes one input part with a permutation of itself; the loss mixes the two targets."""

    def __init__(self, params: MixupParams, seed: int = 0) -> None:
        self.p = params
        self.seed = params.seed * 1_000_003 + seed
        self.last_lam: float | None = None

    def preflight(self, info: Any) -> None:
        if self.p.part not in info.parts:
            raise LtframeError(f"transform 'mixup': the stage has no '{self.p.part}' inputs "
                               f"(parts: {', '.join(info.parts)}); set its part")

    @torch.no_grad()
    def __call__(self, ctx: StepContext) -> None:
        x = ctx.inputs(self.p.part)
        lam, perm = draw(self.seed, ctx.step, x.shape[0], self.p.alpha, self.p.symmetric, x.device)
        ctx.inputs_by_part[self.p.part] = lam * x + (1.0 - lam) * x[perm]
        ctx.extras.setdefault(KEY, {})[self.p.part] = (perm, lam)
        self.last_lam = lam


def mixed_loss(ctx: StepContext, part: str, loss_of: Callable[[Tensor], Tensor]) -> Tensor:
    """`loss_of(targets)`, or lam loss_of(y) + (1 - lam) loss_of(y[perm]) when the `mixup`
    transform mixed `part` in this step (MiSLAS mixup_criterion)."""
    info = ctx.extras.get(KEY, {}).get(part)
    if info is None:
        return loss_of(ctx.targets)
    perm, lam = info
    return lam * loss_of(ctx.targets) + (1.0 - lam) * loss_of(ctx.targets[perm])


def register(registry: Registry) -> None:
    registry.register("transform", "mixup", Mixup, MixupParams)
