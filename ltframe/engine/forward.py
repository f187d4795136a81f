"""No-grad forwards used inside a training step (teacher outputs, label guesses)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

_BN = (nn.modules.batchnorm._BatchNorm,)


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with the batch's statistics and their running statistics
    are restored afterwards (USB's bn_controller freeze/unfreeze)."""
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    saved = [(m.training, [b.clone() for b in m.buffers()]) for m in bns]
    for m in bns:
        m.train()
    try:
        yield
    finally:
        for m, (mode, bufs) in zip(bns, saved, strict=True):
            m.training = mode
            for b, v in zip(m.buffers(), bufs, strict=True):
                b.copy_(v)


@torch.no_grad()
def forward_no_grad(model: nn.Module, x: Tensor, batch_stats: bool, autocast: bool
                    ) -> tuple[Tensor, dict[str, Tensor]]:
    """(features, {head: logits}) in float32 without gradients. `batch_stats` normalises with
    the batch's BatchNorm statistics (running statistics untouched); otherwise the model's
    modules keep their modes (an eval-mode teacher uses its running statistics)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        if batch_stats:
            with batch_statistics(model):
                feats, logits = model(x)
        else:
            feats, logits = model(x)
    return feats.float(), {k: v.float() for k, v in logits.items()}
