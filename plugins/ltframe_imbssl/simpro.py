"""SimPro (Du, Han & Huang, ICML 2024, "SimPro: A Simple Probabilistic Framework Towards
Realistic Long-Tailed Semi-Supervised Learning"), following the authors' LeapLabTHU/SimPro
SimPro/train.py (`adjustment_u`, `adjustment`, `dis_unlabeled`, the end-of-epoch updates) and
sh/SimPro.sh (the settings).

Two components, used together:

- pseudo_labeler `simpro`: an EM estimate of the unlabeled class prior pi_u (uniform at the start)
  and of the overall prior pi_a (the labeled prior at the start). Each step the soft pseudo-label
  r = softmax(z_weak + la_u) with la_u = log(pi_u^tau + 1e-12), mask = [max r >= threshold]; the
  masked r and the labeled batch's class counts are summed over the epoch. At the first step of
  the next epoch (summed over ranks): pi_u <- m pi_u + (1 - m) S / (sum(S) + 1) with S the sum of
  masked r, pi_a <- m pi_a + (1 - m) normalise(labeled counts + S), m = `ema_u` (0.9). The labeler
  leaves la_a = log(pi_a^tau + 1e-12) in ctx.extras["simpro"] for the loss.
- loss `simpro`: mean over the labeled views of CE(z + la_a, y) / `labeled_divisor` (the code's
  `scale_ratio`, #unlabeled batches / #labeled batches per epoch: 1 in both the authors' and
  USB's protocols, where M_1 / N_1 = mu) + mean over the strong unlabeled views of
  mean_j mask_j soft-CE(z_s + la_a, r_j). The authors give weak and strong labeled views
  (views.labeled = ["weak", "strong"]) and two strong unlabeled views.

Test on raw logits (the main head). State (pi_u, pi_a, the epoch's sums and the open epoch) is
the labeler's, checkpointed. SimPro is not in USB.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ltframe.config import param
from ltframe.engine.context import PseudoLabels, StepContext
from ltframe.errors import LtframeError
from ltframe.registry import Registry
from ltframe_imbssl.prior import (
    EpochSums,
    load_like,
    log_prior,
    normalized,
    require_unlabeled,
    unlabeled_parts,
)

KEY = "simpro"  # ctx.extras key of la_a


@dataclass
class SimProLabelerParams:
    tau: float = param(2.0, ge=0, le=100)  # CIFAR-10 2.0, CIFAR-100 1.0 (sh/SimPro.sh)
    threshold: float = param(0.95, ge=0, le=1)  # CIFAR-10 0.95, CIFAR-100 0.2
    ema_u: float = param(0.9, ge=0, lt=1)  # m of the prior updates
    head: str = "main"


class SimProLabeler:
    """SimPro's soft pseudo-labels and EM prior estimates; see the module docstring."""

    def __init__(self, params: SimProLabelerParams, num_classes: int, class_counts: Tensor,
                 labeled_counts: Tensor | None = None,
                 device: torch.device | str | None = None) -> None:
        self.p = params
        self.num_classes = num_classes
        counts = labeled_counts if labeled_counts is not None else class_counts
        dev = torch.device(device) if device is not None else counts.device
        self.pi_u = torch.full((num_classes,), 1.0 / num_classes, device=dev)
        self.pi_a = normalized(counts).to(dev)
        self.sums = EpochSums((2, num_classes), dev)  # [masked r, labeled counts]

    def preflight(self, info: Any) -> None:
        require_unlabeled(info, "pseudo_labeler 'simpro'")

    def _to(self, device: torch.device) -> None:
        self.pi_u, self.pi_a = self.pi_u.to(device), self.pi_a.to(device)
        self.sums.sums = self.sums.sums.to(device)

    def update(self, sums: Tensor) -> None:
        """The end-of-epoch updates of pi_u and pi_a from the epoch's [S, labeled counts]."""
        m = self.p.ema_u
        s, lab = sums[0], sums[1]
        self.pi_u = self.pi_u * m + s / (s.sum() + 1.0) * (1.0 - m)
        self.pi_a = self.pi_a * m + normalized(lab + s) * (1.0 - m)

    def __call__(self, ctx: StepContext) -> PseudoLabels:
        weak = ctx.logits(unlabeled_parts(ctx, "pseudo_labeler 'simpro'")[0], self.p.head)
        weak = weak.detach().float()
        if weak.device != self.pi_u.device:
            self._to(weak.device)
        closed = self.sums.roll(ctx.epoch)
        if closed is not None:
            self.update(closed)
        r = torch.softmax(weak + log_prior(self.pi_u, self.p.tau), 1)
        mask = (r.max(1).values >= self.p.threshold).float()
        lab = torch.zeros_like(self.pi_u)
        if ctx.targets is not None:
            lab = lab.index_add(0, ctx.targets, torch.ones_like(ctx.targets, dtype=lab.dtype))
        self.sums.add(torch.stack([(r * mask[:, None]).sum(0), lab]))
        ctx.extras[KEY] = log_prior(self.pi_a, self.p.tau)
        return PseudoLabels(r, mask)

    def state_dict(self) -> dict[str, Tensor]:
        return {"pi_u": self.pi_u.clone(), "pi_a": self.pi_a.clone(),
                **{f"sums.{k}": v for k, v in self.sums.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        who = "pseudo_labeler 'simpro'"
        self.pi_u = load_like(state, "pi_u", self.pi_u, who)
        self.pi_a = load_like(state, "pi_a", self.pi_a, who)
        self.sums.sums = load_like(state, "sums.sums", self.sums.sums, who)
        self.sums.epoch = int(state["sums.epoch"])


@dataclass
class SimProLossParams:
    head: str = "main"
    labeled_divisor: float = param(1.0, gt=0, le=1e6)  # the code's scale_ratio
    # labeled parts ([] = every labeled view) and strong unlabeled parts ([] = every unlabeled
    # view after the first)
    labeled: list[str] = field(default_factory=list)
    strong: list[str] = field(default_factory=list)


class SimProLoss:
    """SimPro's logit-adjusted labeled CE and masked soft consistency; see the module docstring."""

    def __init__(self, params: SimProLossParams) -> None:
        self.p = params

    def preflight(self, info: Any) -> None:
        require_unlabeled(info, "loss 'simpro'")
        labeler = info.plan.cfg.pseudo_labeler
        if labeler is None or labeler.name != "simpro":
            raise LtframeError("loss 'simpro' trains on SimPro's pseudo-labels and priors: set "
                               "the stage's pseudo_labeler = \"simpro\"")

    def __call__(self, ctx: StepContext) -> Tensor:
        p = self.p
        la = ctx.extras.get(KEY, 0.0)  # without the labeler (checked before a run): no adjustment
        if ctx.pseudo is None:
            raise LtframeError("loss 'simpro' needs the SimPro pseudo-labels: set the stage's "
                               "pseudo_labeler = \"simpro\"")
        if ctx.targets is None:
            raise LtframeError("loss 'simpro' needs a labeled batch: set the stage's data to "
                               "\"labeled+unlabeled\"")
        names = ctx.logits_by_part
        labeled = p.labeled or [n for n in names if n.startswith("labeled:")] or ["labeled"]
        strong = p.strong or unlabeled_parts(ctx, "loss 'simpro'")[1:]
        if not strong:
            raise LtframeError("loss 'simpro' needs a strong unlabeled view after the weak one; "
                               "set stage.views.unlabeled = [\"weak\", \"strong\", \"strong\"]")
        lx = sum(F.cross_entropy(ctx.logits(n, p.head).float() + la, ctx.targets)
                 for n in labeled) / len(labeled)
        r, mask = ctx.pseudo.targets, ctx.pseudo.mask
        lu = sum((F.cross_entropy(ctx.logits(n, p.head).float() + la, r, reduction="none")
                  * mask).mean() for n in strong) / len(strong)
        return lx / p.labeled_divisor + lu


def register(registry: Registry) -> None:
    registry.register("pseudo_labeler", "simpro", SimProLabeler, SimProLabelerParams)
    registry.register("loss", "simpro", SimProLoss, SimProLossParams)
