"""Adsh, adaptive thresholding (Guo & Li, ICML 2022, "Class-Imbalanced Semi-Supervised
Learning with Adaptive Thresholding"; the authors' code as copied in wujianP/ImbalancedSSL
Adsh/train.py update_s and Adsh/algorithms/fixmatch.py ADSH).

Pseudo-labeler `adsh` (used with the `fixmatch` loss). Per-class scores s_c start at tau_1:

- each step, on the weak view: r = p / s, y^ = argmax_c r_c, mask = [max_c r_c >= 1];
- before each epoch from the third on (0-based epoch > 1), over the whole unlabeled pool with
  the training model in eval mode: group the confidences max p by predicted class, sorted
  descending; rho = (number of the head class's confidences >= tau_1) / (its predictions), or
  1 when none reach tau_1 (the authors' loop leaves rho at its initial 1.0); for every class c
  but the head with predictions, s_c = min(tau_1, conf_c[max(0, round(n_c * rho - 1))]) (numpy
  round: half to even); s_head stays tau_1 and classes without predictions keep their score.

"The head" is the class with the most labeled samples (class 0 in the authors' CIFAR code).
The pool pass is the engine's `epoch_pool` seam (ltframe/engine/trainer.py), run after each
epoch on the un-augmented unlabeled split (the authors use the loader's weak views).

`mode = "usb"` follows USB (semilearn/imb_algorithms/adsh/utils.py AdaptiveThresholdingHook):
it stores -log thresholds but initialises them to tau_1, so the first-epoch threshold is
exp(-0.95) = 0.39; y^ = argmax p and mask = [max p >= t_{y^}]; after every epoch, with the
EMA model: rho = i / n_head for the last i with conf >= tau_1 (off by one; 1 when none does),
t_c = conf_c[int(n_c * rho) - 1] for every class including the head (index -1 = the smallest
when rho = 0, so everything passes), no cap at tau_1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ltframe.config import param
from ltframe.engine.context import PoolPredictions, PseudoLabels, StepContext
from ltframe.registry import Registry
from ltframe_imbssl.prior import load_like, require_unlabeled
from ltframe_ssl.common import state_device


@dataclass
class AdshParams:
    tau_1: float = param(0.95, gt=0, le=1)  # initial score of every class, cap, head-class rho cut
    mode: Literal["authors", "usb"] = "authors"
    # the model of the pool pass: auto = the training model (authors) / EMA model (usb)
    pool_model: Literal["auto", "model", "ema"] = "auto"
    # scores first adapt before this 0-based epoch (-1 = the mode's: authors 2, usb 1)
    start_epoch: int = param(-1, ge=-1, le=10**6)
    part: str = param("unlabeled", ref="part")  # the weak view
    head: str = "main"


def authors_scores(probs: Tensor, scores: Tensor, tau_1: float, head_class: int) -> Tensor:
    """The authors' update_s on a pool's softmax [N, C]: new scores [C] (CPU float64)."""
    s = scores.detach().double().cpu().clone()
    conf, pred = probs.double().max(1)
    lists = [torch.sort(conf[pred == c], descending=True).values for c in range(s.numel())]
    head = lists[head_class]
    passed = int((head >= tau_1).sum())  # sorted descending: the leading run the loop walks
    rho = passed / head.numel() if passed else 1.0
    for c, conf_c in enumerate(lists):
        if c == head_class or conf_c.numel() == 0:
            continue
        idx = max(0, int(round(conf_c.numel() * rho - 1)))
        s[c] = min(tau_1, float(conf_c[idx]))
    return s


def usb_thresholds(probs: Tensor, thresholds: Tensor, tau_1: float, head_class: int) -> Tensor:
    """USB's after_train_epoch on a pool's softmax [N, C]: new thresholds exp(-s) [C]."""
    t = thresholds.detach().double().cpu().clone()
    conf, pred = probs.double().max(1)
    lists = [torch.sort(conf[pred == c], descending=True).values for c in range(t.numel())]
    head = lists[head_class]
    passed = int((head >= tau_1).sum())
    rho = (passed - 1) / head.numel() if passed else 1.0  # the loop's last i, i / n
    for c, conf_c in enumerate(lists):
        if conf_c.numel():
            t[c] = float(conf_c[int(conf_c.numel() * rho) - 1])
    return t


class Adsh:
    """Adaptive per-class thresholds for FixMatch pseudo-labels (authors' rule or USB's)."""

    def __init__(self, params: AdshParams, num_classes: int, labeled_counts: Tensor | None = None,
                 class_counts: Tensor | None = None,
                 device: torch.device | str | None = None) -> None:
        self.p = params
        counts = labeled_counts if labeled_counts is not None else class_counts
        self.head_class = int(torch.as_tensor(counts).argmax()) if counts is not None else 0
        dev = state_device(device, counts)
        usb = params.mode == "usb"
        # authors: the scores s (labels from p / s); usb: the thresholds exp(-s) USB compares p to
        first = math.exp(-params.tau_1) if usb else params.tau_1
        self.scores = torch.full((num_classes,), first, dtype=torch.float32, device=dev)
        self.pool_model = params.pool_model if params.pool_model != "auto" else ("ema" if usb else "model")
        self.pool_head = params.head
        self.start = params.start_epoch if params.start_epoch >= 0 else (1 if usb else 2)

    def preflight(self, info: Any) -> None:
        require_unlabeled(info, "pseudo_labeler 'adsh'")

    def __call__(self, ctx: StepContext) -> PseudoLabels:
        logits = ctx.logits(self.p.part, self.p.head).detach().float()
        if self.scores.device != logits.device:
            self.scores = self.scores.to(logits.device)
        probs = torch.softmax(logits, dim=1)
        if self.p.mode == "usb":
            conf, pred = probs.max(1)
            return PseudoLabels(pred, (conf >= self.scores[pred]).float())
        rect, pred = (probs / self.scores).max(1)
        return PseudoLabels(pred, (rect >= 1.0).float())

    def epoch_pool(self, pool: PoolPredictions, epoch: int) -> None:
        """After 0-based epoch `epoch`: adapt the scores for epoch + 1 from the pool."""
        if epoch + 1 < self.start:
            return
        rule = usb_thresholds if self.p.mode == "usb" else authors_scores
        new = rule(pool.probs, self.scores, self.p.tau_1, self.head_class)
        self.scores = new.to(self.scores.device, torch.float32)

    def state_dict(self) -> dict[str, Tensor]:
        return {"scores": self.scores.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.scores = load_like(state, "scores", self.scores, "pseudo_labeler 'adsh'")


def register(registry: Registry) -> None:
    registry.register("pseudo_labeler", "adsh", Adsh, AdshParams)
