"""Batched, per-sample augmentations ("views") on uint8 image batches, on any device.

Random numbers come from the run's augmentation ``torch.Generator``, which lives on the run's
device (checkpointed, so resumed runs see the same augmentations): every draw is made where the
batch lives, constants (normalisation mean / std) are built once per device, shapes are static,
and nothing is read back to the host, so a view makes no host <-> device synchronisation.
A generator on another device than the images (e.g. a CPU one with CUDA images) still works: the
view then runs where the generator is and the result is copied over (slow; not for training).

none   = normalisation only;
weak   = random horizontal flip + pad-and-crop (FixMatch / CIFAR-LT convention), on uint8;
resized_crop = random resized crop + flip (ImageNet);
strong = the weak view's flip + pad-and-crop, then RandAugment (``ltframe.data.augment``: uint8
LUT ops, geometric ops composed into one warp), then Cutout, per sample.

RandAugment is FixMatch's variant as USB implements it (microsoft/Semi-supervised-learning,
semilearn/datasets/augmentation/randaugment.py): ``n_ops`` ops per image (FixMatch: 2; USB's
CIFAR pipelines: 3; ``max_ops > n_ops`` draws the count per batch in [n_ops, max_ops]), each drawn
uniformly with replacement from ``augment.OPS`` with a magnitude m ~ U(RANGES[op]) per image and
op; see ``ltframe.data.augment`` for the ops, their torchvision equivalents and where they differ
from USB. Cutout: a square of side U(0, ``cutout``) * H (USB: U(0, 0.5) * W) at a uniform centre,
clipped at the border, filled with gray 0.5 (USB: RGB (125, 123, 114)).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ltframe.config import param
from ltframe.data import augment
from ltframe.data.augment import GEOMETRIC, OP_FNS, OPS, RANGES, cutout, rand_augment, warp

__all__ = ["GEOMETRIC", "OPS", "OP_FNS", "RANGES", "cutout", "flip_pad_crop", "gray_expand",
           "rand_augment", "resized_crop", "warp"]

#: pad-and-crop pads at most this many pixels; RandAugment applies at most this many ops
MAX_PAD = 1024
MAX_OPS = 64


def _rand(gen: torch.Generator, *shape: int, device: torch.device) -> Tensor:
    """Uniforms drawn from `gen` on `device` (the generator's own device: no copy, no sync)."""
    return torch.rand(*shape, generator=gen, device=device)


def elsewhere(gen: torch.Generator | None, x: Tensor) -> bool:
    """`gen` lives on another kind of device than `x` (a view then runs on the generator's
    device and copies the result back: see `on_generator_device`)."""
    return gen is not None and gen.device.type != x.device.type


def on_generator_device(call, view, x: Tensor, gen: torch.Generator) -> Tensor:
    """`call(view, x, gen)` run on `gen`'s device, the result moved to x's device (blocking
    copies: for checks such as preflight's, never the training step, whose generator lives on
    the images' device)."""
    return call(view, x.to(gen.device), gen).to(x.device)


class Drawn:
    """A view whose randomness is drawn apart from its work: `draw(b, gen, device)` makes every
    draw from the generator (in the order `__call__` makes them) and returns tensors only;
    `apply(x, draws)` is a pure function of them. The trainer draws eagerly and runs `apply`
    inside the compiled step (`run.compile`), where generators cannot go."""

    def draw(self, b: int, gen: torch.Generator, device: torch.device) -> tuple:
        raise NotImplementedError

    def apply(self, x: Tensor, draws: tuple) -> Tensor:
        raise NotImplementedError

    def __call__(self, x: Tensor, gen: torch.Generator | None = None) -> Tensor:
        if gen is not None and elsewhere(gen, x):
            return on_generator_device(type(self).__call__, self, x, gen)
        return self.apply(x, self.draw(x.shape[0], gen, x.device))


def deferrable(view: object) -> bool:
    """`view` draws apart from its work (`Drawn`) and does all of it in `apply`: a subclass
    that overrides `__call__` (work outside `apply`) is applied whole, never deferred."""
    return isinstance(view, Drawn) and type(view).__call__ is Drawn.__call__


class Normalize:
    """uint8 -> float, per-source mean/std normalisation (constants cached per device).
    `from_levels` normalises uint8 (or float levels 0..255) in one kernel:
    x * (1 / (255 std)) + (-mean / std), equal to (x / 255 - mean) / std up to float rounding."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self._on: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self._affine_on: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def to(self, device: torch.device | str) -> Normalize:
        """Build the device's constants now (the trainer calls it at stage set-up, so the first
        step copies nothing); returns self."""
        canonical = torch.empty(0, device=device).device  # cuda -> cuda:<i>
        self.constants(canonical)
        self.from_levels(torch.empty(0, 3, 1, 1, device=canonical))  # its constants
        _CACHE.clear()  # the crops' index tables: rebuilt on the device at their first use
        return self

    def constants(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """mean, std on `device` (copied once per device)."""
        got = self._on.get(device)
        if got is None:
            got = self._on[device] = (self.mean.to(device), self.std.to(device))
        return got

    def to_unit(self, x: Tensor) -> Tensor:
        return x.float().div_(255.0)

    def from_levels(self, x: Tensor) -> Tensor:
        """Normalised float32 from uint8 or float levels on the 0..255 scale (one kernel)."""
        got = self._affine_on.get(x.device)
        if got is None:
            mean, std = self.mean.double(), self.std.double()
            got = self._affine_on[x.device] = ((-mean / std).float().to(x.device),
                                               (1 / (255 * std)).float().to(x.device))
        return torch.addcmul(got[0], x, got[1])

    def __call__(self, x: Tensor) -> Tensor:
        mean, std = self.constants(x.device)
        return (x - mean) / std


@dataclass
class NoneParams:
    """No augmentation: normalise only."""


class NoneView(Drawn, Normalize):
    def __init__(self, params: NoneParams, mean, std) -> None:
        super().__init__(mean, std)

    def draw(self, b: int, gen: torch.Generator | None, device: torch.device) -> tuple:
        return ()

    def apply(self, x: Tensor, draws: tuple) -> Tensor:
        return self.from_levels(x)


@dataclass
class WeakParams:
    flip: bool = True
    pad: int = param(4, ge=0, le=MAX_PAD)  # pixels padded on each side before the random crop
    padding_mode: Literal["reflect", "zeros"] = "reflect"


def draw_flip_crop(gen: torch.Generator, b: int, flip: bool, pad: int,
                   device: torch.device) -> tuple[Tensor | None, Tensor | None]:
    """`flip_pad_crop`'s draws: B flip uniforms, then [B, 2] crop offset uniforms (one draw of
    3B when both: on a CPU generator the same numbers as two)."""
    return _draw_flip_crop_u(gen, b, flip, pad, device)[:2]


def apply_flip_pad_crop(x: Tensor, f: Tensor | None, off: Tensor | None, pad: int,
                        mode: str, u: Tensor | None = None) -> Tensor:
    """`flip_pad_crop` with its draws given (from `draw_flip_crop`). `u`: the one [3B] draw that
    f and off view (flip and pad both on): with reflect padding the result is then gathered in
    one pass through a per-size table of source pixels (`_crop_table`), same values."""
    b, c, h, w = x.shape
    table = None if u is None or mode != "reflect" else _crop_table(h, w, pad, x.device)
    if table is not None:
        key = (u * _crop_scale(b, pad, x.device)).long()  # flip: floor(2 f) = 0 below 0.5
        o = key[b:].view(b, 2)
        src = table[key[:b], o[:, 0], o[:, 1]]  # [B, H*W]
        return x.reshape(b, c, h * w).gather(2, src[:, None].expand(b, c, h * w)).view(b, c, h, w)
    if f is not None:
        x = torch.where((f < 0.5)[:, None, None, None], x.flip(3), x)
    if off is not None and pad > 0:
        x = F.pad(x, (pad, pad, pad, pad), mode="reflect" if mode == "reflect" else "constant")
        o = (off * (2 * pad + 1)).long()
        rows = o[:, 0, None] + _arange(h, x.device)  # [B,H]
        cols = o[:, 1, None] + _arange(w, x.device)  # [B,W]
        bi = _arange(b, x.device)[:, None, None]
        x = x.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    return x


def flip_pad_crop(x: Tensor, gen: torch.Generator, flip: bool, pad: int, mode: str) -> Tensor:
    """Per-sample horizontal flip and random crop after padding, fully batched (any dtype;
    draws from `gen` on x's device: B flip uniforms, then [B, 2] crop offset uniforms)."""
    f, off = draw_flip_crop(gen, x.shape[0], flip, pad, x.device)
    return apply_flip_pad_crop(x, f, off, pad, mode)


def _draw_flip_crop_u(gen: torch.Generator, b: int, flip: bool, pad: int,
                      device: torch.device) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """`draw_flip_crop`'s draws and, with flip and pad, the [3B] draw they view (for the table)."""
    if flip and pad > 0:
        return _split_flip_crop(_rand(gen, 3 * b, device=device), b)
    f = _rand(gen, b, device=device) if flip else None
    off = _rand(gen, b, 2, device=device) if pad > 0 else None
    return f, off, None


def _split_flip_crop(u: Tensor, b: int) -> tuple[Tensor, Tensor, Tensor]:
    """The flip uniforms [B], crop offset uniforms [B, 2] and the [3B] draw u they view."""
    return u[:b], u[b:3 * b].view(b, 2), u[:3 * b]


_CACHE: dict[tuple, Tensor | None] = {}
_CROP_ENTRIES = 1 << 22  # the largest source table kept (int64 entries: 32 MiB)


def _cached(key: tuple, build) -> Tensor | None:
    """`build()` once per key (index tables of the crops, made on their device: no copy); the
    cache is emptied when it grows past 256 entries and at stage set-up (`Normalize.to`)."""
    if key not in _CACHE:
        if len(_CACHE) > 256:
            _CACHE.clear()
        _CACHE[key] = build()
    return _CACHE[key]


def _arange(n: int, device: torch.device) -> Tensor:
    """arange(n) on `device`, built once (index tables of the crops)."""
    return _cached(("arange", n, device), lambda: torch.arange(n, device=device))


def _crop_table(h: int, w: int, pad: int, device: torch.device) -> Tensor | None:
    """Flip, reflect-pad by `pad` and crop at every offset, as source pixels: [2, P, P, H*W]
    int64 (P = 2 pad + 1) indexed by floor(2 f) (0: flipped), row offset, column offset; the
    flat index of the input pixel each output pixel copies. Built once per size on the device
    (no copy); None when it would be large or the padding exceeds the image (reflect refuses)."""
    n = 2 * pad + 1
    if 2 * n * n * h * w > _CROP_ENTRIES or pad >= min(h, w):
        return None

    def reflect(q: Tensor, size: int) -> Tensor:  # torch's "reflect" (edge not repeated)
        q = q.abs()
        return torch.where(q >= size, 2 * (size - 1) - q, q)

    def build() -> Tensor:
        o = torch.arange(n, device=device)[:, None] - pad
        rows = reflect(o + torch.arange(h, device=device), h)  # [P, H]
        cols = reflect(o + torch.arange(w, device=device), w)  # [P, W]
        cols = torch.stack([w - 1 - cols, cols])  # flipped first: column w - 1 - c
        table = rows[None, :, None, :, None] * w + cols[:, None, :, None, :]
        return table.reshape(2, n, n, h * w)

    return _cached(("crop", h, w, pad, device), build)


def _crop_scale(b: int, pad: int, device: torch.device) -> Tensor:
    """[3B]: 2 for the flip uniforms, 2 pad + 1 for the offset uniforms (table keys)."""
    def build() -> Tensor:
        scale = torch.full((3 * b,), float(2 * pad + 1), device=device)
        scale[:b] = 2.0
        return scale

    return _cached(("scale", b, pad, device), build)


class WeakView(Drawn, Normalize):
    """Random horizontal flip + pad-and-crop (pad 4, reflect)."""

    def __init__(self, params: WeakParams, mean, std) -> None:
        super().__init__(mean, std)
        self.p = params

    def draw(self, b: int, gen: torch.Generator, device: torch.device) -> tuple:
        return _draw_flip_crop_u(gen, b, self.p.flip, self.p.pad, device)

    def apply(self, x: Tensor, draws: tuple) -> Tensor:
        f, off, u = draws
        x = apply_flip_pad_crop(x, f, off, self.p.pad, self.p.padding_mode, u)  # on uint8
        return self.from_levels(x)


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


class ResizedCropView(Drawn, Normalize):
    """Random resized crop + horizontal flip: the usual ImageNet training augmentation."""

    def __init__(self, params: ResizedCropParams, mean, std) -> None:
        super().__init__(mean, std)
        self.p = params

    def draw(self, b: int, gen: torch.Generator, device: torch.device) -> tuple:
        return (_rand(gen, b, 4, device=device), *draw_flip_crop(gen, b, self.p.flip, 0, device))

    def apply(self, x: Tensor, draws: tuple) -> Tensor:
        x = resized_crop(self.to_unit(x), draws[0], self.p.min_scale)
        return Normalize.__call__(self, apply_flip_pad_crop(x, *draws[1:], 0, "reflect"))


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


def gray_expand(x: Tensor) -> Tensor:
    """ITU-R 601 luma of an RGB batch, repeated over the 3 channels."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)


class StrongView(Drawn, Normalize):
    """Flip + crop, RandAugment (random ops and magnitudes) and Cutout, per sample."""

    def __init__(self, params: StrongParams, mean, std) -> None:
        super().__init__(mean, std)
        self.p = params

    def to(self, device: torch.device | str) -> StrongView:
        """Normalisation and RandAugment constants on `device` now (stage set-up)."""
        augment.prepare(device)
        super().to(device)
        return self

    def draw(self, b: int, gen: torch.Generator, device: torch.device) -> tuple:
        p = self.p
        if p.flip and p.pad > 0 and p.max_ops <= p.n_ops:
            # one draw in the order of the calls below (on a CPU generator the same numbers)
            r = p.n_ops
            u = _rand(gen, 3 * b + 2 * r * b + (3 * b if p.cutout > 0 else 0), device=device)
            ops = augment.ops_from_uniforms(u[3 * b:3 * b + 2 * r * b].view(r, 2, b))
            cut = u[3 * b + 2 * r * b:].view(b, 3) if p.cutout > 0 else None
            return (*_split_flip_crop(u, b), *ops, cut)
        fc = _draw_flip_crop_u(gen, b, p.flip, p.pad, device)
        ops = augment.draw_ops(gen, b, p.n_ops, p.max_ops, device)
        cut = _rand(gen, b, 3, device=device) if p.cutout > 0 else None
        return (*fc, *ops, cut)

    def apply(self, x: Tensor, draws: tuple) -> Tensor:
        f, off, u, code, m, cut = draws
        x = apply_flip_pad_crop(x, f, off, self.p.pad, "reflect", u)  # on uint8
        x = augment.apply_ops_levels(x, code, m)  # float levels (or x when no ops)
        if cut is not None:
            x = augment.apply_cutout(x if x.is_floating_point() else x.float(), cut,
                                     self.p.cutout, levels=True)
        return self.from_levels(x)
