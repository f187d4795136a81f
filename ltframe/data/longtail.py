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
from ltframe.errors import DataError, RecipeError


@dataclass
class ProfileCfg:
    """Long-tail profile of the labeled training set."""

    name: Literal["none", "exp", "step", "pareto", "lomax"] = "none"
    ratio: float = param(100.0, ge=1)  # imbalance ratio N_max / N_min (exp, step)
    n_max: int = param(0, ge=0)  # head count; 0 = the largest class count available
    n_min: int = param(1, ge=1)  # pareto/lomax: smallest count; every profile keeps >= 1
    head_fraction: float = param(0.5, gt=0, le=1)  # step: fraction of classes that are head classes
    shape: float = param(6.0, gt=0)  # pareto/lomax shape (alpha)
    scale: float = param(1000.0, gt=0)  # lomax scale (lambda), in class-index units
    reverse: bool = False  # tail first (e.g. for the unlabeled set)


@dataclass
class SplitCfg:
    """How the long-tailed set is divided into labeled and unlabeled parts."""

    name: Literal["supervised", "fraction", "counts", "multiple"] = "supervised"
    labeled_fraction: float = param(0.1, gt=0, le=1)  # fraction: labeled = ceil(beta * N_c), rest unlabeled
    labeled_head: int = param(1500, ge=1)  # counts: N_1
    labeled_ratio: float = param(100.0, ge=1)  # counts: gamma_l
    unlabeled_head: int = param(3000, ge=0)  # counts: M_1
    unlabeled_ratio: float = 100.0  # counts/multiple: gamma_u, |gamma_u| >= 1 (negative = reversed order)
    multiple: float = param(5.0, gt=0)  # multiple: unlabeled total = k x labeled total
    # multiple: the unlabeled profile; "ratio" = exponential with unlabeled_ratio, "labeled" =
    # k x each class's labeled count (the labeled profile, whatever it is, e.g. lomax)
    unlabeled_shape: Literal["ratio", "labeled"] = "ratio"

    def __post_init__(self) -> None:
        if abs(self.unlabeled_ratio) < 1:
            raise RecipeError(
                f"data.split.unlabeled_ratio: {self.unlabeled_ratio:g} is out of range; it must be "
                ">= 1, or <= -1 for the reversed (tail-first) order"
            )


@dataclass
class Splits:
    """Indices into the source's train set (and val set, if separate)."""

    labeled: Tensor
    unlabeled: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    val: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    notes: list[str] = field(default_factory=list)  # one-line remarks for the run's log


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
    elif cfg.name == "lomax":
        # the Lomax(shape, scale) density at class index i, scaled so that class 0 has n_max
        counts = [int(round(n_max * (1 + i / cfg.scale) ** -(cfg.shape + 1))) for i in range(c)]
    else:  # pragma: no cover - guarded by Literal
        raise DataError(f"unknown long-tail profile {cfg.name}")
    counts = [max(cfg.n_min if cfg.name in ("pareto", "lomax") else 1, n) for n in counts]
    return counts[::-1] if cfg.reverse else counts


