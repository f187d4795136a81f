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
from ltframe.errors import DataError, RecipeError, closest


@dataclass
class ProfileCfg:
    """Long-tail profile of the labeled training set.

    "none" uses the source's training set as it is; "balanced" cuts every class to the smallest
    class (or n_max); exp / step / pareto / lomax build a long tail, the head being the class
    with the most images (ties in the source's class order: sorted names for folders), or the
    first of `class_order`.
    """

    name: Literal["none", "balanced", "exp", "step", "pareto", "lomax"] = "none"
    ratio: float = param(100.0, ge=1)  # imbalance ratio N_max / N_min (exp, step)
    # head count; 0 = the head class's count (balanced: the smallest; none: > 0 caps each class)
    n_max: int = param(0, ge=0)
    n_min: int = param(1, ge=1)  # pareto/lomax: smallest count; every profile keeps >= 1
    head_fraction: float = param(0.5, gt=0, le=1)  # step: fraction of classes that are head classes
    shape: float = param(6.0, gt=0)  # pareto/lomax shape (alpha)
    scale: float = param(1000.0, gt=0)  # lomax scale (lambda), in class-index units
    reverse: bool = False  # tail first (e.g. for the unlabeled set)
    class_order: list[str] = field(default_factory=list)  # class names, head first; [] = by count

    def __post_init__(self) -> None:
        if self.name in ("pareto", "lomax") and self.n_max and self.n_min > self.n_max:
            raise RecipeError(f"data.longtail.n_min = {self.n_min} is above n_max = {self.n_max}; "
                              "the smallest class count must not exceed the head's: lower n_min "
                              "or raise n_max")


#: the unlabeled class distributions of SimPro's protocol (ZOO.md section 10)
UnlabeledDist = Literal["consistent", "uniform", "reversed", "middle", "headtail"]


@dataclass
class SplitCfg:
    """How the long-tailed set is divided into labeled and unlabeled parts."""

    name: Literal["supervised", "fraction", "counts", "multiple"] = "supervised"
    labeled_fraction: float = param(0.1, gt=0, le=1)  # fraction: labeled = ceil(beta * N_c), rest unlabeled
    labeled_head: int = param(1500, ge=1)  # counts: N_1
    labeled_ratio: float = param(100.0, ge=1)  # counts: gamma_l
    unlabeled_head: int = param(3000, ge=0)  # counts: M_1
    unlabeled_ratio: float = 100.0  # counts/multiple: gamma_u, |gamma_u| >= 1 (negative = reversed order)
    multiple: float = param(5.0, gt=0, le=1e6)  # multiple: unlabeled total = k x labeled total
    # multiple: the unlabeled profile; "ratio" = exponential with unlabeled_ratio, "labeled" =
    # k x each class's labeled count (the labeled profile, whatever it is, e.g. lomax)
    unlabeled_shape: Literal["ratio", "labeled"] = "ratio"
    # counts/fraction: the unlabeled class distribution (SimPro's protocol, `unlabeled_order`)
    unlabeled_dist: UnlabeledDist = "consistent"

    def __post_init__(self) -> None:
        if not abs(self.unlabeled_ratio) >= 1 or math.isinf(self.unlabeled_ratio):
            raise RecipeError(
                f"data.split.unlabeled_ratio: {self.unlabeled_ratio:g} is out of range; it must be "
                ">= 1, or <= -1 for the reversed (tail-first) order"
            )
        if self.unlabeled_dist != "consistent":
            if self.name not in ("counts", "fraction"):
                raise RecipeError(
                    f"data.split.unlabeled_dist = \"{self.unlabeled_dist}\" needs the counts or "
                    f"fraction split (this one is \"{self.name}\"); set data.split.name or remove "
                    "unlabeled_dist")
            if self.name == "counts" and self.unlabeled_ratio < 0:
                raise RecipeError(
                    f"data.split.unlabeled_ratio = {self.unlabeled_ratio:g} is negative (reversed) "
                    f"and unlabeled_dist = \"{self.unlabeled_dist}\" orders the classes too; give "
                    "a positive unlabeled_ratio with unlabeled_dist")



def unlabeled_order(ranked: list[int], dist: str) -> list[int]:
    """Per-class unlabeled counts, head class first, for an unlabeled distribution `dist`, from
    the consistent counts `ranked` (head first). As SimPro's make_imb_data
    (LeapLabTHU/SimPro SimPro/dataset/cifar.py, flag_LT): "reversed" (1) = tail first;
    "middle" (3) = position r takes ranked[i_r] with i = [.., 4, 2, 0, 1, 3, ..] (even indices
    descending, then odd ascending: the largest count in the middle); "headtail" (4) =
    i = [1, 3, .., .., 4, 2, 0] (both ends large, the middle small); "uniform" (gamma_u = 1) =
    every class the head's count."""
    c = len(ranked)
    if dist == "uniform":
        return [ranked[0]] * c
    if dist == "reversed":
        return ranked[::-1]
    evens, odds = list(range(0, c, 2)), list(range(1, c, 2))
    if dist == "middle":
        return [ranked[i] for i in evens[::-1] + odds]
    if dist == "headtail":
        return [ranked[i] for i in odds + evens[::-1]]
    return list(ranked)


