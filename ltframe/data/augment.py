"""Lean, sync-free RandAugment + Cutout on uint8 image batches (issue 19), on any device.

RandAugment (Cubuk et al. 2020, "RandAugment", CVPR-W) in FixMatch's variant as USB implements it
(microsoft/Semi-supervised-learning, semilearn/datasets/augmentation/randaugment.py,
``augment_list``): each image gets ``n_ops`` ops drawn uniformly with replacement from OPS, each
with a magnitude m ~ U(RANGES[op]) drawn per image and op; ``invert`` is defined but not drawn.
``ltframe.data.views`` (the ``strong`` view) uses this module and re-exports its names. Each op
works on uint8 [B,3,H,W] with a [B] tensor of magnitudes and equals the
torchvision.transforms.v2.functional call on the uint8 image, applied per image:

    op             m (RANGES)          torchvision.transforms.v2.functional (uint8 image)
    identity       -                   -
    autocontrast   -                   autocontrast
    equalize       -                   equalize
    brightness     [0.05, 0.95]        adjust_brightness(m)
    color          [0.05, 0.95]        adjust_saturation(m)
    contrast       [0.05, 0.95]        adjust_contrast(m)
    sharpness      [0.05, 0.95]        adjust_sharpness(m)
    posterize      [4, 8)              posterize(bits=floor(m))
    solarize       [0, 1]              solarize(threshold=255 * m)
    rotate         [-30, 30] degrees   rotate(m)  (nearest, fill 0)
    shear_x/y      [-0.3, 0.3]         affine(shear=deg(atan(m)) on x / y, center=[0, 0])
    translate_x/y  [-0.3, 0.3]         affine(translate=m * W / m * H)

API: ``rand_augment(x, gen, n_ops, max_ops=0)`` = ``apply_ops(x, *draw_ops(gen, B, n_ops, max_ops,
x.device))``; ``OP_FNS[name](x, m)`` (geometric ops also take ``mode=`` and float images);
``warp(x, theta, mode)``; ``cutout(x, gen, max_frac, fill=0.5)`` (uint8 or float). ``apply_ops``
has no random draws, so it can run under torch.compile(fullgraph=True) (inductor's float fusion
may move a truncation by one level in a few values; eager equals torchvision).

How it stays lean and static (no host sync, fixed kernel sequence for a given n_ops; about 27
launches a round, `benchmarks/speed.py --ops` counts them):
- every per-image parameter (thresholds, scales, blend factors, geometric magnitudes, the
  switches of autocontrast / equalize) is C + D * m with (C, D) from one table lookup by op code;
- per round, every colour op is ONE per-sample, per-channel 256-entry lookup table (LUT) on
  [B,3,256] (identity, autocontrast, equalize, brightness, contrast, posterize, solarize, invert)
  applied with one ``gather`` of the int64 levels (each round's result is truncated by its
  conversion to the next round's index); ``color`` / ``sharpness`` are per-sample blends whose
  factor is 0 (an exact identity) for the images that did not draw them; the statistics come
  from one sort per round (min / max are its ends, equalize's cumulative histogram its
  insertion points of the 256 levels) and the mean gray; the sharpness blur is one
  whole-weight convolution (exact in any precision);
- the geometric ops of all rounds are composed into one affine matrix per image and applied with
  ONE nearest ``grid_sample`` after the colour rounds;
- random draws come from ``gen`` on the images' device; constants are built once per device
  (small matmuls build the matrices and grid: keep TF32 matmuls off, torch's default, for
  torchvision-exact warps).

Differences from the former ``views.rand_augment`` (float ops in the drawn order, removed):
- values are uint8 between ops (as in USB / PIL and torchvision's uint8 kernels), so colour ops
  round (truncate) like torchvision's uint8 path instead of staying in float;
- an image's geometric ops all apply after its colour ops, composed into a single resampling:
  with one geometric op per image this is exact; with two or more, content moved out and back in
  is kept (sequential nearest warps fill it with 0) and pixels are rounded once instead of per
  op; colour statistics (autocontrast, equalize, contrast) never see the geometric fill, and the
  fill stays 0 (a later solarize in USB may turn it white);
- the draws are the former views.py's, in its order (on a CPU generator the same numbers), except that with
  max_ops > n_ops all max_ops rounds are drawn (rounds past the batch's count are identity), so
  later draws from the generator (Cutout's) shift.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

# The ops `strong` draws from and their magnitude ranges (USB's augment_list; m ~ U(lo, hi)).
RANGES: dict[str, tuple[float, float]] = {
    "rotate": (-30.0, 30.0), "shear_x": (-0.3, 0.3), "shear_y": (-0.3, 0.3),
    "translate_x": (-0.3, 0.3), "translate_y": (-0.3, 0.3),
    "identity": (0.0, 1.0), "autocontrast": (0.0, 1.0), "brightness": (0.05, 0.95),
    "color": (0.05, 0.95), "contrast": (0.05, 0.95), "equalize": (0.0, 1.0), "posterize": (4.0, 8.0),
    "sharpness": (0.05, 0.95), "solarize": (0.0, 1.0),
}
OPS: tuple[str, ...] = tuple(RANGES)
GEOMETRIC: tuple[str, ...] = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
_CODES: tuple[str, ...] = (*OPS, "invert")  # op codes; invert is never drawn
_C = {name: i for i, name in enumerate(_CODES)}
#: use the CPU fast paths on CPU tensors (benchmarks turn it off to count the CUDA kernel sequence)
CPU_FAST_PATHS = True
# per-image parameters, each C + D * m with (C, D) looked up by op code (`_Consts.aff`): the
# solarize / invert threshold, the static LUT's scale and posterize row, 1 - m for contrast,
# color and sharpness, the geometric magnitudes, and the autocontrast / equalize switches
_PARAMS = ("thr", "scale", "row", "alpha_c", "g_col", "g_sh", *GEOMETRIC, "block_auto", "block_eq")
_P = {name: i for i, name in enumerate(_PARAMS)}
_GEO = slice(_P[GEOMETRIC[0]], _P[GEOMETRIC[-1]] + 1)  # the geometric magnitudes' columns
_NEVER = 1e9  # a threshold no level or statistic reaches
#: equalize's LUT in float32 (fewer launches) below this many pixels per channel, else in int64
EQUALIZE_FLOAT_PIXELS = 1 << 23


class _Consts:
    """Per-device constants (built once; indexing and arithmetic on them never syncs)."""

    def __init__(self, device: torch.device) -> None:
        self.ranges = torch.tensor([RANGES[n] for n in OPS], device=device)  # [n_ops, 2] lo, hi
        self.ranges[:, 1] -= self.ranges[:, 0]  # -> lo, span
        # op code -> (C, D) of every per-image parameter P = C + D * m (`_PARAMS`), one lookup
        aff = torch.zeros(len(_CODES), 2, len(_PARAMS))
        aff[:, 0, _P["thr"]] = _NEVER  # levels >= thr are inverted: never, but for
        aff[_C["solarize"], :, _P["thr"]] = torch.tensor([0.0, 255.0])  # solarize (255 m)
        aff[_C["invert"], 0, _P["thr"]] = 0.0  # and invert (always)
        aff[:, 0, _P["scale"]] = 1.0  # the static LUT's scale: m for the blends with factor m
        for n in ("brightness", "color", "contrast"):
            aff[_C[n], :, _P["scale"]] = torch.tensor([0.0, 1.0])
        aff[:, 0, _P["row"]] = 8.0  # posterize table row: 8 bits (identity), posterize floor(m)
        aff[_C["posterize"], :, _P["row"]] = torch.tensor([0.0, 1.0])
        for n, col in (("contrast", "alpha_c"), ("color", "g_col"), ("sharpness", "g_sh")):
            aff[_C[n], :, _P[col]] = torch.tensor([1.0, -1.0])  # 1 - m (0: the op is not drawn)
        for g in GEOMETRIC:  # the magnitude, a rotation's in radians (m * float32(pi / 180))
            aff[_C[g], 1, _P[g]] = math.pi / 180 if g == "rotate" else 1.0
        for n, col in (("autocontrast", "block_auto"), ("equalize", "block_eq")):
            aff[:, 0, _P[col]] = _NEVER  # the op acts where its statistic exceeds this: 0 for
            aff[_C[n], 0, _P[col]] = 0.0  # its own code (max - min > 0, step > 0), never else
        self.aff = aff.to(device)
        self.levels = torch.arange(256, dtype=torch.float32, device=device)
        # posterize LUTs by kept bits b = 0..8 (b < 1 keeps 1 bit): floor(v / q) * q, q = 2^(8-b)
        q = torch.exp2(8 - torch.arange(9, device=device).clamp(1, 8).float())[:, None]
        self.poster = (self.levels / q).floor_().mul_(q)
        self.inverted = 255 - self.levels
        self.one = torch.ones((), device=device)
        self.identity = torch.tensor(_C["identity"], device=device)
        # the sharpness blur minus 13 x the centre, + 6.5 (see `_sharp_delta`), per channel
        self.sharp_w = torch.ones(3, 1, 3, 3, device=device)
        self.sharp_w[:, :, 1, 1] = -8.0
        self.sharp_b = torch.full((3,), 6.5, device=device)


def _memo(fn):
    """Memoise a pure constant builder by its arguments (like functools.cache, which
    torch.compile traces around with a warning; this plain dict it reads as it is)."""
    store: dict = {}

    @functools.wraps(fn)
    def wrapper(*args):
        got = store.get(args)
        if got is None:
            got = store[args] = fn(*args)
        return got

    wrapper.cache_clear = store.clear
    return wrapper


@_memo
def _consts(device: torch.device) -> _Consts:
    return _Consts(device)


def prepare(device: torch.device | str) -> None:
    """Forget the cached constants and build `device`'s now (the `strong` view calls it at stage
    set-up, so a step copies nothing from the host; size-dependent caches are built on the
    device, without copies, at their first use)."""
    for fn in (_consts, _geo_lin, _grid_base, _cutout_axes, _level_index):
        fn.cache_clear()
    _consts(torch.empty(0, device=device).device)


@_memo
def _geo_lin(h: int, w: int, device: torch.device) -> Tensor:
    """(cos, sin, shear_x, shear_y, translate_x, translate_y, 1) -> the 9 matrix entries they
    give (a rotation's trigonometric part, each op's magnitude times its entries, the corner 1)."""
    t = torch.zeros(7, 9, device=device)
    t[0, 0], t[0, 4], t[1, 1], t[1, 3] = 1.0, 1.0, -1.0, 1.0  # cos, -sin / sin, cos
    t[2, 1], t[2, 2] = 1.0, h / 2  # shear_x: x_in = x_out + m * (y_out + h / 2)
    t[3, 3], t[3, 5] = 1.0, w / 2  # shear_y: y_in = y_out + m * (x_out + w / 2)
    t[4, 2], t[5, 5] = -float(w), -float(h)  # translate: x_in = x_out - m * W (y: - m * H)
    t[6, 8] = 1.0
    return t


@_memo
def _level_index(b: int, c: int, device: torch.device) -> Tensor:
    """The levels 0..255 as int64 [B,C,256] (contiguous: the values `searchsorted` looks up)."""
    return torch.arange(256, device=device).expand(b, c, 256).contiguous()


@_memo
def _grid_base(h: int, w: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """torchvision's _affine_grid base ([1, H*W, 3], centred pixel coordinates) and (W/2, H/2)."""
    base = torch.empty(1, h, w, 3, dtype=dtype, device=device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=device))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=device)[:, None])
    base[..., 2].fill_(1)
    half = torch.full((2,), 0.5 * w, dtype=dtype, device=device)  # filled on the device: no copy
    half[1] = 0.5 * h
    return base.view(1, h * w, 3), half


