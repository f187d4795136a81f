"""Loss `acr`: ACR (Wei & Gan, CVPR 2023, "Towards Realistic Long-Tailed Semi-Supervised
Learning: Consistency Is All You Need"), following the authors' Gank0078/ACR train.py (train():
`Lx_b`, `Lu`, `Lu_b`, the `count_KL` estimate and `adjustment_l1` at each epoch start).

Two heads on one backbone: h1 = `base` (the standard head; its labeled CE is the recipe's `ce`)
and h2 = `head` (the balanced head, the one evaluated: model.eval_head). With pi the labeled
class prior and la(t) = log(pi^t + 1e-12):

    L_acr = CE(h2(x) + la(tau2), y)
          + mean_views mean_j [m1_j] CE(h1(s_j), argmax softmax(h1(w_j) - la(tau)))
          + mean_views mean_j [m2_j] CE(h2(s_j), argmax softmax(h1(w_j) - la(tau12)))

m1 = [max softmax(h1(w) - la(tau)) >= thr OR max softmax(h1(w)) >= thr], m2 = [max softmax(h2(w))
>= thr OR max softmax(h1(w) - la(tau12)) >= thr] (the code's `mask_ss_t`, `mask_ss_b_h2`); the
authors use two strong views (views.unlabeled = ["weak", "strong", "strong"]; the mean over
them is the code's mean over the concatenated views).

Adaptive consistency (the estimated unlabeled distribution u, uniform at the start): in epochs
> `est_epoch` (0-based) every step turns the confident h2 labels (max softmax(h2(w)) >= thr) of
the global batch into a histogram h; when sum(h) > 0, u <- e u + (1 - e) h / sum(h), and the
symmetric KLs D_a = (KL(u || pi_a) + KL(pi_a || u)) / 2 to the anchors consistent (pi), uniform and
reversed (flip(pi)) are summed over the epoch. At each epoch start after `est_epoch`, with D the
sums divided by the previous epoch's steps, tau = tau1 exp(D_con) / sum_a exp(D_a) (kept when it is
NaN). `adaptive = false` keeps tau = tau1 (ACR-dagger of SimPro's sh/ACR_d.sh).

`histogram = "presence"` (default) is the authors' code: `now_mask[targets_u_b] += mask` is an
index assignment, so each class holds the mask of one sample predicted as it (here the last one
in batch order, CPU torch's order; CUDA leaves it undefined) and u estimates class presence;
"counts" accumulates as the paper describes. ACR is not in USB (the CPE fork ports this code).

State: u, the epoch's KL sums and steps, tau, the open epoch; checkpointed. The histogram comes
from the global batch (`dist.gather_batch`), so every rank holds the same state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ltframe.config import param
from ltframe.engine.context import StepContext
from ltframe.engine.dist import gather_batch
from ltframe.errors import LtframeError
from ltframe.registry import Registry
from ltframe_imbssl.prior import (
    anchors,
    load_like,
    log_prior,
    normalized,
    require_unlabeled,
    sym_kl,
    unlabeled_parts,
)


@dataclass
class AcrParams:
    head: str = "aux"  # h2, the balanced head (evaluated)
    base: str = param("main", ref="head")  # h1, the standard head
    threshold: float = param(0.95, ge=0, le=1)
    temperature: float = param(1.0, gt=0)  # T of the pseudo-label softmax (the code's --T 1)
    tau1: float = param(2.0, ge=0, le=100)  # largest tau of h1's consistency (adaptive)
    tau12: float = param(2.0, ge=0, le=100)  # h2's consistency targets
    tau2: float = param(2.0, ge=0, le=100)  # h2's logit-adjusted labeled CE
    ema_u: float = param(0.99, ge=0, lt=1)  # e of u's update (README commands 0.99; argparse 0.9)
    est_epoch: int = param(5, ge=0, le=2**31)  # estimation in epochs > est_epoch
    adaptive: bool = True  # false: tau = tau1 throughout (ACR-dagger)
    histogram: Literal["presence", "counts"] = "presence"  # authors' code | the paper
    # parts trained on the pseudo-labels; [] = every unlabeled view after the first (weak)
    strong: list[str] = field(default_factory=list)


def class_histogram(labels: Tensor, kept: Tensor, num_classes: int, kind: str) -> Tensor:
    """Per class: the number of kept samples ("counts"), or the kept flag of the last sample
    labelled as that class, 0 when none is ("presence", the ACR code's index assignment)."""
    kept = kept.float()
    if kind == "counts":
        return torch.zeros(num_classes, device=labels.device).index_add_(0, labels, kept)
    pos = torch.arange(labels.numel(), device=labels.device)
    last = torch.full((num_classes,), -1, dtype=torch.long, device=labels.device)
    last = last.scatter_reduce(0, labels, pos, reduce="amax", include_self=True)
    return torch.where(last >= 0, kept[last.clamp_min(0)], torch.zeros_like(kept[:1]))


class AcrLoss:
    """ACR's balanced-head and consistency terms with the adaptive tau; see the module docstring."""

    def __init__(self, params: AcrParams, num_classes: int, class_counts: Tensor,
                 labeled_counts: Tensor | None = None,
                 device: torch.device | str | None = None) -> None:
        self.p = params
        self.num_classes = num_classes
        counts = labeled_counts if labeled_counts is not None else class_counts
        dev = torch.device(device) if device is not None else counts.device
        self.prior = normalized(counts).to(dev)
        self.anchors = anchors(self.prior)
        self.u = torch.full((num_classes,), 1.0 / num_classes, device=dev)
        self.kl_sum = torch.zeros(3, device=dev)
        self.kl_steps = 0
        self.tau = torch.tensor(float(params.tau1), device=dev)
        self.epoch = -1

    def preflight(self, info: Any) -> None:
        require_unlabeled(info, "loss 'acr'")

    def _to(self, device: torch.device) -> None:
        for k in ("prior", "anchors", "u", "kl_sum", "tau"):
            setattr(self, k, getattr(self, k).to(device))

    def _epoch_start(self, epoch: int) -> None:
        """tau from the previous epoch's mean KLs (epochs > est_epoch), then a new epoch."""
        if self.p.adaptive and epoch > self.p.est_epoch:
            mean = self.kl_sum / max(self.kl_steps, 1)
            tau = self.p.tau1 * torch.softmax(mean, 0)[0]
            self.tau = torch.where(torch.isnan(tau), self.tau, tau)
        self.kl_sum = torch.zeros_like(self.kl_sum)
        self.kl_steps = 0
        self.epoch = epoch

    def estimate(self, labels: Tensor, kept: Tensor) -> None:
        """One step of u and of the epoch's KL sums from the global batch's confident h2 labels."""
        hist = class_histogram(labels, kept, self.num_classes, self.p.histogram)
        total = hist.sum()
        valid = total > 0
        now = hist / total.clamp_min(1e-30)
        u = torch.where(valid, self.p.ema_u * self.u + (1.0 - self.p.ema_u) * now, self.u)
        self.u = u
        kls = torch.stack([sym_kl(u, a) for a in self.anchors])
        self.kl_sum = self.kl_sum + torch.where(valid, kls, torch.zeros_like(kls))

    def __call__(self, ctx: StepContext) -> Tensor:
        p = self.p
        if ctx.targets is None:
            raise LtframeError("loss 'acr' needs a labeled batch: set the stage's data to "
                               "\"labeled+unlabeled\"")
        parts = unlabeled_parts(ctx, "loss 'acr'")
        strong = p.strong or parts[1:]
        if not strong:
            raise LtframeError("loss 'acr' needs a strong unlabeled view after the weak one; set "
                               "stage.views.unlabeled = [\"weak\", \"strong\", \"strong\"]")
        lab = ctx.logits("labeled", p.head).float()
        if lab.device != self.u.device:
            self._to(lab.device)
        if ctx.epoch != self.epoch:
            self._epoch_start(ctx.epoch)
        self.kl_steps += 1
        loss = F.cross_entropy(lab + log_prior(self.prior, p.tau2), ctx.targets)
        w1 = ctx.logits(parts[0], p.base).detach().float()
        w2 = ctx.logits(parts[0], p.head).detach().float()
        t = p.temperature
        conf1, y1 = torch.softmax((w1 - log_prior(self.prior, self.tau)) / t, 1).max(1)
        conf12, y12 = torch.softmax((w1 - log_prior(self.prior, p.tau12)) / t, 1).max(1)
        conf_b, y_b = torch.softmax(w2 / t, 1).max(1)
        conf_t = torch.softmax(w1 / t, 1).max(1).values
        m1 = ((conf1 >= p.threshold) | (conf_t >= p.threshold)).float()
        m2 = ((conf_b >= p.threshold) | (conf12 >= p.threshold)).float()
        lu1 = lu2 = torch.zeros((), device=lab.device)
        for part in strong:
            lu1 = lu1 + (F.cross_entropy(ctx.logits(part, p.base).float(), y1, reduction="none")
                         * m1).mean()
            lu2 = lu2 + (F.cross_entropy(ctx.logits(part, p.head).float(), y12, reduction="none")
                         * m2).mean()
        if ctx.epoch > p.est_epoch:
            self.estimate(gather_batch(y_b), gather_batch(conf_b >= p.threshold))
        return loss + (lu1 + lu2) / len(strong)

    def state_dict(self) -> dict[str, Tensor]:
        return {"u": self.u.clone(), "kl_sum": self.kl_sum.clone(), "tau": self.tau.clone(),
                "kl_steps": torch.tensor(self.kl_steps, dtype=torch.long),
                "epoch": torch.tensor(self.epoch, dtype=torch.long)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.u = load_like(state, "u", self.u, "loss 'acr'")
        self.kl_sum = load_like(state, "kl_sum", self.kl_sum, "loss 'acr'")
        self.tau = load_like(state, "tau", self.tau, "loss 'acr'")
        self.kl_steps = int(state["kl_steps"])
        self.epoch = int(state["epoch"])


def register(registry: Registry) -> None:
    registry.register("loss", "acr", AcrLoss, AcrParams)
