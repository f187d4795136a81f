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

How it stays lean and static (no host sync, fixed kernel sequence for a given n_ops):
- per round, every colour op is ONE per-sample, per-channel 256-entry lookup table (LUT) built on
  [B,3,256] (identity, autocontrast, equalize, brightness, contrast, posterize, solarize, invert)
  and applied with one ``gather`` of the uint8 levels (held in float32 between rounds, so a round
  converts nothing but its gather index); ``color`` / ``sharpness`` are per-sample blends whose
  factor is 1 (an exact identity) for the images that did not draw them; the statistics
  (histogram, min / max, mean gray) are computed for the whole batch in one pass each;
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
# LUTs that depend on the magnitude only, stacked in this order; other codes take the identity
_STATIC_LUTS = ("identity", "brightness", "posterize", "solarize", "invert")


class _Consts:
    """Per-device constants (built once; indexing and arithmetic on them never syncs)."""

    def __init__(self, device: torch.device) -> None:
        self.ranges = torch.tensor([RANGES[n] for n in OPS], device=device)  # [n_ops, 2] lo, hi
        self.ranges[:, 1] -= self.ranges[:, 0]  # -> lo, span
        static = [_STATIC_LUTS.index(n) if n in _STATIC_LUTS else 0 for n in _CODES]
        self.static_kind = torch.tensor(static, device=device)  # op code -> index in _STATIC_LUTS
        # op code -> one-hot over (rotate, shear_x, shear_y, translate_x, translate_y); the
        # rotation's entry converts degrees to radians (m * float32(pi / 180), as m * (pi / 180))
        sel = torch.tensor([[float(n == g) for g in GEOMETRIC] for n in _CODES], device=device)
        sel[:, 0] *= math.pi / 180
        self.geo_sel = sel
        self.levels = torch.arange(256, dtype=torch.float32, device=device)
        # posterize LUTs by kept bits b = 0..8 (b < 1 keeps 1 bit): floor(v / q) * q, q = 2^(8-b)
        q = torch.exp2(8 - torch.arange(9, device=device).clamp(1, 8).float())[:, None]
        self.poster = (self.levels / q).floor_().mul_(q)
        self.inverted = 255 - self.levels
        self.ones_i32 = torch.ones(1, dtype=torch.int32, device=device)
        self.one = torch.ones((), device=device)
        # a rotation's (cos, sin) -> its 3x3 matrix entries (the corner 1 added apart)
        self.trig = torch.tensor([[1.0, 0, 0, 0, 1, 0, 0, 0, 0], [0, -1, 0, 1, 0, 0, 0, 0, 0]], device=device)
        self.corner = torch.tensor([0.0, 0, 0, 0, 0, 0, 0, 0, 1], device=device)
        self.identity = torch.tensor(_C["identity"], device=device)
        self.zero = torch.zeros((), device=device)
        # op code -> flags (autocontrast, equalize, contrast, color, sharpness)
        flags = [[n == f for f in ("autocontrast", "equalize", "contrast", "color", "sharpness")]
                 for n in _CODES]
        self.flags = torch.tensor(flags, device=device)


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
    for fn in (_consts, _geo_lin, _grid_base, _cutout_axes):
        fn.cache_clear()
    _consts(torch.empty(0, device=device).device)


@_memo
def _geo_lin(h: int, w: int, device: torch.device) -> Tensor:
    """(cos, sin, shear_x, shear_y, translate_x, translate_y) -> the 9 matrix entries they give
    (a rotation's trigonometric part, then each op's magnitude times its entries)."""
    t = torch.zeros(6, 9, device=device)
    t[:2] = _consts(device).trig
    t[2, 1], t[2, 2] = 1.0, h / 2  # shear_x: x_in = x_out + m * (y_out + h / 2)
    t[3, 3], t[3, 5] = 1.0, w / 2  # shear_y: y_in = y_out + m * (x_out + w / 2)
    t[4, 2], t[5, 5] = -float(w), -float(h)  # translate: x_in = x_out - m * W (y: - m * H)
    return t


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


def _check_u8(x: Tensor) -> None:
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        raise TypeError(f"expected a uint8 [B,3,H,W] batch, got {x.dtype} {tuple(x.shape)}")


