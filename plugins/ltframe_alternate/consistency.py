"""Loss `consistency`: temporal consistency of paper 000 (Sec. 3, eq. (3)-(4); shared/METHODS.md
"Alternate sampling (paper 000)": "consistency = CE/KL to each sample's softmax from the previous
epoch, stored per sample, reset to uniform at loop start").

For the samples of `part` (default "labeled" = the supervised stream, which in a
"labeled+pseudo" stage holds labeled and pseudo-labelled samples), with p_{e-1}(x) the stored
softmax of sample x from the previous epoch and p_e(x) = softmax(logits of `head`):

    form = "kl": L = mean_x   sum_c p_{e-1}(x)_c (log p_{e-1}(x)_c - log p_e(x)_c)   (default, eq. (3))
    form = "ce": L = mean_x  -sum_c p_{e-1}(x)_c log p_e(x)_c

Memory: `prev` [num_samples, C] (rows = dataset indices, `ctx.indices(part)`) and `next`; both
start uniform when the loss is built (each stage builds its own: in the `alternate` scheduler a
new loss per loop, i.e. reset at the loop's start). Each step writes the current detached softmax
into `next`; when the step's epoch differs from the last one seen (tracked inside `__call__`,
so it also holds across a resume), `next` is copied into `prev` (rows of samples not drawn in
the last epoch keep the value they had before). Everything stays on
the device; no host synchronisation per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ltframe.engine.context import StepContext
from ltframe.engine.dist import gather_batch
from ltframe.registry import Registry


@dataclass
class ConsistencyParams:
    part: str = "labeled"  # the part whose samples are kept consistent
    head: str = "main"  # the head whose softmax is stored and compared
    # KL(p_{e-1} || p_e) as paper 000 eq. (3), or the soft cross-entropy (same gradient; the
    # value differs by the entropy of p_{e-1})
    form: Literal["ce", "kl"] = "kl"


class Consistency:
    """Soft CE (or KL) between each sample's softmax of the previous epoch and the current one."""

    def __init__(self, params: ConsistencyParams, num_classes: int, num_samples: int,
                 class_counts: Tensor | None = None,
                 device: torch.device | str | None = None) -> None:
        self.p = params
        self.num_classes = num_classes
        self.num_samples = num_samples
        # the tables live on the run's device from the start (`device`; without it, that of
        # `class_counts`, which the engine puts there): no copy in any step
        if device is not None:
            dev = torch.device(device)
        else:
            dev = class_counts.device if class_counts is not None else torch.device("cpu")
        uniform = torch.full((num_samples, num_classes), 1.0 / num_classes, device=dev)
        self.prev = uniform
        self.next = uniform.clone()
        self.epoch = -1  # the epoch of the last step seen (-1: none yet)

    def _to(self, device: torch.device) -> None:
        """Fallback for a loss built on another device than its batches: moved once."""
        if self.prev.device != device:
            self.prev, self.next = self.prev.to(device), self.next.to(device)

    def __call__(self, ctx: StepContext) -> Tensor:
        logits = ctx.logits(self.p.part, self.p.head).float()
        idx = ctx.indices(self.p.part)
        self._to(logits.device)
        if ctx.epoch != self.epoch:  # a new epoch: last epoch's softmaxes become the targets
            if self.epoch >= 0:
                self.prev.copy_(self.next)
            self.epoch = ctx.epoch
        target = self.prev[idx]
        log_p = F.log_softmax(logits, dim=1)
        # every rank records the whole global batch (a sample may be on another rank next epoch)
        self.next[gather_batch(idx)] = gather_batch(log_p.detach().exp())
        per = -(target * log_p).sum(1)
        if self.p.form == "kl":
            per = per + (target * target.clamp_min(1e-12).log()).sum(1)
        return per.mean()

    def state_dict(self) -> dict[str, Tensor]:
        return {"prev": self.prev.clone(), "next": self.next.clone(),
                "epoch": torch.tensor(self.epoch, dtype=torch.long)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        device = self.prev.device
        self.prev = state["prev"].to(device=device, dtype=torch.float32).clone()
        self.next = state["next"].to(device=device, dtype=torch.float32).clone()
        self.epoch = int(state["epoch"])


def register(registry: Registry) -> None:
    registry.register("loss", "consistency", Consistency, ConsistencyParams)
