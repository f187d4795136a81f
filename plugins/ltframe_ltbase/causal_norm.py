"""De-confound-TDE (Tang et al., NeurIPS 2020, "Long-Tailed Classification by Keeping the Good
and Removing the Bad Momentum Causal Effect"), from KaihuaTang/Long-Tailed-Recognition.pytorch
classification/models/CausalNormClassifier.py and run_networks.py.

Head `causal_norm` (train with plain `ce`):
- multi-head causal-normalised classifier, no bias: the features and the weight rows are cut
  into K chunks; z = (tau / K) sum_k x^_k . w_k / (||w_k|| + gamma), x^_k = x_k / ||x_k||;
- the moving-average feature direction d <- mu d + mean_batch(x) (no (1 - mu) factor, as the
  reference; only its direction is used), updated by every training forward (train mode, with
  gradients) and kept as the head's buffer `embed`, so it is in checkpoints, the EMA model and
  exports;
- at evaluation (eval mode) with `use_effect`, the counterfactual TDE: per chunk
  z_k = (tau / K) (x^_k - alpha cos(x_k, d_k) d^_k) . w_k / (||w_k|| + gamma). `alpha` needs no
  retraining: the README's rule picks alpha with alpha cos ~ 1 on average.
Defaults are the CIFAR configs' (config/CIFAR*_LT/causal_norm_32.yaml): K = 2, tau = 16,
gamma = 1/32, mu = 0.9, alpha = 1.0 for CIFAR-10 (1.5 for CIFAR-100, 3.0 ImageNet-LT), with the
128-feature two-branch ResNet-32 (`resnet32_two_branch`).
Differences: mu is constant (the reference's non-CIFAR rule mu = 1 - 0.1 min(50 lr, 1) per
epoch is not implemented); a zero feature or direction chunk is left at zero instead of 0/0
(NaN in the reference, e.g. an evaluation before any training step); the mean runs over the
whole training forward of the process (all parts of the stage; under DDP, rank 0's buffer is
broadcast at each forward, so d is rank 0's average).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ltframe.config import param
from ltframe.errors import RecipeError
from ltframe.registry import Registry


@dataclass
class CausalNormParams:
    num_head: int = param(2, ge=1, le=1024)  # K chunks of the features and weights
    tau: float = param(16.0, gt=0, le=1e4)  # logit scale (tau / K per chunk)
    gamma: float = param(1.0 / 32.0, ge=0, le=1e4)  # w / (||w|| + gamma)
    alpha: float = param(1.0, ge=0, le=100)  # TDE strength at evaluation (C10 1.0, C100 1.5)
    mu: float = param(0.9, ge=0, le=1)  # d <- mu d + mean(x)
    use_effect: bool = True  # subtract the counterfactual at evaluation (false: plain logits)


class CausalNormHead(nn.Module):
    """Multi-head normalised classifier with a moving-average feature direction (TDE)."""

    def __init__(self, p: CausalNormParams, in_features: int, num_classes: int) -> None:
        super().__init__()
        if in_features % p.num_head:
            raise RecipeError(f"head causal_norm: num_head = {p.num_head} must divide the "
                              f"{in_features} backbone features; pick a divisor")
        self.p = p
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.register_buffer("embed", torch.zeros(in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.weight.shape[1])
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            self.embed.zero_()

    def _chunks(self, t: Tensor) -> list[Tensor]:
        return list(torch.split(t, t.shape[-1] // self.p.num_head, dim=-1))

    def normed_weight(self) -> Tensor:
        return torch.cat([w / (w.norm(dim=1, keepdim=True) + self.p.gamma)
                          for w in self._chunks(self.weight)], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.embed.mul_(self.p.mu).add_(x.detach().float().mean(0))
        scale = self.p.tau / self.p.num_head
        w = self.normed_weight().to(x.dtype)
        xs = [F.normalize(c, dim=1) for c in self._chunks(x)]
        if self.training or not self.p.use_effect:
            return scale * torch.cat(xs, dim=1) @ w.t()
        cs = [F.normalize(c, dim=0).to(x.dtype) for c in self._chunks(self.embed)]
        out = 0
        for xk, ck, wk in zip(xs, cs, self._chunks(w), strict=True):
            cos = xk @ ck  # x^_k . d^_k: both unit vectors
            out = out + scale * (xk - self.p.alpha * cos[:, None] * ck[None, :]) @ wk.t()
        return out


def register(registry: Registry) -> None:
    registry.register("head", "causal_norm", CausalNormHead, CausalNormParams, aliases=("tde",))
