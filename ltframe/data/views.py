"""Batched, per-sample augmentations ("views") on uint8 image batches, on any device.

Random numbers come from a CPU ``torch.Generator`` owned by the run (checkpointed, so resumed
runs see the same augmentations); the image math runs where the batch lives, with no host sync.
weak   = random horizontal flip + pad-and-crop (FixMatch / CIFAR-LT convention);
strong = the weak view's flip + pad-and-crop, then RandAugment, then Cutout, per sample.

RandAugment is FixMatch's variant (Sohn et al. 2020, "FixMatch", RandAugment table in the
appendix) as USB implements it (microsoft/Semi-supervised-learning,
semilearn/datasets/augmentation/randaugment.py, ``augment_list`` and ``RandAugment``): each image
gets ``n_ops`` ops (default 2, FixMatch's N = 2; USB's CIFAR pipelines use ``RandAugment(3, 5)``,
i.e. ``n_ops = 3``; ``max_ops > n_ops`` draws the count per batch in [n_ops, max_ops]), each
drawn uniformly with replacement from the 14 ops below, with a magnitude m ~ U(lo, hi) drawn per
image and op (RandAugment's global magnitude M is unused, as in USB). Each op is
``OP_FNS[name](x, m)`` on a float batch in [0, 1] with a [B] tensor of magnitudes, and equals the
torchvision.transforms.v2.functional call beside it applied per image
(tests/test_views_strong.py):

    op             m (RANGES)               torchvision.transforms.v2.functional
    identity       -                        -
    autocontrast   -                        autocontrast
    equalize       -                        equalize (on uint8 levels)
    brightness     [0.05, 0.95]             adjust_brightness(brightness_factor=m)
    color          [0.05, 0.95]             adjust_saturation(saturation_factor=m)
    contrast       [0.05, 0.95]             adjust_contrast(contrast_factor=m)
    sharpness      [0.05, 0.95]             adjust_sharpness(sharpness_factor=m)
    posterize      [4, 8): bits floor(m)    posterize(uint8 image, bits)
    solarize       [0, 1]                   solarize(threshold=m)
    rotate         [-30, 30] degrees        rotate(angle=m)  (counter-clockwise)
    shear_x        [-0.3, 0.3]              affine(shear=[deg(atan(m)), 0], center=[0, 0])
    shear_y        [-0.3, 0.3]              affine(shear=[0, deg(atan(m))], center=[0, 0])
    translate_x    [-0.3, 0.3] of W         affine(translate=[m * W, 0])
    translate_y    [-0.3, 0.3] of H         affine(translate=[0, m * H])

Geometric ops use nearest interpolation and fill 0 (the defaults of torchvision and of USB's PIL
calls); shears are about the top-left corner, as PIL's ``transform`` and torchvision's own
RandAugment do. ``invert`` (F.invert) is in OP_FNS but not drawn, as in USB. Cutout: a square of
side U(0, ``cutout``) * H (USB: U(0, 0.5) * W) at a uniform centre, filled with 0.5.

Where `strong` differs from USB: the ops run on float images, so values are not rounded to uint8
between ops (posterize and equalize read uint8 levels as torchvision's to_dtype does); solarize
thresholds are on the [0, 1] scale (USB: [0, 256] on uint8; its thresholds above 255 leave the
image unchanged, ours invert only the 255s at worst); positive translations move the content
right/down (torchvision) where PIL's move it left/up, the same distribution as the range is
symmetric; Cutout's square is clipped at the border (USB shifts its corner inward) and filled with
gray 0.5 (USB: RGB (125, 123, 114)). torchvision's ``RandAugment`` class uses other ranges (e.g.
enhance factors 1 +- 0.9 on a magnitude grid); we follow USB's.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ltframe.config import param

#: pad-and-crop pads at most this many pixels; RandAugment applies at most this many ops
MAX_PAD = 1024
MAX_OPS = 64


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
    pad: int = param(4, ge=0, le=MAX_PAD)  # pixels padded on each side before the random crop
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


def resized_crop(x: Tensor, r: Tensor, min_scale: float) -> Tensor:
    """Per-sample random resized crop back to the input size, batched (bilinear): area fraction
    uniform in (min_scale, 1), aspect ratio log-uniform in (3/4, 4/3), centre uniform where the
    crop fits. `r`: [B, 4] uniform draws (area, ratio, x, y)."""
    area = min_scale + (1 - min_scale) * r[:, 0]
    log_ratio = (r[:, 1] * 2 - 1) * 0.2877  # log(4/3)
    sx = (area * log_ratio.exp()).sqrt().clamp(max=1)
    sy = (area / log_ratio.exp()).sqrt().clamp(max=1)
    tx, ty = (1 - sx) * (r[:, 2] * 2 - 1), (1 - sy) * (r[:, 3] * 2 - 1)
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


@dataclass
class ResizedCropParams:
    min_scale: float = param(0.08, gt=0, le=1)  # smallest crop area fraction (ImageNet: 0.08)
    flip: bool = True


class ResizedCropView(Normalize):
    """Random resized crop + horizontal flip: the usual ImageNet training augmentation."""

    def __init__(self, params: ResizedCropParams, mean, std) -> None:
        super().__init__(mean, std)
        self.p = params

    def __call__(self, x: Tensor, gen: torch.Generator) -> Tensor:
        x = self.to_unit(x)
        x = resized_crop(x, _rand(gen, x.shape[0], 4, device=x.device), self.p.min_scale)
        return super().__call__(flip_pad_crop(x, gen, self.p.flip, 0, "reflect"))


@dataclass
class StrongParams:
    n_ops: int = param(2, ge=0, le=MAX_OPS)  # RandAugment ops per image (FixMatch: 2; USB: 3)
    max_ops: int = param(0, ge=0, le=MAX_OPS)  # >n_ops: op count per batch uniform in [n_ops, max_ops]
    cutout: float = param(0.5, ge=0, le=1)  # max Cutout side as a fraction of the side (0 = off)
    flip: bool = True
    pad: int = param(4, ge=0, le=MAX_PAD)

    def __post_init__(self) -> None:
        if 0 < self.max_ops < self.n_ops:
            raise ValueError(f"max_ops = {self.max_ops} is below n_ops = {self.n_ops}; set "
                             "max_ops = 0 (always n_ops ops) or max_ops >= n_ops")


# --- RandAugment ops -------------------------------------------------------------------------
# Each op is `op(x, m) -> batch`: x a float [B,3,H,W] batch in [0,1], m a [B] tensor of per-sample
# magnitudes in the op's own unit (degrees, shear factor, fraction of the side, enhance factor,
# bits, threshold). Each op equals torchvision.transforms.v2.functional applied per image
# (tests/test_views_strong.py).

_LUMA = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


def _col(m: Tensor) -> Tensor:
    return m.reshape(-1, 1, 1, 1)


def _luma(x: Tensor) -> Tensor:
    r, g, b = _LUMA
    return x[:, 0:1] * r + x[:, 1:2] * g + x[:, 2:3] * b


def _blend(a: Tensor, b: Tensor, factor: Tensor) -> Tensor:
    """torchvision / PIL ImageEnhance: a * factor + b * (1 - factor), clamped to [0, 1]."""
    f = _col(factor)
    return (a * f + b * (1 - f)).clamp_(0, 1)


def _to_levels(x: Tensor) -> Tensor:
    """The uint8 level of each value as torchvision's to_dtype(uint8, scale=True) rounds it."""
    return (x * (256 - 1e-3)).floor_().clamp_(0, 255)


