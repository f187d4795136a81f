"""TRAS, "Transfer and Share" (Wei, Liu, Shi, Tu & Guo, arXiv 2205.13358, 2022, "Transfer and
Share: Semi-Supervised Learning from Long-Tailed Data"), following the authors' Stomach-ache/TRAS
train.py (train(): the pseudo-labels `targets_u2`, `loss_x_S`, `la_u`, `loss_u_S`; main():
`compute_adjustment`, `T_logit`; `balanced_softmax_loss`, `KL`).

Two heads on one backbone, two components used together:

- pseudo_labeler `tras`: the base head's (`head`, "main") FixMatch pseudo-labels, post-hoc
  logit-adjusted: p = softmax(z_weak - la), label argmax p, mask [max p >= threshold], with
  la = log(pi^tau + 1e-12) and pi the labeled class proportions (`compute_adjustment`, tau =
  the code's --tro_train 1). The recipe's `ce` and `fixmatch` on the base head are the code's
  Lx and Lu. The labeler leaves la in ctx.extras["tras"] for the loss.
- loss `tras` (the TRAS head `head`, "aux", the one evaluated: model.eval_head), active in
  0-based epochs >= `start_epoch` (the code's `epoch > 10`: 11, as the recipes set it; the
  default 0 starts at once):

      L = CE(z'(x) + la, y)
        + mean_views mean_j m_j (-sum_c q_jc log softmax(z'(s_j))_c)
      q_j = softmax((z_base(s_j) - T_{yhat_j} la) / temperature)       (no gradient)
      T_c = A softmax(-la)_c + B,  A = B = 2 (`a`, `b`), temperature 2 (the code's KL(., ., T=1): / (T * 2))

  with yhat_j = argmax softmax(z'(w_j)) and m_j = [its max >= threshold] from the TRAS head's weak
  view. The authors use two strong views (views.unlabeled = ["weak", "strong", "strong"]); the
  mean over them is the code's mean over the concatenated views. Before `start_epoch` the term is
  0 * sum(z'(x)): the TRAS head stays in the graph (so DDP without find_unused_parameters works)
  and gets a zero gradient, as the code's TRAS head gets none.

USB (semilearn/imb_algorithms/tras/tras.py) builds la = log((n_min / n_c)^tau + 1e-12), which is
-log pi plus a constant, so every sign flips (pseudo-labels lean to the head classes, the labeled
term becomes CE(z' - log pi, y), T grows with the head): `la = "usb"` on the labeler. USB's
target is the TRAS head's own weak logits (softmax((z'(w) - T la) / 2)): `target = "self"` on the
loss; its warm-up is `epoch < tras_warmup_epochs` (1 in its config generator): `start_epoch = 1`;
it uses one strong view. USB ships no TRAS configs or results.

Differences: the code evaluates the base head in epochs <= 10 and the TRAS head afterwards; the
engine evaluates one head per stage (model.eval_head = "aux" throughout). `compute_adjustment`
counts labels over the labeled loader with drop_last=True (a few samples fewer); here the labeled
split's counts. No state beyond the model (la and T are functions of the labeled counts).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ltframe.config import param
from ltframe.engine.context import PseudoLabels, StepContext
from ltframe.errors import LtframeError
from ltframe.registry import Registry
from ltframe_imbssl.prior import LOG_EPS, log_prior, normalized, require_unlabeled, unlabeled_parts
from ltframe_ssl.common import state_device

KEY = "tras"  # ctx.extras key of la


def adjustment(counts: Tensor, tau: float, sign: str = "authors") -> Tensor:
    """la [C], float32: log(pi^tau + 1e-12) with pi the proportions (authors' compute_adjustment),
    or USB's log((n_min / n_c)^tau + 1e-12) (counts clamped to >= 1)."""
    if sign == "usb":
        n = counts.float().clamp_min(1.0)
        return torch.log((n.min() / n).pow(tau) + LOG_EPS)
    return log_prior(normalized(counts), tau)


def transfer_scale(la: Tensor, a: float, b: float) -> Tensor:
    """T_c = A softmax(-la)_c + B (the code's T_logit)."""
    return a * torch.softmax(-la, 0) + b


@dataclass
class TrasLabelerParams:
    tau: float = param(1.0, ge=0, le=100)  # la = log(pi^tau + 1e-12) (the code's --tro_train)
    threshold: float = param(0.95, ge=0, le=1)  # mask: max softmax(z_weak - la) >= threshold
    la: Literal["authors", "usb"] = "authors"  # USB's flipped sign: log((n_min / n_c)^tau)
    head: str = "main"  # the base head (its first unlabeled view, the weak one, is labelled)


class TrasLabeler:
    """TRAS's base-head pseudo-labels, softmax(z_weak - la); see the module docstring."""

    def __init__(self, params: TrasLabelerParams, num_classes: int, class_counts: Tensor,
                 labeled_counts: Tensor | None = None,
                 device: torch.device | str | None = None) -> None:
        self.p = params
        counts = labeled_counts if labeled_counts is not None else class_counts
        if counts.numel() != num_classes:
            raise LtframeError(f"pseudo_labeler 'tras' needs {num_classes} labeled class counts, "
                               f"got {counts.numel()}")
        self.la = adjustment(counts.detach().cpu(), params.tau, params.la).to(
            state_device(device, counts))

    def preflight(self, info: Any) -> None:
        require_unlabeled(info, "pseudo_labeler 'tras'")

    def __call__(self, ctx: StepContext) -> PseudoLabels:
        weak = ctx.logits(unlabeled_parts(ctx, "pseudo_labeler 'tras'")[0], self.p.head)
        weak = weak.detach().float()
        if weak.device != self.la.device:  # built on another device than the batches
            self.la = self.la.to(weak.device)
        conf, pred = torch.softmax(weak - self.la, 1).max(1)
        ctx.extras[KEY] = self.la
        return PseudoLabels(pred, (conf >= self.p.threshold).float())


@dataclass
class TrasLossParams:
    head: str = "aux"  # the TRAS head (evaluated: model.eval_head = "aux")
    base: str = param("main", ref="head")  # the base head whose strong logits give the targets
    a: float = param(2.0, ge=0, le=100)  # A of T_c = A softmax(-la)_c + B (the code's --A)
    b: float = param(2.0, ge=0, le=100)  # B (the code's --B)
    threshold: float = param(0.95, ge=0, le=1)  # mask: max softmax(z'_weak) >= threshold
    temperature: float = param(2.0, gt=0, le=100)  # target softmax((. - T la) / temperature)
    # active in 0-based epochs >= this; the code's `epoch > 10` is 11 (the recipes), USB's 1
    start_epoch: int = param(0, ge=0, le=2**31)
    target: Literal["base", "self"] = "base"  # base head's strong logits | USB: TRAS head's weak
    # parts trained towards the targets; [] = every unlabeled view after the first (the weak one)
    strong: list[str] = field(default_factory=list)


class TrasLoss:
    """TRAS's balanced-softmax and transfer terms on the TRAS head; see the module docstring."""

    def __init__(self, params: TrasLossParams) -> None:
        self.p = params
        if params.head == params.base:
            raise LtframeError(f"loss 'tras': head and base are both '{params.head}'; TRAS trains a "
                               "second head: add e.g. aux = { name = \"linear\" } under "
                               "[model.heads] and set head = \"aux\"")

    def preflight(self, info: Any) -> None:
        require_unlabeled(info, "loss 'tras'")
        labeler = info.plan.cfg.pseudo_labeler
        if labeler is None or labeler.name != "tras":
            raise LtframeError("loss 'tras' uses the logit adjustment of TRAS's pseudo-labeler: "
                               "set the stage's pseudo_labeler = \"tras\"")

    def targets(self, ctx: StepContext, la: Tensor, part: str, weak: Tensor, yhat: Tensor
                ) -> Tensor:
        """q = softmax((z_src - T_yhat la) / temperature) of one strong view (detached)."""
        src = weak if self.p.target == "self" else ctx.logits(part, self.p.base).detach().float()
        scale = transfer_scale(la, self.p.a, self.p.b)[yhat]
        return torch.softmax((src - scale[:, None] * la[None, :]) / self.p.temperature, 1)

    def __call__(self, ctx: StepContext) -> Tensor:
        p = self.p
        if ctx.targets is None:
            raise LtframeError("loss 'tras' needs a labeled batch: set the stage's data to "
                               "\"labeled+unlabeled\"")
        parts = unlabeled_parts(ctx, "loss 'tras'")
        strong = p.strong or parts[1:]
        if not strong:
            raise LtframeError("loss 'tras' needs a strong unlabeled view after the weak one; set "
                               "stage.views.unlabeled = [\"weak\", \"strong\"] (the authors: "
                               "[\"weak\", \"strong\", \"strong\"])")
        lab = ctx.logits("labeled", p.head).float()
        if ctx.epoch < p.start_epoch:  # warm-up: the head in the graph with a zero gradient
            return lab.sum() * 0.0
        la = ctx.extras.get(KEY)
        if la is None:  # no labeler (refused before a run; hand-made contexts): no adjustment
            la = torch.zeros(lab.shape[1], device=lab.device)
        loss = F.cross_entropy(lab + la, ctx.targets)
        weak = ctx.logits(parts[0], p.head).detach().float()
        conf, yhat = torch.softmax(weak, 1).max(1)
        mask = (conf >= p.threshold).float()
        lu = torch.zeros((), device=lab.device)
        for part in strong:
            q = self.targets(ctx, la, part, weak, yhat)
            logp = F.log_softmax(ctx.logits(part, p.head).float(), 1)
            lu = lu + (mask * -(q * logp).sum(1)).mean()
        return loss + lu / len(strong)


def register(registry: Registry) -> None:
    registry.register("pseudo_labeler", "tras", TrasLabeler, TrasLabelerParams)
    registry.register("loss", "tras", TrasLoss, TrasLossParams)
