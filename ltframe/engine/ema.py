"""Exponential moving average of model weights (FixMatch-style, used for evaluation)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """ema = decay * ema + (1 - decay) * weights; buffers (BN statistics) are copied."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._pairs = [(e, m) for e, m in zip(self.module.parameters(), model.parameters(),
                                              strict=True)]
        self._buffers = list(zip(self.module.buffers(), model.buffers(), strict=True))

    @torch.no_grad()
    def update(self) -> None:
        ema = [e for e, _ in self._pairs]
        cur = [m.detach() for _, m in self._pairs]
        torch._foreach_lerp_(ema, cur, 1.0 - self.decay)
        for e, m in self._buffers:
            e.copy_(m)