def gray_expand(x: Tensor) -> Tensor:
    """ITU-R 601 luma of an RGB batch, repeated over the 3 channels."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


# Geometric ops: the inverse affine matrix [B,2,3] in pixel coordinates centred on the image
# (output pixel -> input pixel), as torchvision's _get_inverse_affine_matrix builds it.
def _theta(a, b, c, d, e, f) -> Tensor:
    return torch.stack([torch.stack([a, b, c], 1), torch.stack([d, e, f], 1)], 1)


def _rotate_theta(m: Tensor, h: int, w: int) -> Tensor:
    """F.rotate(angle=m): counter-clockwise by m degrees about the image centre."""
    a = m * (math.pi / 180)
    cos, sin, zero = torch.cos(a), torch.sin(a), torch.zeros_like(m)
    return _theta(cos, -sin, zero, sin, cos, zero)


def _shear_x_theta(m: Tensor, h: int, w: int) -> Tensor:
    """F.affine(shear=[atan(m) in degrees, 0], center=[0, 0]): x_in = x_out + m * y_out."""
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _theta(one, m, m * (h / 2), zero, one, zero)


def _shear_y_theta(m: Tensor, h: int, w: int) -> Tensor:
    """F.affine(shear=[0, atan(m) in degrees], center=[0, 0]): y_in = y_out + m * x_out."""
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _theta(one, zero, zero, m, one, m * (w / 2))


def _translate_x_theta(m: Tensor, h: int, w: int) -> Tensor:
    """F.affine(translate=[m * W, 0]): the content moves right by m * W pixels."""
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _theta(one, zero, -m * w, zero, one, zero)


def _translate_y_theta(m: Tensor, h: int, w: int) -> Tensor:
    """F.affine(translate=[0, m * H]): the content moves down by m * H pixels."""
    one, zero = torch.ones_like(m), torch.zeros_like(m)
    return _theta(one, zero, zero, zero, one, -m * h)


_THETA = {"rotate": _rotate_theta, "shear_x": _shear_x_theta, "shear_y": _shear_y_theta,
          "translate_x": _translate_x_theta, "translate_y": _translate_y_theta}


def warp(x: Tensor, theta: Tensor, mode: str = "nearest") -> Tensor:
    """Per-sample affine warp, fill 0, on torchvision's grid (its _affine_grid, batched)."""
    b, _, h, w = x.shape
    dev, dt = x.device, x.dtype
    base = torch.empty(1, h, w, 3, dtype=dt, device=dev)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=dev))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=dev)[:, None])
    base[..., 2].fill_(1)
    scaled = theta.to(dt).transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], dtype=dt, device=dev)
    grid = base.view(1, h * w, 3).expand(b, -1, -1).bmm(scaled).view(b, h, w, 2)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def _geometric(name: str):
    def op(x: Tensor, m: Tensor, mode: str = "nearest") -> Tensor:
        return warp(x, _THETA[name](m, x.shape[2], x.shape[3]), mode)

    op.__name__ = name
    op.__doc__ = _THETA[name].__doc__
    return op