# --- colour ops: one LUT gather + one blend per round ------------------------------------------


class _Plan:
    """What the rounds need from the op codes and magnitudes [R,B], computed once per call."""

    def __init__(self, code: Tensor, m: Tensor) -> None:
        k = _consts(code.device)
        lv = k.levels
        m1 = m[..., None]  # [R,B,1]
        self.bright = lv * m1  # brightness LUT, also contrast's v * m
        # posterize: keep the top floor(m) bits (m > 0: truncation is the floor; <1 bit: 1 bit)
        poster = k.poster[m.long().clamp_(0, 8)]
        sol = torch.where(lv >= m1 * 255, k.inverted, lv)  # solarize: invert levels >= 255 m
        shape = self.bright.shape
        cands = torch.stack([lv.expand(shape), self.bright, poster, sol, k.inverted.expand(shape)])
        kind = k.static_kind[code][None, ..., None].expand(1, *shape)
        self.static = cands.gather(0, kind)[0][:, :, None]  # [R,B,1,256]
        self.contrast_alpha = (1 - m)[..., None, None]  # [R,B,1,1] (torchvision's 1 - factor)
        flags = k.flags[code][..., None, None]  # [R,B,5,1,1]
        self.is_auto, self.is_equal, self.is_contrast = flags[:, :, 0], flags[:, :, 1], flags[:, :, 2]
        f = torch.where(flags[:, :, 3:, :, :, None], m[..., None, None, None, None], k.one)  # 1: identity
        self.f_col, g = f[:, :, 0], 1 - f  # [R,B,1,1,1]
        self.g_col, self.g_sh = g[:, :, 0], g[:, :, 1]


def _gray_floor(xf: Tensor) -> Tensor:
    """torchvision's uint8 grayscale before rounding: floor(0.2989 R + 0.587 G + 0.114 B), [B,1,H,W]."""
    return xf[:, 0].mul(0.2989).add_(xf[:, 1], alpha=0.587).add_(xf[:, 2], alpha=0.114).floor_()[:, None]


