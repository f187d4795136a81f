"""MixMatch (Berthelot et al. 2019, "MixMatch: A Holistic Approach to Semi-Supervised
Learning") as USB implements it (semilearn/algorithms/mixmatch/mixmatch.py:46-122,
utils/ops.py mixup_one_target):

- transform `mixmatch`, before the forward: guess the labels of the K unlabeled views
  (`views.unlabeled = ["weak", "weak"]`: K = 2) by averaging the softmax of the model's no-grad
  predictions on each view (BatchNorm with batch statistics, running statistics untouched, as
  USB's freeze_bn), sharpen them (p^(1/T) / sum, T = 0.5), then mix the labeled batch and the K
  unlabeled batches (inputs and targets) with one random permutation of all of them and one
  lam ~ Beta(alpha, alpha), lam = max(lam, 1 - lam) per batch (USB; the CReST code mixes per
  sample). The mixed images replace each part's inputs; the mixed targets go to
  `ctx.extras["mixmatch"] = {part: soft targets}`.
- loss `mixmatch`: soft CE of the mixed labeled logits + lambda_u * ramp * mean-squared error
  between softmax of the mixed unlabeled logits and their mixed targets (mean over classes,
  then over samples), ramp = min(1, step / (warmup * total_steps)).

USB defaults (config/classic_cv/mixmatch/*): alpha 0.5, T 0.5, lambda_u 100 (CIFAR-10, SVHN,
STL-10; 150 for CIFAR-100), warmup 0.4 (the code default is 1/64), mu = 1, EMA 0.999. USB
forwards the mix in batch-size chunks of which only the first updates BatchNorm's running
statistics and does not interleave; here all parts share one forward.

The draws are a pure function of (`seed`, the stage's seed from run.seed and the stage index,
ctx.step), so a resumed stage is bit-identical and runs with other seeds or generations differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ltframe.config import param
from ltframe.engine.context import StepContext
from ltframe.errors import LtframeError
from ltframe.registry import Registry
from ltframe_ssl.common import linear_ramp, normalize, one_hot, soft_cross_entropy, view_parts

KEY = "mixmatch"  # ctx.extras key of the mixed targets


MIXES = ("transform 'mixmatch' mixes labeled and unlabeled batches; use data = "
         "\"labeled+unlabeled\" and views.unlabeled = [\"weak\", \"weak\"] (K = 2 guesses)")

@dataclass
class MixMatchParams:
    alpha: float = param(0.5, gt=0)  # lam ~ Beta(alpha, alpha) (USB mixup_alpha)
    temperature: float = param(0.5, gt=0)  # sharpening of the guessed labels (USB T)
    seed: int = param(0, ge=0)  # combined with the stage's seed (run.seed, stage index) and step
    head: str = "main"  # the head that guesses labels


def sharpen(probs: Tensor, temperature: float) -> Tensor:
    return normalize(probs.pow(1.0 / temperature), dim=1)


def draws(seed: int, step: int, n: int, alpha: float, device: torch.device | str = "cpu"
          ) -> tuple[float, Tensor]:
    """lam = max(lam, 1 - lam), lam ~ Beta(alpha, alpha) (a host number), and a permutation of
    n rows drawn on `device` by a generator of its own: a function of (seed, step) only, with
    no host-device synchronisation."""
    rng = np.random.default_rng([seed, step])
    lam = float(rng.beta(alpha, alpha))
    gen = torch.Generator(device=device).manual_seed(int(rng.integers(2 ** 62)))
    return max(lam, 1.0 - lam), torch.randperm(n, generator=gen, device=device)


class MixMatchTransform:
    """Label guessing, sharpening and one-lam mixup of the labeled and unlabeled views."""

    def __init__(self, params: MixMatchParams, num_classes: int, seed: int = 0) -> None:
        self.p = params
        self.num_classes = num_classes
        self.seed = params.seed * 1_000_003 + seed  # the recipe's seed and the stage's
        self.last_lam: float | None = None

    def preflight(self, info: Any) -> None:
        """Before the run: the stage must have labeled and unlabeled batches."""
        if not {"labeled", "unlabeled"} <= set(info.parts):
            raise LtframeError(MIXES)

    def _parts(self, ctx: StepContext) -> tuple[str, list[str]]:
        labeled = view_parts(ctx, "labeled")
        unlabeled = view_parts(ctx, "unlabeled")
        if not labeled or not unlabeled or ctx.targets is None:
            raise LtframeError(MIXES)
        return labeled[0], unlabeled

    @torch.no_grad()
    def guess(self, ctx: StepContext, parts: list[str]) -> Tensor:
        """Sharpened mean of the softmax predictions over the unlabeled views."""
        probs = [torch.softmax(ctx.predict_no_grad(ctx.inputs(p), self.p.head).float(), dim=1)
                 for p in parts]
        return sharpen(torch.stack(probs).mean(0), self.p.temperature)

    @torch.no_grad()
    def __call__(self, ctx: StepContext) -> None:
        lab, unl = self._parts(ctx)
        y_lab = (ctx.soft_targets.float() if ctx.soft_targets is not None
                 else one_hot(ctx.targets, self.num_classes))
        guess = self.guess(ctx, unl)
        parts = [lab, *unl]
        xs = [ctx.inputs(p) for p in parts]
        x = torch.cat(xs)
        y = torch.cat([y_lab.to(x.device), *[guess.to(x.device)] * len(unl)])
        lam, perm = draws(self.seed, ctx.step, x.shape[0], self.p.alpha, x.device)
        x_mix = lam * x + (1.0 - lam) * x[perm]
        y_mix = lam * y + (1.0 - lam) * y[perm]
        sizes = [t.shape[0] for t in xs]
        targets = {}
        for p, xm, ym in zip(parts, x_mix.split(sizes), y_mix.split(sizes), strict=True):
            ctx.inputs_by_part[p] = xm
            targets[p] = ym
        ctx.extras[KEY] = targets
        self.last_lam = lam


@dataclass
class MixMatchLossParams:
    lambda_u: float = param(100.0, ge=0)  # weight of the unlabeled MSE (USB CIFAR-10: 100)
    warmup: float = param(0.4, ge=0, le=1)  # linear ramp of lambda_u over this fraction (USB 0.4)
    head: str = "main"


class MixMatchLoss:
    """MixMatch's loss on the `mixmatch` transform's mixed batches: soft CE (labeled) +
    lambda_u * ramp * MSE of probabilities (unlabeled); both terms in one (the recipe's loss
    is just `loss = ["mixmatch"]`). Per-sample weights of the labeled set are not used."""

    def __init__(self, params: MixMatchLossParams) -> None:
        self.p = params

    def __call__(self, ctx: StepContext) -> Tensor:
        mixed = ctx.extras.get(KEY)
        if mixed is None:
            raise LtframeError("loss 'mixmatch' needs the mixed targets of the input transform; "
                               "set stage.transform = \"mixmatch\"")
        lab = [p for p in mixed if p.startswith("labeled")]
        unl = [p for p in mixed if p.startswith("unlabeled")]
        sup = torch.cat([soft_cross_entropy(ctx.logits(p, self.p.head), mixed[p]) for p in lab])
        logits_u = torch.cat([ctx.logits(p, self.p.head) for p in unl])
        targets_u = torch.cat([mixed[p] for p in unl])
        mse = (torch.softmax(logits_u, dim=1) - targets_u).pow(2).mean(1).mean()
        ramp = linear_ramp(ctx.step, ctx.total_steps, self.p.warmup)
        return sup.mean() + self.p.lambda_u * ramp * mse


def register(registry: Registry) -> None:
    registry.register("transform", "mixmatch", MixMatchTransform, MixMatchParams)
    registry.register("loss", "mixmatch", MixMatchLoss, MixMatchLossParams)