@_memo
def _cutout_axes(h: int, w: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Pixel centres of the rows then the columns [H+W], which uniform (1: centre y, 2: centre x)
    places the square's centre on each, and that axis' length [H+W]."""
    centres = torch.cat([torch.arange(h, device=device), torch.arange(w, device=device)]) + 0.5
    which = torch.cat([torch.full((h,), 1, device=device), torch.full((w,), 2, device=device)])
    size = torch.cat([torch.full((h,), float(h), device=device), torch.full((w,), float(w), device=device)])
    return centres, which, size


def _fast(x: Tensor) -> bool:
    """Use the CPU's faster equivalents (same values) for `x`."""
    return CPU_FAST_PATHS and x.device.type == "cpu"


def _check_u8(x: Tensor) -> None:
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        raise TypeError(f"expected a uint8 [B,3,H,W] batch, got {x.dtype} {tuple(x.shape)}")


# --- colour ops: one LUT gather + one blend per round ------------------------------------------


class _Plan:
    """What the rounds need from the op codes and magnitudes [R,B], computed once per call:
    every per-image parameter from one table lookup and one multiply-add (`_PARAMS`), and each
    round's static LUT [R,B,1,256]: levels >= thr inverted (solarize, invert), the others the
    posterize row (8 bits: the levels themselves) times the scale (m for brightness, color and
    contrast, whose blends start from v * m)."""

    def __init__(self, code: Tensor, m: Tensor) -> None:
        k = _consts(code.device)
        a = _params(code, m)  # [R,B,P]
        base = k.poster[a[..., _P["row"]].long().clamp_(0, 8)].mul_(a[..., _P["scale"], None])
        static = torch.where(k.levels >= a[..., _P["thr"], None], k.inverted, base)
        self.static = static[:, :, None]  # [R,B,1,256]
        col = {name: a[..., _P[name]] for name in _PARAMS}
        self.alpha_c = col["alpha_c"][..., None, None]  # [R,B,1,1] (torchvision's 1 - factor)
        self.g_col = col["g_col"][..., None, None, None]  # [R,B,1,1,1]
        self.g_sh = col["g_sh"][..., None, None, None]
        self.block_auto = col["block_auto"][..., None, None]  # [R,B,1,1]
        self.block_eq = col["block_eq"][..., None, None]
        self.geo = a[..., _GEO]  # [R,B,5]


def _params(code: Tensor, m: Tensor) -> Tensor:
    """Every per-image parameter C + D * m [..., P] of op codes / magnitudes [...] (`_PARAMS`)."""
    t = _consts(code.device).aff[code]  # [..., 2, P]
    return torch.addcmul(t[..., 0, :], m[..., None], t[..., 1, :])


def _gray_floor(x: Tensor) -> Tensor:
    """torchvision's uint8 grayscale before rounding: floor(0.2989 R + 0.587 G + 0.114 B),
    [B,1,H,W] float, from levels [B,3,H,W] (any dtype)."""
    return x[:, 0].mul(0.2989).add_(x[:, 1], alpha=0.587).add_(x[:, 2], alpha=0.114).floor_()[:, None]


def _colour_round(idx: Tensor, small: Tensor, plan: _Plan, r: int, h: int, w: int) -> Tensor:
    """Round r of the colour ops: image i gets its op at its magnitude (geometric codes and
    identity leave it unchanged). idx, small: the round's input levels [B,C,H*W] (`_index`);
    returns the result clamped to 0..255 before truncation, float [B,C,H,W]: truncated (floor,
    or the next round's int64 conversion) it is torchvision's uint8 result."""
    b, c, _ = idx.shape
    k = _consts(idx.device)
    lv = k.levels
    cpu = _fast(idx)

    lo, hi, below = _stats(idx, small, cpu)
    gray = _gray_floor(idx.view(b, c, h, w))  # [B,1,H,W]
    mean = gray.mean((1, 2, 3)).view(b, 1, 1)

    # LUTs that need the statistics; each applies where its switch (`_Plan.block_*`) is below
    # the statistic, i.e. for its own op where torchvision does not leave the channel unchanged
    # autocontrast (torchvision: (v - min) / ((max - min) / 255), unchanged where max == min)
    spread = hi - lo
    auto = (lv - lo).div_(spread * (1.0 / 255))
    # equalize (PIL's LUT as torchvision computes it; unchanged where step == 0): the pixels
    # below the maximum set the step; (below + step // 2) // step, as floor((below + step / 2)
    # / step) on whole numbers (exact); clamped to 255 with the round's result
    if idx.shape[2] < EQUALIZE_FLOAT_PIXELS:  # whole numbers (and halves) exact in float32
        step = below.gather(2, hi).div(255.0, rounding_mode="floor")
        equal = torch.add(below, step, alpha=0.5).div_(step.clamp(min=1), rounding_mode="floor")
    else:  # huge channels: the same in int64
        step = below.gather(2, hi).div(255, rounding_mode="floor")
        equal = (below + step // 2).div_(step.clamp(min=1), rounding_mode="floor")
    # contrast: v * m + (1 - m) * mean, fused like torchvision's _blend (alpha 0: other ops)
    lut = torch.addcmul(plan.static[r], mean, plan.alpha_c[r])
    lut = torch.where(spread > plan.block_auto[r], auto, lut)
    lut = torch.where(step > plan.block_eq[r], equal, lut)
    y = lut.gather(2, idx).view(b, c, h, w)

    # blends (factor 1 - m, 0 = an exact identity): color with the gray image (y already holds
    # v * m), sharpness with the blur (y holds the input: its static LUT is the identity)
    out = torch.addcmul(y, gray, plan.g_col[r])
    if h > 2 and w > 2:
        out[:, :, 1:-1, 1:-1].addcmul_(_sharp_delta(y, cpu), plan.g_sh[r])
    return out.clamp_(0, 255)  # as torchvision's uint8 ops (and equalize's LUT) clamp


def _colour_rounds(x: Tensor, plan: _Plan) -> Tensor:
    """Every round of `plan` on uint8 x [B,C,H,W], each truncated into the next; the last
    round's result before truncation (float, clamped to 0..255)."""
    b, c, h, w = x.shape
    idx, small = _index(x.reshape(b, c, h * w), _fast(x))
    out = _colour_round(idx, small, plan, 0, h, w)
    for r in range(1, plan.static.shape[0]):  # each truncated to uint8 (values 0..255)
        idx, small = _index(out.view(b, c, h * w), _fast(x))
        out = _colour_round(idx, small, plan, r, h, w)
    return out


def _index(levels: Tensor, cpu: bool) -> tuple[Tensor, Tensor]:
    """Whole-number levels [B,C,N] (uint8, or float 0..255 truncated) as contiguous int64 (the
    LUT index) and as the narrowest integer type at hand (min / max on a CPU are ~20x faster on
    it; on a GPU the int64 index itself)."""
    if not cpu:
        return levels.to(torch.long, memory_format=torch.contiguous_format), levels
    small = levels.int() if levels.is_floating_point() else levels  # float -> int64 is slow here
    return small.to(torch.long, memory_format=torch.contiguous_format), small


def _stats(idx: Tensor, small: Tensor, cpu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per image and channel of int64 levels [B,C,N] (`small`: the same levels, see `_index`):
    min and max [B,C,1] (int64) and the pixels under each level [B,C,256] (equalize's cumulative
    histogram), for every image (static shapes). GPU: one sort (min and max are its ends, the
    counts its insertion points of the levels); CPU, where sorting is ~7x slower: a histogram,
    its cumulative sum and min / max (the same values)."""
    b, c, n = idx.shape
    if cpu:
        hist = torch.zeros(b, c, 257, dtype=torch.int32, device=idx.device)
        ones = torch.ones(1, dtype=torch.int32, device=idx.device).expand(b, c, n)
        hist[..., 1:].scatter_add_(2, idx, ones)
        lo, hi = small.amin(2, keepdim=True).long(), small.amax(2, keepdim=True).long()
        return lo, hi, hist.cumsum_(2)[..., :256]
    srt = idx.sort(2).values.contiguous()  # (already contiguous in eager; inductor may differ)
    return srt[..., :1], srt[..., -1:], torch.searchsorted(srt, _level_index(b, c, idx.device))


def _sharp_delta(x: Tensor, cpu: bool) -> Tensor:
    """torchvision's rounded sharpness blur of the interior minus the interior itself:
    round(3x3 sum / 13 + 4 centre / 13) - centre = floor((3x3 sum - 9 centre + 6.5) / 13). On
    integer levels the exact blur is never within 1/26 of a half (the 3x3 sum plus 4 centre
    plus 6.5 is never a multiple of 13), so this equals rounding torchvision's conv2d with the
    1/13, 5/13 kernel, whatever the summation order (one convolution with whole weights: exact
    even in TF32)."""
    if cpu:  # the convolution is ~15x slower there: separable slice sums (exact)
        rows = x[..., :-2] + x[..., 1:-1]
        rows += x[..., 2:]
        s = rows[:, :, :-2] + rows[:, :, 1:-1]
        s = s.add_(rows[:, :, 2:]).add_(x[:, :, 1:-1, 1:-1], alpha=-9.0).add_(6.5)
        return s.div_(13).floor_()  # s / 13 is >= 1/26 from a whole number: floor exact
    k = _consts(x.device)
    with torch.autocast(x.device.type, enabled=False):
        s = F.conv2d(x, k.sharp_w, k.sharp_b, groups=3)
    return s.div_(13, rounding_mode="floor")


def _colour_op(name: str):
    def op(x: Tensor, m: Tensor) -> Tensor:
        _check_u8(x)
        code = torch.full((1, x.shape[0]), _C[name], dtype=torch.long, device=x.device)
        plan = _Plan(code, m.to(device=x.device, dtype=torch.float32)[None])
        return _colour_rounds(x, plan).to(torch.uint8)

    op.__name__ = name
    return op


# --- geometric ops: one affine matrix per image, one grid_sample --------------------------------


def _matrices(p: Tensor, h: int, w: int) -> Tensor:
    """Inverse affine matrices [..., 3, 3] (output pixel -> input pixel, coordinates centred on
    the image, as torchvision's _get_inverse_affine_matrix) from the geometric magnitudes
    [..., 5] (`_params`' rotate .. translate_y columns; 0 for the other ops):
    rotate: counter-clockwise by m degrees; shear_x: x_in = x_out + m * y_out about the top-left
    corner; shear_y: y_in = y_out + m * x_out; translate_x / _y: content moves by m * W / m * H.
    An image draws one op per round, so each entry has one non-zero term: the matmul is exact
    and equals views.py's former per-op matrix."""
    k = _consts(p.device)
    rot = p[..., :1]  # radians
    v = torch.cat([torch.cos(rot), torch.sin(rot), p[..., 1:], k.one.expand_as(rot)], -1)
    return (v @ _geo_lin(h, w, p.device)).view(*p.shape[:-1], 3, 3)


def warp(x: Tensor, theta: Tensor, mode: str = "nearest") -> Tensor:
    """Per-sample affine warp, fill 0, on torchvision's grid (its _affine_grid, batched); theta
    [B,2,3] inverse matrices in centred pixel coordinates. uint8 is warped as float and rounded
    back (exact for nearest)."""
    b, c, h, w = x.shape
    dt = x.dtype if x.is_floating_point() else torch.float32
    base, half = _grid_base(h, w, x.device, dt)
    grid = base.expand(b, -1, -1).bmm(theta.to(dt).transpose(1, 2) / half).view(b, h, w, 2)
    out = F.grid_sample(x.to(dt), grid, mode=mode, padding_mode="zeros", align_corners=False)
    if x.dtype == torch.uint8:
        if mode != "nearest":
            out = out.round_()
        out = out.to(torch.uint8)
    return out


def _geometric_op(name: str):
    def op(x: Tensor, m: Tensor, mode: str = "nearest") -> Tensor:
        code = torch.full((x.shape[0],), _C[name], dtype=torch.long, device=x.device)
        geo = _params(code, m.to(device=x.device, dtype=torch.float32))[:, _GEO]
        return warp(x, _matrices(geo, x.shape[2], x.shape[3])[:, :2], mode)

    op.__name__ = name
    return op


OP_FNS = {name: _geometric_op(name) for name in GEOMETRIC} | {
    name: _colour_op(name) for name in _CODES if name not in GEOMETRIC}


def draw_ops(gen: torch.Generator, b: int, n_ops: int, max_ops: int = 0,
             device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Op codes [R,B] (long) and magnitudes [R,B] for R = max(n_ops, max_ops) rounds. Draws from
    `gen`, in this order: with max_ops > n_ops the batch's op count k ~ U{n_ops..max_ops} (rounds
    from k on are identity), then per round B op uniforms then B magnitude uniforms (on a CPU
    generator the same numbers as views.rand_augment)."""
    device = torch.device(device)
    _consts(device)  # built here, not inside a compiled step
    rounds = max(n_ops, max_ops)
    count = None
    if max_ops > n_ops:
        count = n_ops + torch.randint(0, max_ops - n_ops + 1, (1,), generator=gen, device=device)
    u = torch.rand(rounds, 2, b, generator=gen, device=device)
    return ops_from_uniforms(u, count)


def ops_from_uniforms(u: Tensor, count: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`draw_ops`' codes and magnitudes from its uniforms [R,2,B] (and its op count)."""
    k = _consts(u.device)
    code = (u[:, 0] * len(OPS)).long()
    if count is not None:
        active = torch.arange(u.shape[0], device=u.device)[:, None] < count
        code = torch.where(active, code, k.identity)
    r = k.ranges[code]  # [R,B,2] lo, span
    return code, r[..., 0] + r[..., 1] * u[:, 1]  # as views.rand_augment rounds it


def apply_ops(x: Tensor, code: Tensor, m: Tensor) -> Tensor:
    """Apply op codes / magnitudes [R,B] (from draw_ops) to uint8 x: the colour ops round by round,
    then all geometric ops of every round composed into one warp (see the module docstring)."""
    out = apply_ops_levels(x, code, m)
    return out if out.dtype == torch.uint8 else out.to(torch.uint8)


def apply_ops_levels(x: Tensor, code: Tensor, m: Tensor) -> Tensor:
    """`apply_ops` without the final conversion: float32 holding the uint8 levels (whole numbers
    0..255, exactly `apply_ops`' values), or x itself when there are no rounds."""
    _check_u8(x)
    rounds = code.shape[0]
    if rounds == 0:
        return x
    h, w = x.shape[2:]
    plan = _Plan(code, m)
    out = _colour_rounds(x, plan)
    mats = _matrices(plan.geo, h, w)  # [R,B,3,3]
    total = mats[0]
    for r in range(1, rounds):
        total = total.bmm(mats[r])  # round 0's op applies first: input = T0 T1 ... output
    return warp(out.floor_(), total[:, :2])  # nearest on whole numbers: whole numbers


def rand_augment(x: Tensor, gen: torch.Generator, n_ops: int, max_ops: int = 0) -> Tensor:
    """RandAugment on a uint8 [B,3,H,W] batch -> uint8: `n_ops` ops per image (or a per-batch
    count in [n_ops, max_ops]), ops and magnitudes drawn per image from `gen` (a generator on
    x's device). A fixed kernel sequence for given (n_ops, max_ops); no host sync."""
    code, m = draw_ops(gen, x.shape[0], n_ops, max_ops, x.device)
    return apply_ops(x, code, m)


def cutout(x: Tensor, gen: torch.Generator, max_frac: float, fill: float = 0.5,
           levels: bool = False) -> Tensor:
    """Per-sample square Cutout of side v * max_frac * H at a uniform centre (v ~ U(0,1); draws
    [B,3] from `gen` on x's device), clipped at the border, filled with `fill` (on [0, 1]; uint8
    images get round(255 * fill), float `levels` on the 0..255 scale 255 * fill)."""
    return apply_cutout(x, torch.rand(x.shape[0], 3, generator=gen, device=x.device), max_frac, fill,
                        levels)


def apply_cutout(x: Tensor, r: Tensor, max_frac: float, fill: float = 0.5, levels: bool = False
                 ) -> Tensor:
    """`cutout` with its [B,3] uniforms given (side, centre y, centre x). `levels`: a float
    batch on the 0..255 scale (the fill is then 255 * fill)."""
    b, _, h, w = x.shape
    centres, which, size = _cutout_axes(h, w, x.device)
    # |pixel centre - square centre| < half side, rows and columns at once ([B, H+W])
    near = (centres - r[:, which] * size).abs_() < r[:, :1] * (max_frac * h / 2)
    inside = near[:, None, :h, None] & near[:, None, None, h:]
    value = 255 * fill if levels else fill if x.is_floating_point() else round(255 * fill)
    return x.masked_fill(inside, value)
