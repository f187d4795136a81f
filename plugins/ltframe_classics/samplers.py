"""Samplers: instance-balanced (random), class-balanced (with optional deferral, DRS),
class-aware (k per class), square-root and progressively balanced.

Kang et al. 2020, "Decoupling Representation and Classifier for Long-Tailed Recognition"
(facebookresearch/classifier-balancing): class-balanced, square-root (q = 1/2) and progressively
balanced sampling, and the ClassAwareSampler (4 images per picked class). DRS (deferred
re-sampling, Cao et al. 2019, kaidic/LDAM-DRW): instance sampling until `start_epoch`, then
class-balanced, either uniform over classes or with the effective-number weights of the
reference code's re-sampler. Epochs here are passes of the sampler (0-based). Every sampler is a
pure function of (seed, epoch, rank): DDP-sharded by the base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ltframe.config import param
from ltframe.data.samplers import SeededSampler
from ltframe.errors import DataError
from ltframe.registry import NoParams, Registry
from ltframe_classics.losses import cb_weights

#: samples per epoch drawn at most (an index tensor of this size is made each epoch)
MAX_SAMPLES = 10**9


class RandomSampler(SeededSampler):
    """A fresh random permutation each epoch (instance-balanced sampling)."""

    def __init__(self, params: NoParams, labels: Tensor, num_classes: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        super().__init__(labels, num_classes, seed, rank, world_size)

    def global_indices(self, epoch: int) -> Tensor:
        return torch.randperm(self.labels.numel(), generator=self.generator(epoch))


class _ClassWeighted(SeededSampler):
    """Draws `num_samples` indices with class probabilities q_c (uniform within a class)."""

    def __init__(self, labels: Tensor, num_classes: int, seed: int, rank: int, world_size: int,
                 num_samples: int) -> None:
        super().__init__(labels, num_classes, seed, rank, world_size)
        if (labels < 0).any():
            raise DataError(f"the {type(self).__name__} needs labels; it cannot sample unlabeled "
                            "data (use 'random' as unlabeled_sampler)")
        self.n = num_samples or labels.numel()
        self.counts = torch.bincount(labels, minlength=num_classes).double()

    def __len__(self) -> int:
        return self.n // self.world_size

    def class_probs(self, epoch: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def global_indices(self, epoch: int) -> Tensor:
        q = self.class_probs(epoch) * (self.counts > 0)
        per_instance = (q / self.counts.clamp_min(1))[self.labels]
        return torch.multinomial(per_instance, self.n, replacement=True,
                                 generator=self.generator(epoch))


@dataclass
class ClassBalancedParams:
    num_samples: int = param(0, ge=0, le=MAX_SAMPLES)  # per epoch; 0 = the number of labeled samples
    start_epoch: int = param(0, ge=0)  # > 0: instance sampling before this epoch (DRS)
    weighting: Literal["uniform", "effective_number"] = "uniform"
    beta: float = param(0.9999, ge=0, lt=1)  # effective_number only


class ClassBalancedSampler(_ClassWeighted):
    """Class-balanced sampling, deferred to `start_epoch` (DRS: instance sampling before).

    weighting = "uniform": every class equally likely, then uniform within the class
    (1/n_c per sample; classifier-balancing's class-balanced sampler).
    weighting = "effective_number": every sample drawn with its class's effective-number weight
    w_c = (1 - beta) / (1 - beta^n_c), so class c has probability ~ n_c * w_c: the
    ImbalancedDatasetSampler that the 'Resample' rule of kaidic/LDAM-DRW (cifar_train.py, utils.py)
    and YyzHarry/imbalanced-semi-self (train.py, utils.py) uses, beta = 0.9999, with replacement,
    len(dataset) draws per epoch. beta = 0 gives instance sampling (the 'DRW' rule's betas
    [0, 0.9999] applied to sampling).
    """

    def __init__(self, params: ClassBalancedParams, labels: Tensor, num_classes: int,
                 seed: int, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(labels, num_classes, seed, rank, world_size, params.num_samples)
        self.start = params.start_epoch
        if params.weighting == "effective_number":
            self.q = self.counts * cb_weights(self.counts, params.beta)  # empty classes: q masked
        else:
            self.q = torch.ones_like(self.counts)

    def class_probs(self, epoch: int) -> Tensor:
        return self.q

    def global_indices(self, epoch: int) -> Tensor:
        if epoch < self.start:
            perm = torch.randperm(self.labels.numel(), generator=self.generator(epoch))
            return perm.repeat(self.n // perm.numel() + 1)[: self.n]
        return super().global_indices(epoch)


@dataclass
class SqrtParams:
    num_samples: int = param(0, ge=0, le=MAX_SAMPLES)
    power: float = param(0.5, ge=-16, le=16)  # q_c ~ n_c^power (0.5: square-root sampling)


class SqrtSampler(_ClassWeighted):
    """Class probability proportional to n_c^q (q = 1/2)."""

    def __init__(self, params: SqrtParams, labels: Tensor, num_classes: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        super().__init__(labels, num_classes, seed, rank, world_size, params.num_samples)
        self.power = params.power

    def class_probs(self, epoch: int) -> Tensor:
        return self.counts.pow(self.power)


@dataclass
class ProgressiveParams:
    epochs: int = param(200, ge=1)  # T: epochs over which sampling moves to class-balanced
    num_samples: int = param(0, ge=0, le=MAX_SAMPLES)


class ProgressiveSampler(_ClassWeighted):
    """p_c(t) = (1 - t/T) * n_c / N + (t/T) / C: instance- to class-balanced over T epochs."""

    def __init__(self, params: ProgressiveParams, labels: Tensor, num_classes: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        super().__init__(labels, num_classes, seed, rank, world_size, params.num_samples)
        self.total = max(params.epochs, 1)

    def class_probs(self, epoch: int) -> Tensor:
        t = min(epoch / self.total, 1.0)
        present = (self.counts > 0).double()
        return (1 - t) * self.counts / self.counts.sum() + t * present / present.sum()


@dataclass
class ClassAwareParams:
    per_class: int = param(4, ge=1, le=MAX_SAMPLES)  # consecutive images of each picked class
    num_samples: int = param(0, ge=0, le=MAX_SAMPLES)


class ClassAwareSampler(SeededSampler):
    """Classes visited in shuffled rounds; `per_class` random images of each visited class."""

    def __init__(self, params: ClassAwareParams, labels: Tensor, num_classes: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        super().__init__(labels, num_classes, seed, rank, world_size)
        if (labels < 0).any():
            raise DataError("the class_aware sampler needs labels (use 'random' for unlabeled)")
        self.k = max(1, params.per_class)
        self.n = params.num_samples or labels.numel()
        counts = torch.bincount(labels, minlength=num_classes)
        self.present = (counts > 0).nonzero().flatten()
        self.by_class = torch.argsort(labels, stable=True)
        self.starts = torch.cumsum(counts, 0) - counts
        self.counts = counts

    def __len__(self) -> int:
        return self.n // self.world_size

    def global_indices(self, epoch: int) -> Tensor:
        g = self.generator(epoch)
        picks = -(-self.n // self.k)
        rounds = -(-picks // len(self.present))
        order = torch.cat([self.present[torch.randperm(len(self.present), generator=g)]
                           for _ in range(rounds)])[:picks]
        cls = order.repeat_interleave(self.k)[: self.n]
        offset = (torch.rand(cls.numel(), generator=g) * self.counts[cls]).long()
        return self.by_class[self.starts[cls] + offset]


def register(registry: Registry) -> None:
    registry.register("sampler", "random", RandomSampler, NoParams, aliases=("instance",))
    registry.register("sampler", "class_balanced", ClassBalancedSampler, ClassBalancedParams)
    registry.register("sampler", "class_aware", ClassAwareSampler, ClassAwareParams)
    registry.register("sampler", "sqrt", SqrtSampler, SqrtParams, aliases=("square_root",))
    registry.register("sampler", "progressive", ProgressiveSampler, ProgressiveParams)