def _colour_round(x: Tensor, plan: _Plan, r: int) -> Tensor:
    """Round r of the colour ops: image i gets its op at its magnitude (geometric codes and
    identity leave it unchanged). x float [B,3,H,W] holding uint8 levels (0..255 integers); the
    result is the same kind of batch, each op's result truncated to uint8 as torchvision does."""
    b, c, h, w = x.shape
    k = _consts(x.device)
    lv = k.levels
    flat = x.reshape(b, c, h * w)
    cpu = CPU_FAST_PATHS and x.device.type == "cpu"  # faster equivalents there (same values)
    idx = flat.int().long() if cpu else flat.long()

    # statistics of the round's input (for every image: static shapes)
    hist = torch.zeros(b, c, 256, dtype=torch.int32, device=x.device)
    hist.scatter_add_(2, idx, k.ones_i32.expand(b, c, h * w))
    if cpu:
        lo, hi = flat.amin(2, keepdim=True), flat.amax(2, keepdim=True)
    else:
        lo, hi = torch.aminmax(flat, dim=2, keepdim=True)
    gray = _gray_floor(x)  # [B,1,H,W]
    mean = gray.mean((1, 2, 3)).view(b, 1, 1)

    # LUTs that need the statistics (float values; clamp and truncation come at the end); a
    # channel they leave unchanged is not selected, so it keeps the op's static LUT (identity)
    # autocontrast (torchvision: (v - min) / ((max - min) / 255), unchanged where max == min)
    auto = (lv - lo).div_((hi - lo).mul_(1.0 / 255))
    # equalize (PIL's LUT as torchvision computes it; unchanged where step == 0): the pixels
    # below the maximum (all but the last non-empty bin) set the step
    below = hist.cumsum(2).sub_(hist)  # pixels under each level
    step = below.gather(2, hi.long()).div_(255, rounding_mode="floor")
    equal = (below + step // 2).div_(step.clamp(min=1), rounding_mode="floor")
    # contrast: v * m + (1 - m) * mean, fused like torchvision's _blend (add_ with alpha)
    contr = torch.addcmul(plan.bright[r][:, None], mean, plan.contrast_alpha[r])
    lut = torch.where(plan.is_contrast[r], contr, plan.static[r])
    lut = torch.where(plan.is_auto[r] & (hi != lo), auto, lut)
    lut = torch.where(plan.is_equal[r] & (step != 0), equal, lut)  # int levels -> float
    y = lut.expand(b, c, 256).gather(2, idx).view(b, c, h, w)

    # blends (factor 1 = an exact identity): color with the gray image, sharpness with the blur;
    # an image draws one op per round, so one clamp + truncation at the end serves every op
    out = torch.addcmul(y.mul_(plan.f_col[r]), gray, plan.g_col[r])
    if h > 2 and w > 2:
        inner = out[:, :, 1:-1, 1:-1]
        inner.addcmul_(_blur(x, cpu).sub_(inner), plan.g_sh[r])
    return out.clamp_(0, 255).floor_()  # = truncation to uint8 (floor_ is faster on CPU)


def _blur(x: Tensor, cpu: bool) -> Tensor:
    """torchvision's sharpness blur of the interior, rounded: round(3x3 sum / 13 + 4 centre / 13).
    On integer levels the exact value is never within 1/26 of a half, far above float32 rounding,
    so this equals rounding torchvision's conv2d with the 1/13, 5/13 kernel. The 3x3 sum (exact):
    one avg_pool2d kernel, or on CPU, where that is ~15x slower, separable slice sums."""
    if cpu:
        rows = x[..., :-2] + x[..., 1:-1]
        rows += x[..., 2:]
        s = rows[:, :, :-2] + rows[:, :, 1:-1]
        s = s.add_(rows[:, :, 2:]).div_(13)
    else:
        s = F.avg_pool2d(x, 3, stride=1, divisor_override=13)
    return s.add_(x[:, :, 1:-1, 1:-1], alpha=4 / 13).round_()


def _colour_op(name: str):
    def op(x: Tensor, m: Tensor) -> Tensor:
        _check_u8(x)
        code = torch.full((1, x.shape[0]), _C[name], dtype=torch.long, device=x.device)
        plan = _Plan(code, m.to(device=x.device, dtype=torch.float32)[None])
        return _colour_round(x.float(), plan, 0).to(torch.uint8)

    op.__name__ = name
    return op


# --- geometric ops: one affine matrix per image, one grid_sample --------------------------------


def _matrices(code: Tensor, m: Tensor, h: int, w: int) -> Tensor:
    """Inverse affine matrices [..., 3, 3] (output pixel -> input pixel, coordinates centred on
    the image, as torchvision's _get_inverse_affine_matrix) of the geometric op drawn at each
    position of `code` (identity elsewhere):
    rotate: counter-clockwise by m degrees; shear_x: x_in = x_out + m * y_out about the top-left
    corner; shear_y: y_in = y_out + m * x_out; translate_x / _y: content moves by m * W / m * H.
    Each entry has one non-zero term, so it equals views.py's per-op matrix exactly."""
    k = _consts(code.device)
    p = k.geo_sel[code] * m[..., None]  # [..., 5]: the drawn op's magnitude in its column
    rot = p[..., :1]  # radians
    v = torch.cat([torch.cos(rot), torch.sin(rot), p[..., 1:]], -1)
    # one non-zero term per entry (an image draws one op per round): the matmul is exact
    return (v @ _geo_lin(h, w, code.device)).add_(k.corner).view(*m.shape, 3, 3)


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
        mm = m.to(device=x.device, dtype=torch.float32)
        return warp(x, _matrices(code, mm, x.shape[2], x.shape[3])[:, :2], mode)

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
    if code.shape[0] == 0:
        return x
    plan = _Plan(code, m)
    xf = x.float()
    for r in range(code.shape[0]):
        xf = _colour_round(xf, plan, r)
    mats = _matrices(code, m, x.shape[2], x.shape[3])  # [R,B,3,3]
    total = mats[0]
    for r in range(1, code.shape[0]):
        total = total.bmm(mats[r])  # round 0's op applies first: input = T0 T1 ... output
    return warp(xf, total[:, :2])  # nearest on whole numbers: whole numbers


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
