"""Exponential moving average of model weights (FixMatch-style, used for evaluation)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def _by_dtype(pairs: list[tuple[Tensor, Tensor]]) -> list[tuple[list[Tensor], list[Tensor]]]:
    """(targets, sources) lists of `pairs`, one per dtype (in order of first appearance).

    CUDA's foreach kernels take their fast route (one launch per chunk of tensors) only when
    every tensor of a call has one dtype; a mixed list falls back to one kernel per tensor."""
    groups: dict[torch.dtype, tuple[list[Tensor], list[Tensor]]] = {}
    for e, m in pairs:
        dst, src = groups.setdefault(e.dtype, ([], []))
        dst.append(e)
        src.append(m)
    return list(groups.values())


class EMA:
    """ema = decay * ema + (1 - decay) * weights; buffers (BN statistics, num_batches_tracked)
    are copied.

    The update is one ``torch._foreach_lerp_`` over the parameters and one
    ``torch._foreach_copy_`` over the buffers per dtype (float statistics, int64 counters): three
    kernel launches for a BatchNorm network, whatever its depth. The tensor lists are built once
    here (the model's Parameter and buffer tensors, updated in place by the optimizer and the
    forward); the results are those of ``e.lerp_(m, 1 - decay)`` and ``e.copy_(m)`` tensor by
    tensor.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._params = _by_dtype(list(zip(self.module.parameters(), model.parameters(),
                                          strict=True)))
        self._bufs = _by_dtype(list(zip(self.module.buffers(), model.buffers(), strict=True)))

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.decay
        for ema, cur in self._params:
            torch._foreach_lerp_(ema, cur, weight)
        for ema, cur in self._bufs:
            torch._foreach_copy_(ema, cur)