def identity(x: Tensor, m: Tensor) -> Tensor:
    return x


def brightness(x: Tensor, m: Tensor) -> Tensor:
    """F.adjust_brightness(factor=m)."""
    return (x * _col(m)).clamp_(0, 1)


def color(x: Tensor, m: Tensor) -> Tensor:
    """F.adjust_saturation(factor=m) (PIL ImageEnhance.Color): blend with the luma."""
    return _blend(x, _luma(x), m)


def contrast(x: Tensor, m: Tensor) -> Tensor:
    """F.adjust_contrast(factor=m): blend with the per-image mean of the luma."""
    return _blend(x, _luma(x).mean((1, 2, 3), keepdim=True), m)


def sharpness(x: Tensor, m: Tensor) -> Tensor:
    """F.adjust_sharpness(factor=m): blend with a 3x3 smoothing (1s, 5 in the centre, /13) of the
    interior; the one-pixel border is kept as is (PIL, torchvision)."""
    b, c, h, w = x.shape
    if h <= 2 or w <= 2:
        return x
    k = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], dtype=x.dtype, device=x.device)
    blurred = F.conv2d(x, (k / 13).expand(c, 1, 3, 3), groups=c)
    out = x.clone()
    inner = out[:, :, 1:-1, 1:-1]
    inner.add_((blurred - inner) * (1 - _col(m)))
    return out.clamp_(0, 1)


def posterize(x: Tensor, m: Tensor) -> Tensor:
    """F.posterize(uint8 image, bits=floor(m)): keep the top bits of each uint8 level."""
    bits = m.floor().clamp(1, 8)
    step = _col(2.0 ** (8 - bits))
    out = (_to_levels(x) / step).floor_() * step / 255
    return torch.where(_col(bits) >= 8, x, out)