def _largest_multiple(lab: list[int], shape: list[int], available: list[int]) -> float:
    """The largest k (to 0.01) for which k x labeled unlabeled images of the given profile fit."""
    def fits(k: float) -> bool:
        scale = k * sum(lab) / sum(shape)
        return all(a + int(round(s * scale)) <= n for a, s, n in zip(lab, shape, available, strict=True))

    k = min(((n - a) * sum(shape) / (s * sum(lab)) for a, s, n in zip(lab, shape, available, strict=True)
             if s > 0), default=0.0)
    k = math.floor(max(k, 0.0) * 100) / 100
    while k > 0 and not fits(k):
        k = round(k - 0.01, 2)
    return k


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
    *,
    classes: list[str] | None = None,
    val_first: bool = False,
) -> Splits:
    """Draw the long-tailed labeled/unlabeled split and a balanced val split from `labels`.

    Each class's images are shuffled with `seed`; labeled, then unlabeled images are taken from
    the front. The val split takes up to `val_per_class` of the images each class has left over,
    so labeled/unlabeled are the same for every `val_per_class`; a class with fewer spare images
    gets fewer val images, said in `Splits.notes`. `val_first=True` is the older protocol: val is
    carved first and the profile is drawn from what remains. `classes` names the classes in messages.
    Raises DataError when a class has no images or the split needs more than a class has.
    """
    names = classes or [str(c) for c in range(num_classes)]
    g = torch.Generator().manual_seed(seed)
    pools = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        pools.append(idx[torch.randperm(idx.numel(), generator=g)])
    empty = [c for c, p in enumerate(pools) if p.numel() == 0]
    if empty:
        c = empty[0]
        also = f" (nor do {len(empty) - 1} more classes)" if len(empty) > 1 else ""
        raise DataError(
            f"class {names[c]!r} (label {c}) has no training images{also}; add training images "
            f"of that class, or remove empty classes so the labels run 0..{num_classes - 1 - len(empty)}"
            " without gaps"
        )
    val_pools: list[Tensor] = []
    if val_first:
        val_pools = [p[:val_per_class] for p in pools]
        pools = [p[val_per_class:] for p in pools]
        c = min(range(num_classes), key=lambda k: pools[k].numel())
        if pools[c].numel() == 0:
            raise DataError(
                f"class {names[c]!r} has {val_pools[c].numel()} images, too few for "
                f"data.val_per_class = {val_per_class} carved first; lower data.val_per_class"
            )
    available = [p.numel() for p in pools]

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
            shape = (list(lab) if split.unlabeled_shape == "labeled"
                     else _signed_profile(10**6, split.unlabeled_ratio, num_classes))
            scale = split.multiple * sum(lab) / sum(shape)
            unl = [int(round(s * scale)) for s in shape]
    need = [a + b for a, b in zip(lab, unl, strict=True)]
    short = [c for c in range(num_classes) if need[c] > available[c]]
    if short:
        c = short[0]
        fix = {"counts": "data.split.labeled_head or data.split.unlabeled_head",
               "multiple": "data.longtail.n_max or data.split.multiple"}.get(
                   split.name, "data.longtail.n_max")
        if val_first and val_per_class:
            fix += " or data.val_per_class"
        hint = ""
        if split.name == "multiple":
            k = _largest_multiple(lab, shape, available)
            hint = f" (the largest data.split.multiple that fits is {k:.2f})"
        raise DataError(
            f"class {names[c]!r} (label {c}) needs {need[c]} images ({lab[c]} labeled + "
            f"{unl[c]} unlabeled) but has {available[c]}; lower {fix}{hint}, or use a bigger "
            "source"
        )
    labeled, unlabeled, val = [], [], []
    for c, pool in enumerate(pools):
        labeled.append(pool[:lab[c]])
        unlabeled.append(pool[lab[c]:need[c]])
        val.append(val_pools[c] if val_first else pool[need[c]:need[c] + val_per_class])
    return Splits(torch.cat(labeled), torch.cat(unlabeled), torch.cat(val),
                  notes=_val_notes([v.numel() for v in val], val_per_class, names))


def _val_notes(got: list[int], val_per_class: int, names: list[str]) -> list[str]:
    short = [c for c, n in enumerate(got) if n < val_per_class]
    if not short:
        return []
    if len(short) == 1:
        c = short[0]
        return [f"val split: class {names[c]!r} has only {got[c]} spare images (the long-tailed "
                f"split uses the rest), so it gets {got[c]} of data.val_per_class = {val_per_class}"]
    listed = ", ".join(f"{names[c]!r} {got[c]}" for c in short[:5])
    more = ", ..." if len(short) > 5 else ""
    return [f"val split: {len(short)} classes have fewer than data.val_per_class = {val_per_class} "
            f"spare images (the long-tailed split uses the rest) and get only: {listed}{more}"]


def class_counts(labels: Tensor, num_classes: int) -> Tensor:
    return torch.bincount(labels, minlength=num_classes)
