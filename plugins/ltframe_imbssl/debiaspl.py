"""DebiasPL (Wang et al., CVPR 2022, "Debiased Learning from Naturally Imbalanced
Pseudo-Labels"; frank-xwang/debiased-pseudo-labeling main_DebiasPL.py causal_inference,
update_qhat and the adaptive marginal loss in train()).

q^ (the model's running class marginal on the weak view) starts uniform. Each step:

1. pseudo-labels from the debiased probabilities softmax(z_w - tau * log q^) with the q^ of
   the last step: y^ = argmax, mask = [max >= threshold];
2. q^ <- m * q^ + (1 - m) * mean_batch softmax(z_w) (the plain, not debiased, probabilities);
3. the adaptive marginal loss mean_i mask_i * CE(z_s,i + tau * log q^, y^_i), with the q^ just
   updated (the authors' code updates q^ before it builds delta_logits).

Two components: pseudo-labeler `debiaspl` (steps 1-2; it holds q^ and passes tau * log q^ to
the loss through ctx.extras["debiaspl"]) and loss `debiaspl` (step 3). Under torchrun the
batch mean is the global batch's, so every rank keeps the same q^ (the authors' DDP code keeps
one q^ per process).

Defaults: tau 0.4 and threshold 0.8 are the authors' ImageNet scripts (argparse: 1.0 and 0.7),
m 0.999. USB (semilearn/imb_algorithms/debiaspl/debiaspl.py compute_prob) updates q^ with
`probs.mean()`, a scalar equal to 1/C, so its q^ stays uniform and both adjustments are constant
shifts: USB's DebiasPL is FixMatch. `qhat = "usb"` reproduces that update (GitHub's code,
1ef4cbe). The PyPI wheel semilearn 0.3.2 differs: it has `probs.mean(dim=0)` (q^ moves per
class, as `qhat = "batch_mean"`) but labels and masks with the updated q^ and the loss margin
with the previous one, the reverse of the authors' order; no setting reproduces that wheel
(tests/test_usb_peer.py pins both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ltframe.config import param
from ltframe.engine.context import PseudoLabels, StepContext
from ltframe.engine.dist import all_sum, world_size
from ltframe.errors import LtframeError
from ltframe.registry import Registry
from ltframe_imbssl.prior import load_like, require_unlabeled
from ltframe_ssl.common import masked_unlabeled_ce, require_pseudo, state_device

KEY = "debiaspl"  # ctx.extras key: tau * log q^ after this step's update


@dataclass
class DebiasPLParams:
    threshold: float = param(0.8, ge=0, le=1)  # mask = [max debiased p >= threshold]
    tau: float = param(0.4, ge=0, le=10)  # debiasing strength (authors' scripts 0.4)
    momentum: float = param(0.999, ge=0, lt=1)  # q^ <- m q^ + (1 - m) batch mean
    # batch_mean: the authors' update; usb: USB's `probs.mean()` (a scalar: q^ stays uniform)
    qhat: Literal["batch_mean", "usb"] = "batch_mean"
    part: str = param("unlabeled", ref="part")  # the weak view
    head: str = "main"


class DebiasPLLabeler:
    """Debiased pseudo-labels softmax(z_w - tau log q^) and the running marginal q^."""

    def __init__(self, params: DebiasPLParams, num_classes: int, class_counts: Tensor | None = None,
                 device: torch.device | str | None = None) -> None:
        self.p = params
        self.num_classes = num_classes
        self.qhat = torch.full((num_classes,), 1.0 / num_classes,
                               device=state_device(device, class_counts))

    def preflight(self, info: Any) -> None:
        require_unlabeled(info, "pseudo_labeler 'debiaspl'")

    def __call__(self, ctx: StepContext) -> PseudoLabels:
        logits = ctx.logits(self.p.part, self.p.head).detach().float()
        if self.qhat.device != logits.device:  # built on another device: moved once
            self.qhat = self.qhat.to(logits.device)
        debiased = torch.softmax(logits - self.p.tau * self.qhat.log(), dim=1)
        conf, pred = debiased.max(1)
        mask = (conf >= self.p.threshold).float()
        probs = torch.softmax(logits, dim=1)
        n = probs.shape[0] * world_size()
        if self.p.qhat == "usb":  # probs.mean() over the whole [B, C] batch: 1/C
            mean: Tensor = all_sum(probs.sum()) / (n * self.num_classes)
        else:
            mean = all_sum(probs.sum(0)) / n
        self.qhat = self.p.momentum * self.qhat + (1.0 - self.p.momentum) * mean
        ctx.extras[KEY] = self.p.tau * self.qhat.log()
        return PseudoLabels(pred, mask)

    def state_dict(self) -> dict[str, Tensor]:
        return {"qhat": self.qhat.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.qhat = load_like(state, "qhat", self.qhat, "pseudo_labeler 'debiaspl'")


@dataclass
class DebiasPLLossParams:
    part: str = param("unlabeled:strong", ref="part")  # the view trained towards the labels
    head: str = "main"


class DebiasPLLoss:
    """The adaptive marginal loss: mean of mask * CE(z_s + tau log q^, y^)."""

    def __init__(self, params: DebiasPLLossParams) -> None:
        self.p = params

    def __call__(self, ctx: StepContext) -> Tensor:
        logits = ctx.logits(self.p.part, self.p.head)
        margin = ctx.extras.get(KEY)
        if margin is None:
            raise LtframeError("loss 'debiaspl' needs pseudo_labeler = \"debiaspl\" in the same "
                               "stage (it gives the adaptive margin tau * log q^)")
        pseudo = require_pseudo(ctx, "debiaspl", logits.shape[0])
        return masked_unlabeled_ce(logits.float() + margin, pseudo)


def register(registry: Registry) -> None:
    registry.register("pseudo_labeler", "debiaspl", DebiasPLLabeler, DebiasPLParams)
    registry.register("loss", "debiaspl", DebiasPLLoss, DebiasPLLossParams)
