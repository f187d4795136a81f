"""Class-rebalanced feature memory of BMB (paper 002 Sec. 4.2 "Balanced Feature Memory Bank";
shared/METHODS.md "BMB", from the first author's code).

A fixed number S of slots holds detached features and hard pseudo-labels (label -1 = empty).
With n_c the number of stored items of class c, clamped to >= 1e-3:

- enqueue: each candidate of class c is admitted with probability p_in(c) = (min_k n_k / n_c)^beta_in;
- dequeue (only when the admitted items overflow S): the overflow is removed without
  replacement, each stored item weighted 1 - p_in(c_i) (counts after admission);
- get: m items are drawn without replacement, item i with probability proportional to
  (1 / N^_{c_i})^beta_get (N^ the estimated unlabeled class distribution: reversed sampling).

Random draws come from a generator on the memory's device (`torch.rand(..., device=)`, never
a host draw copied over). Every operation is a fixed-shape tensor program (no Python loop over
samples or classes, no host synchronisation):
draws without replacement use the Efraimidis-Spirakis keys log(u) / w, whose k largest are a
weighted sample of k without replacement (the distribution of
torch.multinomial(w, k, replacement=False)).
"""

from __future__ import annotations

import torch
from torch import Tensor

MIN_COUNT = 1e-3  # n_c clamp (the reference's)
_TINY = 1e-6  # weight given to zero-weight items: drawn only when nothing else can be


def admission_prob(labels: Tensor, counts: Tensor, beta_in: float) -> Tensor:
    """p_in of each label: (min_k n_k / n_label)^beta_in with n clamped to >= 1e-3."""
    n = counts.float().clamp_min(MIN_COUNT)
    return (n.min() / n[labels.clamp_min(0)]).pow(beta_in)


def draw_keys(weights: Tensor, gen: torch.Generator | None) -> Tensor:
    """Efraimidis-Spirakis keys: the k largest are a weighted sample of k without replacement."""
    u = torch.rand(weights.shape, generator=gen, device=weights.device).clamp_min(1e-12)
    return u.log() / weights.clamp_min(_TINY)


class BalancedMemory:
    """S slots of (feature, pseudo-label); see the module docstring."""

    def __init__(self, size: int, dim: int, num_classes: int, device: torch.device | str = "cpu"
                 ) -> None:
        self.size, self.num_classes = size, num_classes
        self.feats = torch.zeros(size, dim, device=device)
        self.labels = torch.full((size,), -1, dtype=torch.long, device=device)

    def to(self, device: torch.device) -> BalancedMemory:
        """Move the slots (once, e.g. a memory built on another device than its batches)."""
        self.feats, self.labels = self.feats.to(device), self.labels.to(device)
        return self

    def counts(self) -> Tensor:
        """n_c: stored items per class (float, unclamped)."""
        valid = self.labels >= 0
        return torch.zeros(self.num_classes, device=self.labels.device).index_add_(
            0, self.labels.clamp_min(0), valid.float())

    def enqueue(self, feats: Tensor, labels: Tensor, candidate: Tensor, beta_in: float,
                gen: torch.Generator | None = None) -> Tensor:
        """Admit candidates (`candidate` mask) with p_in, then drop the overflow weighted by
        1 - p_in. Returns the admission mask."""
        n = self.counts()
        u = torch.rand(labels.shape, generator=gen, device=labels.device)
        admitted = candidate & (u < admission_prob(labels, n, beta_in))
        all_feats = torch.cat([self.feats, feats.detach().to(self.feats.dtype)])
        all_labels = torch.cat([self.labels, torch.where(admitted, labels, -1)])
        valid = all_labels >= 0
        after = n.index_add(0, labels.clamp_min(0), admitted.float())
        removal = 1.0 - admission_prob(all_labels, after, beta_in)
        # keep the S smallest removal keys; empty slots go first (key +inf)
        key = torch.where(valid, draw_keys(removal, gen), torch.full_like(removal, float("inf")))
        keep = torch.topk(-key, self.size).indices
        self.feats, self.labels = all_feats[keep], all_labels[keep]
        return admitted

    def get(self, m: int, class_est: Tensor, beta_get: float, gen: torch.Generator | None = None
            ) -> tuple[Tensor, Tensor, Tensor]:
        """m items drawn without replacement with probability proportional to
        (1 / N^_c)^beta_get; returns (features, labels, valid mask) — `valid` is False for
        draws past the stored items."""
        est = class_est.float().clamp_min(MIN_COUNT)
        w = est.reciprocal().pow(beta_get)[self.labels.clamp_min(0)]
        valid = self.labels >= 0
        key = torch.where(valid, draw_keys(w, gen), torch.full_like(w, float("-inf")))
        idx = torch.topk(key, min(m, self.size)).indices
        return self.feats[idx], self.labels[idx], valid[idx]

    def state_dict(self) -> dict[str, Tensor]:
        return {"feats": self.feats.clone(), "labels": self.labels.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        dev = self.feats.device
        self.feats = state["feats"].to(dev, torch.float32).clone()
        self.labels = state["labels"].to(dev, torch.long).clone()