def solarize(x: Tensor, m: Tensor) -> Tensor:
    """F.solarize(threshold=m): invert the values >= m."""
    return torch.where(x >= _col(m), 1 - x, x)


def invert(x: Tensor, m: Tensor) -> Tensor:
    """F.invert."""
    return 1 - x


def autocontrast(x: Tensor, m: Tensor) -> Tensor:
    """F.autocontrast: stretch each channel to [0, 1] (unchanged where it is constant)."""
    lo = x.amin((2, 3), keepdim=True)
    hi = x.amax((2, 3), keepdim=True)
    flat = hi == lo
    scale = torch.where(flat, torch.ones_like(hi), hi - lo)
    return ((x - torch.where(flat, torch.zeros_like(lo), lo)) / scale).clamp_(0, 1)


def equalize(x: Tensor, m: Tensor) -> Tensor:
    """F.equalize (PIL's lookup table) on the uint8 levels of each channel; like torchvision, the
    output is on the uint8 grid, and a channel with a single non-max level is left unequalised."""
    b, c, h, w = x.shape
    q = _to_levels(x).long().view(b * c, h * w)
    hist = torch.zeros(b * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, q, torch.ones_like(q))
    cum = hist.cumsum(1)
    top = hist.gather(1, cum.argmax(1, keepdim=True))  # count of the largest level present
    step = (h * w - top).div(255, rounding_mode="floor")
    lut = (cum[:, :-1] + step // 2).div(step.clamp_min(1), rounding_mode="floor").clamp_(0, 255)
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut], 1)
    out = torch.where(step != 0, lut.gather(1, q), q)
    return out.view(b, c, h, w).to(x.dtype) / 255


OP_FNS = {name: _geometric(name) for name in _THETA} | {
    "identity": identity, "autocontrast": autocontrast, "brightness": brightness, "color": color,
    "contrast": contrast, "equalize": equalize, "posterize": posterize, "sharpness": sharpness,
    "solarize": solarize, "invert": invert}

# The ops `strong` draws from and their magnitude ranges (USB's augment_list; m ~ U(lo, hi)).
RANGES: dict[str, tuple[float, float]] = {
    "rotate": (-30.0, 30.0), "shear_x": (-0.3, 0.3), "shear_y": (-0.3, 0.3),
    "translate_x": (-0.3, 0.3), "translate_y": (-0.3, 0.3),
    "identity": (0.0, 1.0), "autocontrast": (0.0, 1.0), "brightness": (0.05, 0.95),
    "color": (0.05, 0.95), "contrast": (0.05, 0.95), "equalize": (0.0, 1.0), "posterize": (4.0, 8.0),
    "sharpness": (0.05, 0.95), "solarize": (0.0, 1.0),
}
OPS = tuple(RANGES)
_GEOMETRIC = tuple(_THETA)


def rand_augment(x: Tensor, gen: torch.Generator, n_ops: int) -> Tensor:
    """Apply `n_ops` RandAugment ops to each sample: each op drawn uniformly from OPS (with
    replacement) and its magnitude uniformly from RANGES[op], per sample and per round."""
    b, _, h, w = x.shape
    dev = x.device
    lo = torch.tensor([RANGES[n][0] for n in OPS], device=dev)
    hi = torch.tensor([RANGES[n][1] for n in OPS], device=dev)
    for _ in range(n_ops):
        op = (torch.rand(b, generator=gen) * len(OPS)).long().to(dev)
        m = lo[op] + (hi[op] - lo[op]) * _rand(gen, b, device=dev)
        # geometric ops: one warp, each sample with its own matrix (identity where not selected)
        theta = torch.eye(2, 3, device=dev).expand(b, 2, 3)
        geo = torch.zeros(b, dtype=torch.bool, device=dev)
        for name in _GEOMETRIC:
            sel = op == OPS.index(name)
            theta = torch.where(sel[:, None, None], _THETA[name](m, h, w), theta)
            geo |= sel
        x = torch.where(_col(geo), warp(x, theta), x)
        # the other ops, each over the batch and kept where selected
        for i, name in enumerate(OPS):
            if name not in _THETA and name != "identity":
                x = torch.where(_col(op == i), OP_FNS[name](x, m), x)
    return x


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
