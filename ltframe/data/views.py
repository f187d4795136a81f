"""Batched, per-sample augmentations ("views") on uint8 image batches, on any device.

Random numbers come from a CPU ``torch.Generator`` owned by the run (checkpointed, so resumed
runs see the same augmentations); the image math runs where the batch lives, with no host sync.
weak   = random horizontal flip + pad-and-crop (FixMatch / CIFAR-LT convention);
strong = RandAugment-style ops with random magnitudes (FixMatch's RA variant) + Cutout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def _rand(gen: torch.Generator, *shape: int, device: torch.device) -> Tensor:
    return torch.rand(*shape, generator=gen).to(device, non_blocking=True)


class Normalize:
    """uint8 -> float, per-source mean/std normalisation."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def to_unit(self, x: Tensor) -> Tensor:
        return x.float().div_(255.0)

    def __call__(self, x: Tensor) -> Tensor:
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return (x - mean) / std


@dataclass
class NoneParams:
    """No augmentation: normalise only."""


class NoneView(Normalize):
    def __init__(self, params: NoneParams, mean, std) -> None:
        super().__init__(mean, std)

    def __call__(self, x: Tensor, gen: torch.Generator | None = None) -> Tensor:
        return super().__call__(self.to_unit(x))


@dataclass
class WeakParams:
    flip: bool = True
    pad: int = 4
    padding_mode: Literal["reflect", "zeros"] = "reflect"


def flip_pad_crop(x: Tensor, gen: torch.Generator, flip: bool, pad: int, mode: str) -> Tensor:
    """Per-sample horizontal flip and random crop after padding, fully batched."""
    b, _, h, w = x.shape
    dev = x.device
    if flip:
        do_flip = _rand(gen, b, device=dev) < 0.5
        x = torch.where(do_flip[:, None, None, None], x.flip(3), x)
    if pad > 0:
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect" if mode == "reflect" else "constant")
        off = (torch.rand(b, 2, generator=gen) * (2 * pad + 1)).long().to(dev)
        rows = off[:, 0, None] + torch.arange(h, device=dev)  # [B,H]
        cols = off[:, 1, None] + torch.arange(w, device=dev)  # [B,W]
        bi = torch.arange(b, device=dev)[:, None, None]
        x = x.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return x


class WeakView(Normalize):
    """Random horizontal flip + pad-and-crop (pad 4, reflect)."""

    def __init__(self, params: WeakParams, mean, std) -> None:
        super().__init__(mean, std)
        self.p = params

    def __call__(self, x: Tensor, gen: torch.Generator) -> Tensor:
        x = flip_pad_crop(self.to_unit(x), gen, self.p.flip, self.p.pad, self.p.padding_mode)
        return super().__call__(x)


@dataclass
class StrongParams:
    n_ops: int = 2
    max_ops: int = 0  # >n_ops: draw the op count per batch uniformly in [n_ops, max_ops]
    cutout: float = 0.5  # max Cutout side as a fraction of the image side (0 = off)
    flip: bool = True
    pad: int = 4


# RandAugment ops, each (x in [0,1], magnitude v in [0,1]) with identity at the masked samples.
_GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_COLOR = ("identity", "autocontrast", "brightness", "color", "contrast", "equalize",
          "posterize", "sharpness", "solarize")
OPS = _GEOMETRIC + _COLOR


def _blend(a: Tensor, b: Tensor, factor: Tensor) -> Tensor:
    """PIL ImageEnhance semantics: b + factor * (a - b), clamped."""
    return (b + factor[:, None, None, None] * (a - b)).clamp_(0, 1)


