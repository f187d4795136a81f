"""The run's per-sample target table: the only place training labels come from.

Labeled samples carry their true labels; unlabeled samples carry nothing until a whole-pool
labelling (`stage.label`) selects some of them with a pseudo-label (hard, or a soft target) and a
weight. Soft targets may also be attached to labeled samples (e.g. a teacher's distillation
targets) without touching their labels. The source's labels of unlabeled samples are never read.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ltframe.errors import LtframeError


class TargetTable:
    """labels: int64 [N] (-1 = no target), weight: float [N], soft targets for some rows."""

    def __init__(self, size: int, num_classes: int, labeled: Tensor, labeled_labels: Tensor) -> None:
        self.size, self.num_classes = size, num_classes
        self.labeled = labeled.clone()
        self.labels = torch.full((size,), -1, dtype=torch.long)
        self.labels[labeled] = labeled_labels
        self.weight = torch.ones(size)
        self.pseudo = torch.zeros(0, dtype=torch.long)  # selected unlabeled samples
        self.soft_pos = torch.full((size,), -1, dtype=torch.long)  # row in `soft` or -1
        self.soft = torch.zeros(0, num_classes)
        self.generation = 0  # number of pool labellings applied so far
        self._device_cache: dict[str, tuple] = {}

    # --- what a stage trains on ----------------------------------------------------------
    def index(self, parts: list[str]) -> Tensor:
        """Dataset indices of the samples with a target: `labeled` and/or `pseudo`."""
        chunks = [self.labeled if p == "labeled" else self.pseudo for p in parts]
        return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)

    def on(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """labels, weight, soft_pos and soft on `device` (cached until the table changes)."""
        key = str(device)
        if key not in self._device_cache:
            self._device_cache = {key: tuple(t.to(device) for t in (
                self.labels, self.weight, self.soft_pos, self.soft))}
        return self._device_cache[key]

    def has_soft(self, index: Tensor) -> bool:
        """Some sample of `index` has a soft target (the others then train on one-hot ones)."""
        return bool(index.numel()) and bool((self.soft_pos[index] >= 0).any())

    def unit_weights(self, index: Tensor) -> bool:
        return bool((self.weight[index] == 1).all())

    # --- pool labelling ------------------------------------------------------------------
    def apply(self, index: Tensor, targets: Tensor, weight: Tensor) -> None:
        """Replace the previous selection. Unlabeled samples get `targets` (hard labels, or soft
        targets whose argmax becomes the label); labeled samples keep their true label and only
        take a soft target (and weight) when one is given."""
        index, targets, weight = index.cpu(), targets.cpu(), weight.cpu()
        if index.numel() and (index.min() < 0 or index.max() >= self.size):
            raise LtframeError("a pool labelling returned indices outside the training set")
        is_labeled = torch.zeros(self.size, dtype=torch.bool)
        is_labeled[self.labeled] = True
        self.labels[self.pseudo] = -1
        self.weight.fill_(1.0)
        new_u = ~is_labeled[index]
        soft = targets.dim() == 2
        hard = targets.argmax(1) if soft else targets.long()
        self.labels[index[new_u]] = hard[new_u]
        self.pseudo = index[new_u].clone()
        self.weight[index] = weight.float()
        self.soft_pos.fill_(-1)
        self.soft = torch.zeros(0, self.num_classes)
        if soft:
            self.soft_pos[index] = torch.arange(index.numel())
            self.soft = targets.float().clone()
        self.generation += 1
        self._device_cache = {}

    def class_counts(self, index: Tensor) -> Tensor:
        return torch.bincount(self.labels[index], minlength=self.num_classes)

    # --- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        rows = (self.soft_pos >= 0).nonzero().flatten()
        return {"pseudo": self.pseudo, "pseudo_labels": self.labels[self.pseudo],
                "weight": self.weight, "soft_index": rows, "soft": self.soft[self.soft_pos[rows]],
                "generation": torch.tensor(self.generation)}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.labels[self.pseudo] = -1
        self.pseudo = state["pseudo"].long().clone()
        self.labels[self.pseudo] = state["pseudo_labels"].long()
        self.weight = state["weight"].float().clone()
        self.soft_pos.fill_(-1)
        rows = state["soft_index"].long()
        self.soft_pos[rows] = torch.arange(rows.numel())
        self.soft = state["soft"].float().clone().reshape(rows.numel(), self.num_classes)
        self.generation = int(state["generation"])
        self._device_cache = {}
