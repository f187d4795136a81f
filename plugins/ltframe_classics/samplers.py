"""Samplers: instance-balanced (random) and class-balanced.

Class-balanced sampling follows Kang et al., "Decoupling Representation and Classifier for
Long-Tailed Recognition" (ICLR 2020; facebookresearch/classifier-balancing): pick a class
uniformly, then an instance of it uniformly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ltframe.data.samplers import SeededSampler
from ltframe.errors import DataError
from ltframe.registry import NoParams, Registry


class RandomSampler(SeededSampler):
    """A fresh random permutation each epoch (instance-balanced sampling)."""

    def __init__(self, params: NoParams, labels: Tensor, num_classes: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        super().__init__(labels, num_classes, seed, rank, world_size)

    def global_indices(self, epoch: int) -> Tensor:
        return torch.randperm(self.labels.numel(), generator=self.generator(epoch))


@dataclass
class ClassBalancedParams:
    num_samples: int = 0  # per epoch; 0 = the number of labeled samples


class ClassBalancedSampler(SeededSampler):
    """Uniform over classes, then uniform within the class (with replacement)."""

    def __init__(self, params: ClassBalancedParams, labels: Tensor, num_classes: int,
                 seed: int, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(labels, num_classes, seed, rank, world_size)
        if (labels < 0).any():
            raise DataError("the class_balanced sampler needs labels; it cannot sample "
                            "unlabeled data (use 'random' as unlabeled_sampler)")
        self.n = params.num_samples or labels.numel()
        counts = torch.bincount(labels, minlength=num_classes)
        self.present = (counts > 0).nonzero().flatten()
        order = torch.argsort(labels, stable=True)
        self.by_class = order
        self.starts = torch.cumsum(counts, 0) - counts
        self.counts = counts

    def __len__(self) -> int:
        return self.n // self.world_size

    def global_indices(self, epoch: int) -> Tensor:
        g = self.generator(epoch)
        cls = self.present[torch.randint(len(self.present), (self.n,), generator=g)]
        offset = (torch.rand(self.n, generator=g) * self.counts[cls]).long()
        return self.by_class[self.starts[cls] + offset]


def register(registry: Registry) -> None:
    registry.register("sampler", "random", RandomSampler, NoParams, aliases=("instance",))
    registry.register("sampler", "class_balanced", ClassBalancedSampler, ClassBalancedParams)