@dataclass
class Splits:
    """Indices into the source's train set (and val set, if separate)."""

    labeled: Tensor
    unlabeled: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    val: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    notes: list[str] = field(default_factory=list)  # one-line remarks for the run's log


def class_rank(available: list[int], names: list[str], class_order: list[str] | None = None
               ) -> list[int]:
    """Class indices head first: by `class_order` (names), else by available count (most
    first), ties in the source's class order (folder sources: sorted by name)."""
    if class_order:
        unknown = [n for n in class_order if n not in names]
        if unknown:
            raise RecipeError(f"data.longtail.class_order: '{unknown[0]}' is not a class; classes: "
                              f"{', '.join(names[:8])}{', ...' if len(names) > 8 else ''}"
                              f"{closest(unknown[0], names)}")
        missing = [n for n in names if n not in class_order]
        if missing or len(set(class_order)) != len(class_order):
            what = f"lacks '{missing[0]}'" if missing else "names a class twice"
            raise RecipeError(f"data.longtail.class_order {what}; list every class once, head "
                              f"first ({len(names)} classes)")
        return [names.index(n) for n in class_order]
    return sorted(range(len(names)), key=lambda c: (-available[c], c))


def profile_counts(cfg: ProfileCfg, num_classes: int, available: int | list[int],
                   seed: int = 0) -> list[int]:
    """Per-class counts by rank, head class first; never above `available` unless n_max says so.

    `available` is one count for every class or the per-class counts in rank order (head
    first): then "none" keeps them as they are and "balanced" takes the smallest.
    """
    c = num_classes
    per_class = list(available) if isinstance(available, list) else [available] * c
    if cfg.name == "none":  # as it is (n_max > 0 caps every class)
        return [min(a, cfg.n_max) if cfg.n_max else a for a in per_class]
    if cfg.name == "balanced":
        return [cfg.n_max or min(per_class)] * c
    n_max = cfg.n_max or per_class[0]
    if cfg.name == "exp":
        counts = [int(n_max * cfg.ratio ** (-i / max(c - 1, 1))) for i in range(c)]
    elif cfg.name == "step":
        n_head = max(1, round(c * cfg.head_fraction))
        counts = [n_max if i < n_head else int(n_max / cfg.ratio) for i in range(c)]
    elif cfg.name == "pareto":
        g = torch.Generator().manual_seed(seed)
        u = torch.rand(c, generator=g)
        draws = (1 - u).pow(-1 / cfg.shape) - 1  # Lomax(shape, scale=1)
        if not (torch.isfinite(draws).all() and draws.max() > 0):  # float32 over/underflow
            raise RecipeError(f"data.longtail.shape = {cfg.shape:g} is out of the range pareto can "
                              "draw from; use a shape between 0.2 and 1e6 (typical: 1 to 10)")
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
    rank = class_rank(available, names, profile.class_order)

    def by_class(ranked: list[int]) -> list[int]:
        out = [0] * num_classes
        for r, c in enumerate(rank):
            out[c] = ranked[r]
        return out

    if split.name == "counts":
        lab = by_class(_signed_profile(split.labeled_head, split.labeled_ratio, num_classes))
        unl = by_class(unlabeled_order(
            _signed_profile(split.unlabeled_head, split.unlabeled_ratio, num_classes),
            split.unlabeled_dist))
    else:
        total = by_class(profile_counts(profile, num_classes, [available[c] for c in rank], seed))
        if split.name == "supervised":
            lab, unl = total, [0] * num_classes
        elif split.name == "fraction":
            lab = [max(1, math.ceil(split.labeled_fraction * n)) for n in total]
            unl = [n - m for n, m in zip(total, lab, strict=True)]
            if split.unlabeled_dist != "consistent":
                unl = by_class(unlabeled_order([unl[c] for c in rank], split.unlabeled_dist))
        else:  # multiple
            lab = total
            shape = (list(lab) if split.unlabeled_shape == "labeled"
                     else by_class(_signed_profile(10**6, split.unlabeled_ratio, num_classes)))
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
    unlabeled.append((labels < 0).nonzero().flatten())  # images without a label
    notes = _profile_notes(profile, split, names, rank, need, available) if (
        profile.name != "none" or split.name == "counts") else []
    return Splits(torch.cat(labeled), torch.cat(unlabeled), torch.cat(val),
                  notes=notes + _val_notes([v.numel() for v in val], val_per_class, names))


def _profile_notes(profile: ProfileCfg, split: SplitCfg, names: list[str], rank: list[int],
                   need: list[int], available: list[int]) -> list[str]:
    """Which class is the head of the built long tail, and a warning when it discards more than
    half of the source's labelled images."""
    how = "data.longtail.class_order" if profile.class_order else "most images first, ties by class"
    out = [f"long tail ({profile.name if split.name != 'counts' else 'counts split'}): head class "
           f"'{names[rank[0]]}' ({need[rank[0]]} images), tail class '{names[rank[-1]]}' "
           f"({need[rank[-1]]}); order: {how}"]
    used, have = sum(need), sum(available)
    if have and used < have / 2:
        out.append(f"the {profile.name} profile keeps {used} of the source's {have} labelled "
                   f"training images ({100 * used / have:.0f}%); longtail = {{ name = \"none\" }} "
                   "uses them as they are")
    return out


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