def gray_expand(x: Tensor) -> Tensor:
    """ITU-R 601 luma of an RGB batch, repeated over the 3 channels."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


def _equalize(x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    q = (x * 255).round().long().view(b * c, h * w)
    hist = torch.zeros(b * c, 256, device=x.device).scatter_add_(1, q, torch.ones_like(q, dtype=torch.float))
    cdf = hist.cumsum(1)
    cdf_min = torch.where(hist > 0, cdf, torch.full_like(cdf, float(h * w))).min(1, keepdim=True).values
    lut = ((cdf - cdf_min) / (h * w - cdf_min).clamp_min(1)).clamp(0, 1)
    return lut.gather(1, q).view(b, c, h, w)


def _autocontrast(x: Tensor) -> Tensor:
    lo = x.amin((2, 3), keepdim=True)
    hi = x.amax((2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)


def _smooth(x: Tensor) -> Tensor:
    k = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device) / 13
    out = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3)
    return out


def rand_augment(x: Tensor, gen: torch.Generator, n_ops: int) -> Tensor:
    """Apply `n_ops` random RandAugment ops with random magnitudes to each sample."""
    b, dev = x.shape[0], x.device
    for _ in range(n_ops):
        op = (torch.rand(b, generator=gen) * len(OPS)).long().to(dev)
        v = _rand(gen, b, device=dev)
        sign = torch.where(_rand(gen, b, device=dev) < 0.5, -1.0, 1.0)
        sel = {name: op == i for i, name in enumerate(OPS)}
        # geometric ops: one affine grid per sample (identity where not selected)
        angle = torch.where(sel["rotate"], sign * v * 30.0, 0.0) * math.pi / 180
        shx = torch.where(sel["shear_x"], sign * v * 0.3, 0.0)
        shy = torch.where(sel["shear_y"], sign * v * 0.3, 0.0)
        tx = torch.where(sel["translate_x"], sign * v * 0.3 * 2, 0.0)
        ty = torch.where(sel["translate_y"], sign * v * 0.3 * 2, 0.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([
            torch.stack([cos, -sin + shx, tx], 1),
            torch.stack([sin + shy, cos, ty], 1),
        ], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        x = torch.where(_any_geo(sel)[:, None, None, None], warped, x)
        # colour ops: factor 1 / threshold 1 means identity
        one = torch.ones_like(v)
        x = x * torch.where(sel["brightness"], 0.05 + 1.9 * v, one)[:, None, None, None]
        x = x.clamp_(0, 1)
        x = _blend(x, gray_expand(x), torch.where(sel["color"], 0.05 + 1.9 * v, one))
        mean = gray_expand(x).mean((1, 2, 3), keepdim=True).expand_as(x)
        x = _blend(x, mean, torch.where(sel["contrast"], 0.05 + 1.9 * v, one))
        x = _blend(x, _smooth(x), torch.where(sel["sharpness"], 0.05 + 1.9 * v, one))
        thr = torch.where(sel["solarize"], v, 2 * one)[:, None, None, None]
        x = torch.where(x >= thr, 1 - x, x)
        bits = torch.where(sel["posterize"], 4 + (v * 4).floor(), 8 * one)[:, None, None, None]
        step = 2.0 ** (8 - bits)
        x = torch.floor(x * 255 / step) * step / 255
        x = torch.where(sel["autocontrast"][:, None, None, None], _autocontrast(x), x)
        x = torch.where(sel["equalize"][:, None, None, None], _equalize(x), x)
    return x


def _any_geo(sel: dict[str, Tensor]) -> Tensor:
    out = sel[_GEOMETRIC[0]]
    for name in _GEOMETRIC[1:]:
        out = out | sel[name]
    return out


def cutout(x: Tensor, gen: torch.Generator, max_frac: float, fill: float = 0.5) -> Tensor:
    """Per-sample square Cutout of side v * max_frac * H at a random centre (v ~ U(0,1))."""
    b, _, h, w = x.shape
    dev = x.device
    r = torch.rand(b, 3, generator=gen).to(dev)
    half = (r[:, 0] * max_frac * h / 2)[:, None]
    cy, cx = (r[:, 1] * h)[:, None], (r[:, 2] * w)[:, None]
    ys = torch.arange(h, device=dev)[None] + 0.5
    xs = torch.arange(w, device=dev)[None] + 0.5
    inside = ((ys - cy).abs() < half)[:, :, None] & ((xs - cx).abs() < half)[:, None, :]
    return torch.where(inside[:, None], torch.full_like(x, fill), x)


class StrongView(Normalize):
    """Flip + crop, RandAugment (random ops and magnitudes) and Cutout, per sample."""

    def __init__(self, params: StrongParams, mean, std) -> None:
        super().__init__(mean, std)
        self.p = params

    def __call__(self, x: Tensor, gen: torch.Generator) -> Tensor:
        x = flip_pad_crop(self.to_unit(x), gen, self.p.flip, self.p.pad, "reflect")
        n = self.p.n_ops
        if self.p.max_ops > n:
            n += int(torch.randint(0, self.p.max_ops - n + 1, (1,), generator=gen))
        x = rand_augment(x, gen, n)
        if self.p.cutout > 0:
            x = cutout(x, gen, self.p.cutout)
        return super().__call__(x)
