"""BBN (Zhou et al., CVPR 2020, "BBN: Bilateral-Branch Network with Cumulative Learning for
Long-Tailed Visual Recognition"), from megvii-research/BBN (lib/core/combiner.py bbn_mix,
lib/dataset/imbalance_cifar.py, lib/backbone/resnet_cifar.py, configs/cifar10.yaml).

- backbone `resnet32_two_branch` (ltframe_ltbase.backbones): the shared trunk, then the
  conventional block (branch 1) and the re-balancing block (branch 2); features [f_c ; f_r].
- sampler `bilateral`: each epoch, pairs (uniform instance, re-balanced instance) laid out as
  consecutive positions [u_0, r_0, u_1, r_1, ...]: u is a random permutation of the samples
  (the conventional loader), r draws class k with probability ~ n_max / n_k (`power` 1: BBN's
  "reverse"; 0: "balance") and then a uniform instance of it, one per u (the dataset's
  sample_image). With an even batch size every batch holds whole pairs: even rows uniform, odd
  rows re-balanced; under DDP each rank takes whole pairs.
- loss `bbn`: cumulative learning, alpha = 1 - ((E - 1) / E_max)^2 with E the 1-based stage
  epoch (E_max = the stage's epochs, 90 and 180 rounded up to the next 100 as the code does);
  logits = head([2 alpha f_c(u) ; 2 (1 - alpha) f_r(r)]) with the linear head over the 128
  concatenated features, L = alpha CE(logits, y_u) + (1 - alpha) CE(logits, y_r). The head's
  plain output on [f_c ; f_r] is BBN's test-time logits (alpha = 1/2).
Differences: both images of a pair go through one forward and through both branches (the
reference runs the uniform batch only through branch 1 and the re-balanced one only through
branch 2, in two forwards), so BatchNorm statistics are over the 2B images of a step; the
outputs used by the loss are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ltframe.config import param
from ltframe.data.samplers import SeededSampler
from ltframe.engine.context import StepContext
from ltframe.errors import DataError, LtframeError, RecipeError
from ltframe.registry import Registry
from ltframe_ltbase.branches import branch_features


@dataclass
class BilateralParams:
    power: float = param(1.0, ge=0, le=16)  # branch-2 class weight ~ (n_max / n_k)^power (0: balanced)


class BilateralSampler(SeededSampler):
    """Pairs (uniform, re-balanced) at positions (2i, 2i + 1); a pure function of (seed, epoch)."""

    def __init__(self, params: BilateralParams, labels: Tensor, num_classes: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        super().__init__(labels, num_classes, seed, rank, world_size)
        if (labels < 0).any():
            raise DataError("the bilateral sampler needs labels; it cannot sample unlabeled data")
        counts = torch.bincount(labels, minlength=num_classes).double()
        present = counts > 0
        w = torch.where(present, (counts.max() / counts.clamp_min(1)).pow(params.power), 0.0)
        self.class_probs = w / w.sum()
        self.per_instance = (self.class_probs / counts.clamp_min(1))[labels]
        self.pairs = labels.numel()

    def __len__(self) -> int:
        return 2 * (self.pairs // self.world_size)

    def global_pairs(self, epoch: int) -> Tensor:
        """[N, 2]: (uniform, re-balanced) positions of every pair of the epoch."""
        g = self.generator(epoch)
        uniform = torch.randperm(self.pairs, generator=g)
        second = torch.multinomial(self.per_instance, self.pairs, replacement=True, generator=g)
        return torch.stack([uniform, second], dim=1)

    def global_indices(self, epoch: int) -> Tensor:
        return self.global_pairs(epoch).flatten()

    def epoch_indices(self, epoch: int) -> Tensor:
        pairs = self.global_pairs(epoch)
        n = self.pairs // self.world_size * self.world_size
        return pairs[:n][self.rank::self.world_size].flatten()


@dataclass
class BBNParams:
    head: str = param("main", ref="head")  # a linear head over the two branches' features
    part: str = param("labeled", ref="part")
    epochs: int = param(0, ge=0, le=10**6)  # E_max; 0 = the stage's epochs
    round_up: bool = True  # E_max of 90 or 180 becomes the next hundred (combiner.py)


def cumulative_alpha(epoch: int, total_epochs: int, round_up: bool = True) -> float:
    """alpha = 1 - (epoch / div)^2 (epoch 0-based = the reference's E - 1)."""
    div = 100 * (total_epochs // 100 + 1) if round_up and total_epochs in (90, 180) else total_epochs
    return 1.0 - (epoch / max(div, 1)) ** 2


class BBNLoss:
    """Cumulative learning over the bilateral sampler's pairs (combiner.py bbn_mix)."""

    def __init__(self, params: BBNParams, **_: Any) -> None:
        self.p = params

    def preflight(self, info: Any) -> None:
        name = getattr(info.plan.cfg.sampler, "name", info.plan.cfg.sampler)
        if name != "bilateral":
            raise RecipeError(f"loss bbn needs the stage's sampler = \"bilateral\" (pairs of a "
                              f"uniform and a re-balanced image), not \"{name}\"")

    def alpha(self, ctx: StepContext) -> float:
        total = self.p.epochs
        if total == 0:
            spe = max(ctx.steps_per_epoch, 1)
            total = -(-ctx.total_steps // spe)
        return cumulative_alpha(ctx.epoch, total, self.p.round_up)

    def __call__(self, ctx: StepContext) -> Tensor:
        feats = ctx.features(self.p.part)
        if feats.shape[0] % 2:
            raise LtframeError(f"loss bbn: the batch has {feats.shape[0]} images; the bilateral "
                               "sampler's pairs need an even batch size")
        head = ctx.model.heads[self.p.head]
        a = self.alpha(ctx)
        f_c = branch_features(feats[0::2], 0, 2)
        f_r = branch_features(feats[1::2], 1, 2)
        logits = head(2.0 * torch.cat([a * f_c, (1.0 - a) * f_r], dim=1)).float()
        y = ctx.targets
        return a * F.cross_entropy(logits, y[0::2]) + (1.0 - a) * F.cross_entropy(logits, y[1::2])


def register(registry: Registry) -> None:
    registry.register("sampler", "bilateral", BilateralSampler, BilateralParams)
    registry.register("loss", "bbn", BBNLoss, BBNParams)
