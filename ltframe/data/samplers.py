"""Index samplers (the `sampler` hook point) and the resumable batch stream built on them.

A sampler returns, for each epoch, the positions (into the labels it was built with) that this
rank visits. Indices are a pure function of (seed, epoch, rank), so a resumed run only needs
the stream's (epoch, position) to continue exactly.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class IndexSampler(Protocol):
    def __len__(self) -> int:
        """Number of indices this rank visits per epoch."""

    def epoch_indices(self, epoch: int) -> Tensor:
        """Positions (int64, CPU) into the sampler's labels for `epoch`, for this rank."""


class SeededSampler:
    """Base class: a per-epoch generator and DDP sharding (every rank gets len // world)."""

    def __init__(self, labels: Tensor, num_classes: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> None:
        self.labels = labels.cpu()
        self.num_classes = num_classes
        self.seed = seed
        self.rank = rank
        self.world_size = world_size

    def generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)

    def global_indices(self, epoch: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __len__(self) -> int:
        return self.labels.numel() // self.world_size

    def epoch_indices(self, epoch: int) -> Tensor:
        idx = self.global_indices(epoch)
        n = len(self) * self.world_size
        return idx[:n][self.rank::self.world_size]


class BatchStream:
    """Batches of dataset indices from a sampler; state = (epoch, position).

    `epoch_aligned=False`: an endless stream, a batch may span two sampler epochs (fixed-size
    batches, as with an iterator that is restarted when exhausted). `epoch_aligned=True`: every
    sampler epoch ends with its own (possibly smaller) last batch, as a DataLoader with
    `drop_last=False` does, so stage epoch e is exactly sampler epoch e; `drop_last=True` skips
    that remainder instead.
    """

    def __init__(self, sampler: IndexSampler, index_map: Tensor, batch_size: int,
                 epoch_aligned: bool = False, drop_last: bool = False) -> None:
        if len(sampler) == 0:
            raise ValueError("the sampler has no samples to draw from")
        self.sampler = sampler
        self.index_map = index_map  # sampler position -> dataset index
        self.batch_size = batch_size
        self.epoch_aligned = epoch_aligned
        self.drop_last = drop_last and len(sampler) >= batch_size
        self.epoch = 0
        self.pos = 0
        self._order: Tensor | None = None

    def batches_per_epoch(self) -> int:
        """Batches in one sampler epoch (epoch-aligned streams)."""
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _current(self) -> Tensor:
        if self._order is None:
            self._order = self.sampler.epoch_indices(self.epoch)
        return self._order

    def _advance(self, order: Tensor) -> None:
        left = order.numel() - self.pos
        if left <= 0 or (self.epoch_aligned and self.drop_last and left < self.batch_size):
            self.epoch += 1
            self.pos = 0
            self._order = None

    def next(self) -> Tensor:
        """The next batch of dataset indices."""
        parts, need = [], self.batch_size
        while need > 0:
            order = self._current()
            take = order[self.pos:self.pos + need]
            parts.append(take)
            need -= take.numel()
            self.pos += take.numel()
            self._advance(order)
            if self.epoch_aligned:
                break
        return self.index_map[torch.cat(parts)]

    def peek(self) -> Tensor:
        """The batch `next()` will return, without moving the stream (for prefetching)."""
        saved = (self.epoch, self.pos, self._order)
        try:
            return self.next()
        finally:
            self.epoch, self.pos, self._order = saved

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self._order = int(state["epoch"]), int(state["pos"]), None
