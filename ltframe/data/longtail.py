"""Long-tail profiles (per-class counts, head class first) and labeled/unlabeled/val splits.

Protocols follow shared/METHODS.md: CIFAR-LT (Cao et al., LDAM-DRW), CReST's labeled fraction,
DARP/USB's separate labeled/unlabeled heads and ratios, and the "unlabeled = k x labeled"
protocol of papers 000/001. Every split is a deterministic function of (data, options, seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ltframe.config import param
from ltframe.errors import DataError


@dataclass
class ProfileCfg:
    """Long-tail profile of the labeled training set."""

    name: Literal["none", "exp", "step", "pareto"] = "none"
    ratio: float = param(100.0, ge=1)  # imbalance ratio N_max / N_min (exp, step)
    n_max: int = param(0, ge=0)  # head count; 0 = the largest class count available
    n_min: int = param(1, ge=1)  # pareto: smallest count; every profile keeps >= 1
    head_fraction: float = param(0.5, gt=0, le=1)  # step: fraction of classes that are head classes
    shape: float = param(6.0, gt=0)  # pareto/lomax shape (alpha)
    reverse: bool = False  # tail first (e.g. for the unlabeled set)


@dataclass
class SplitCfg:
    """How the long-tailed set is divided into labeled and unlabeled parts."""

    name: Literal["supervised", "fraction", "counts", "multiple"] = "supervised"
    labeled_fraction: float = param(0.1, gt=0, le=1)  # fraction: labeled = ceil(beta * N_c), rest unlabeled
    labeled_head: int = param(1500, ge=1)  # counts: N_1
    labeled_ratio: float = param(100.0, ge=1)  # counts: gamma_l
    unlabeled_head: int = param(3000, ge=0)  # counts: M_1
    unlabeled_ratio: float = 100.0  # counts/multiple: gamma_u (negative = reversed order)
    multiple: float = param(5.0, gt=0)  # multiple: unlabeled total = k x labeled total


@dataclass
class Splits:
    """Indices into the source's train set (and val set, if separate)."""

    labeled: Tensor
    unlabeled: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    val: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))


def profile_counts(cfg: ProfileCfg, num_classes: int, available: int, seed: int = 0) -> list[int]:
    """Per-class counts, head class first; never above `available` unless n_max says so."""
    c = num_classes
    n_max = cfg.n_max or available
    if cfg.name == "none":
        counts = [n_max] * c
    elif cfg.name == "exp":
        counts = [int(n_max * cfg.ratio ** (-i / max(c - 1, 1))) for i in range(c)]
    elif cfg.name == "step":
        n_head = max(1, round(c * cfg.head_fraction))
        counts = [n_max if i < n_head else int(n_max / cfg.ratio) for i in range(c)]
    elif cfg.name == "pareto":
        g = torch.Generator().manual_seed(seed)
        u = torch.rand(c, generator=g)
        draws = (1 - u).pow(-1 / cfg.shape) - 1  # Lomax(shape, scale=1)
        draws = (draws / draws.max()).sort(descending=True).values
        counts = [int(round(cfg.n_min + (n_max - cfg.n_min) * float(d))) for d in draws]
    else:  # pragma: no cover - guarded by Literal
        raise DataError(f"unknown long-tail profile {cfg.name}")
    counts = [max(cfg.n_min if cfg.name == "pareto" else 1, n) for n in counts]
    return counts[::-1] if cfg.reverse else counts


def _signed_profile(head: int, ratio: float, num_classes: int) -> list[int]:
    cfg = ProfileCfg(name="exp", ratio=abs(ratio), n_max=head, reverse=ratio < 0)
    return profile_counts(cfg, num_classes, head)


def make_splits(
    labels: Tensor,
    num_classes: int,
    profile: ProfileCfg,
    split: SplitCfg,
    val_per_class: int,
    seed: int,
    strict: bool = True,
) -> Splits:
    """Draw the long-tailed labeled/unlabeled split (and a balanced val split) from `labels`.

    Each class's images are shuffled with `seed`; the val split (if asked) takes the first
    `val_per_class` of each class, then labeled, then unlabeled images follow in that order,
    so the three sets never overlap. With `strict=False` counts are clamped to what exists.
    """
    g = torch.Generator().manual_seed(seed)
    pools = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        pools.append(idx[torch.randperm(idx.numel(), generator=g)])
    available = [p.numel() - val_per_class for p in pools]
    if min(available) < 1:
        raise DataError(
            f"a class has {min(p.numel() for p in pools)} images, too few for val_per_class="
            f"{val_per_class}; lower data.val_per_class"
        )

    if split.name == "counts":
        lab = _signed_profile(split.labeled_head, split.labeled_ratio, num_classes)
        unl = _signed_profile(split.unlabeled_head, split.unlabeled_ratio, num_classes)
    else:
        total = profile_counts(profile, num_classes, min(available), seed)
        if split.name == "supervised":
            lab, unl = total, [0] * num_classes
        elif split.name == "fraction":
            lab = [max(1, math.ceil(split.labeled_fraction * n)) for n in total]
            unl = [n - m for n, m in zip(total, lab, strict=True)]
        else:  # multiple
            lab = total
            shape = _signed_profile(10**6, split.unlabeled_ratio, num_classes)
            scale = split.multiple * sum(lab) / sum(shape)
            unl = [int(round(s * scale)) for s in shape]
    need = [a + b for a, b in zip(lab, unl, strict=True)]
    short = [c for c in range(num_classes) if need[c] > available[c]]
    if short and strict:
        c = short[0]
        raise DataError(
            f"class {c} needs {need[c]} images ({lab[c]} labeled + {unl[c]} unlabeled) but has "
            f"{available[c]}; lower the profile's n_max or the split's heads, or use a bigger source"
        )
    labeled, unlabeled, val = [], [], []
    for c, pool in enumerate(pools):
        val.append(pool[:val_per_class])
        rest = pool[val_per_class:]
        n_l = min(lab[c], rest.numel())
        labeled.append(rest[:n_l])
        unlabeled.append(rest[n_l:n_l + unl[c]])
    return Splits(torch.cat(labeled), torch.cat(unlabeled), torch.cat(val))


def class_counts(labels: Tensor, num_classes: int) -> Tensor:
    return torch.bincount(labels, minlength=num_classes)
