"""Class priors and unlabeled-distribution estimates shared by the imbalanced semi-supervised
components (shared/ZOO.md part A): logit adjustment terms, the anchor distributions of ACR, the
symmetric KL, per-class sums accumulated over an epoch (summed over ranks when the epoch closes),
and the checks every method makes before the run (unlabeled batches, bounded state).

`EpochSums` is the generic piece behind the estimated unlabeled distribution: a component adds
per-class amounts during an epoch (the step's local batch, summed over ranks at once: a small
all-reduce per step, no host sync, so every rank holds the same sums and a checkpoint written by
rank 0 holds them all), and at the first step of the next epoch `roll()` returns the closed
epoch's sums and starts a new one. SimPro's pi_u / pi_a use it; a component that wants the prior
of its pseudo-labels (e.g. DARP's estimate) can too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ltframe.engine.dist import all_sum
from ltframe.errors import LtframeError

LOG_EPS = 1e-12  # log(pi^tau + 1e-12): the ACR and SimPro code


def log_prior(prior: Tensor, tau: float | Tensor) -> Tensor:
    """tau * log pi as the ACR / SimPro code computes it: log(pi^tau + 1e-12)."""
    return torch.log(prior.pow(tau) + LOG_EPS)


def normalized(counts: Tensor) -> Tensor:
    """counts / sum(counts), float32."""
    c = counts.float()
    return c / c.sum()


def kl(p: Tensor, q: Tensor) -> Tensor:
    """KL(p || q) = sum_c p_c (log p_c - log q_c), with 0 log 0 = 0 (torch's KLDivLoss(
    input=log q, target=p, reduction="sum"))."""
    return (torch.xlogy(p, p) - p * q.clamp_min(1e-30).log()).sum(-1)


def sym_kl(p: Tensor, q: Tensor) -> Tensor:
    """(KL(p || q) + KL(q || p)) / 2."""
    return 0.5 * kl(p, q) + 0.5 * kl(q, p)


def anchors(prior: Tensor) -> Tensor:
    """ACR's anchor distributions [3, C]: consistent (the labeled prior), uniform, reversed
    (the labeled prior flipped along the class index, as the ACR code's torch.flip)."""
    c = prior.numel()
    return torch.stack([prior, torch.full_like(prior, 1.0 / c), torch.flip(prior, dims=[0])])


class EpochSums:
    """Per-class (or any fixed-shape) amounts summed over one epoch, on the state's device.

    `add(x)` during the epoch (this rank's batch; summed over ranks); `roll(epoch)` at every
    step: when `epoch` differs from the open epoch it returns the closed epoch's sums and opens
    the new one, else None. Host-side only the epoch number is compared."""

    def __init__(self, shape: tuple[int, ...], device: torch.device) -> None:
        self.sums = torch.zeros(shape, device=device)
        self.epoch = -1  # none open yet

    def add(self, x: Tensor) -> None:
        self.sums += all_sum(x)

    def roll(self, epoch: int) -> Tensor | None:
        if epoch == self.epoch:
            return None
        closed = None if self.epoch < 0 else self.sums.clone()
        self.sums.zero_()
        self.epoch = epoch
        return closed

    def state_dict(self) -> dict[str, Tensor]:
        return {"sums": self.sums.clone(), "epoch": torch.tensor(self.epoch, dtype=torch.long)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.sums = state["sums"].to(self.sums.device, torch.float32).clone()
        self.epoch = int(state["epoch"])


def require_unlabeled(info: Any, who: str) -> None:
    """Preflight: the stage must feed unlabeled batches."""
    if not any(p == "unlabeled" or p.startswith("unlabeled:") for p in info.parts):
        raise LtframeError(f"{who} needs unlabeled batches but this stage has none (parts: "
                           f"{', '.join(info.parts) or 'none'}); set the stage's data = "
                           "\"labeled+unlabeled\" and a data.split with unlabeled samples")


def unlabeled_parts(ctx: Any, who: str) -> list[str]:
    """The step's unlabeled view parts in view order (weak first), or a one-line error."""
    names = ctx.logits_by_part or ctx.inputs_by_part
    parts = [p for p in names if p.startswith("unlabeled:")]
    if not parts:
        raise LtframeError(f"{who} needs unlabeled batches but this stage has none; set the "
                           "stage's data = \"labeled+unlabeled\" and a data.split with "
                           "unlabeled samples")
    return parts


def load_like(state: dict[str, Tensor], key: str, like: Tensor, who: str) -> Tensor:
    """state[key] on `like`'s device and dtype, shape-checked against `like`."""
    t = state[key]
    if tuple(t.shape) != tuple(like.shape):
        raise LtframeError(f"{who}: the saved '{key}' has shape {tuple(t.shape)} but this recipe "
                           f"needs {tuple(like.shape)}; resume with the recipe the run started")
    return t.to(like.device, like.dtype).clone()
