"""The `strong` view's RandAugment ops against torchvision.transforms.v2.functional, op by op.

Each batched op runs once on a batch with one magnitude per image; the reference applies the
torchvision function to each image alone at the same magnitude. Tolerances:
- colour ops and bilinear warps: max abs diff <= 1e-5 (float32 rounding; the math is the same);
- nearest-neighbour warps (the ops' default): at most 0.5% of the values may differ by more than
  1e-5 (a source coordinate within float32 rounding of a pixel boundary may round either way;
  none does on these images today), and the mean abs diff stays <= 1/255;
- posterize and equalize are defined on uint8 levels, so they are compared with torchvision on
  the uint8 image (exactly, <= 1e-5 after / 255); posterize is also within 1/255 of
  torchvision's float kernel, which uses 2**bits levels instead of uint8 levels.
"""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ltframe.data import views as V

ATOL = 1e-5
B, H, W = 4, 32, 32


def _images() -> torch.Tensor:
    """4 seeded uint8 RGB images with different statistics: full-range noise, a low-contrast
    image, a smooth gradient with noise, and one with a two-level and a constant channel (the
    autocontrast / equalize edge cases)."""
    g = torch.Generator().manual_seed(0)
    u = torch.rand(B, 3, H, W, generator=g)
    x = torch.empty(B, 3, H, W)
    x[0] = u[0] * 255
    x[1] = 60 + u[1] * 80
    ramp = torch.linspace(0, 1, W)[None, None, :] * torch.linspace(0.2, 1, H)[None, :, None]
    x[2] = 20 + 150 * ramp + 40 * u[2]
    x[3] = torch.where(u[3] < 0.3, 10.0, 200.0)
    x[3, 1] = 30 + u[3, 1] * 100
    x[3, 2] = 77
    return x.round().clamp(0, 255).to(torch.uint8)


U8 = _images()
X = U8.float() / 255


def _geo_ref(name: str, m: float, mode: InterpolationMode):
    def affine(img, translate=(0.0, 0.0), shear=(0.0, 0.0), center=None):
        return TF.affine(img, angle=0.0, translate=list(translate), scale=1.0, shear=list(shear),
                         interpolation=mode, center=center)

    def shear_deg(v):
        return math.degrees(math.atan(v))

    return {
        "rotate": lambda img, u8: TF.rotate(img, m, interpolation=mode),
        "shear_x": lambda img, u8: affine(img, shear=(shear_deg(m), 0.0), center=[0, 0]),
        "shear_y": lambda img, u8: affine(img, shear=(0.0, shear_deg(m)), center=[0, 0]),
        "translate_x": lambda img, u8: affine(img, translate=(m * img.shape[-1], 0.0)),
        "translate_y": lambda img, u8: affine(img, translate=(0.0, m * img.shape[-2])),
    }[name]


def _ref(name: str, m: float):
    """torchvision's per-image function for op `name` at magnitude m, (float image, uint8 image)
    -> float image in [0, 1]."""
    if name in V._THETA:
        return _geo_ref(name, m, InterpolationMode.NEAREST)
    return {
        "identity": lambda img, u8: img,
        "brightness": lambda img, u8: TF.adjust_brightness(img, m),
        "color": lambda img, u8: TF.adjust_saturation(img, m),
        "contrast": lambda img, u8: TF.adjust_contrast(img, m),
        "sharpness": lambda img, u8: TF.adjust_sharpness(img, m),
        "posterize": lambda img, u8: TF.posterize(u8, int(m)).float() / 255,
        "solarize": lambda img, u8: TF.solarize(img, m),
        "autocontrast": lambda img, u8: TF.autocontrast(img),
        "equalize": lambda img, u8: TF.equalize(u8).float() / 255,
        "invert": lambda img, u8: TF.invert(img),
    }[name]


# Magnitudes per op: the extremes of RANGES plus interior values; beyond the drawn range where
# torchvision accepts it (enhance factors > 1, posterize 1-3 and 8 bits).
MAGNITUDES = {
    "rotate": [-30.0, -12.3, 7.7, 30.0],
    "shear_x": [-0.3, -0.11, 0.17, 0.3],
    "shear_y": [-0.3, -0.11, 0.17, 0.3],
    "translate_x": [-0.3, -0.1, 0.13, 0.3],
    "translate_y": [-0.3, -0.1, 0.13, 0.3],
    "brightness": [0.05, 0.4, 0.95, 1.6],
    "color": [0.05, 0.4, 0.95, 1.6],
    "contrast": [0.05, 0.4, 0.95, 1.6],
    "sharpness": [0.05, 0.4, 0.95, 1.9],
    "posterize": [1.0, 4.0, 5.5, 7.9, 8.0],
    "solarize": [0.0, 0.3, 0.7, 1.0],
    "autocontrast": [0.0],
    "equalize": [0.0],
    "invert": [0.0],
    "identity": [0.0],
}


def _check(name: str, out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == torch.float32
    d = (out - ref).abs()
    if name in V._THETA:  # nearest-neighbour warp: see the module docstring
        assert (d > ATOL).float().mean() <= 0.005, (name, (d > ATOL).float().mean())
        assert d.mean() <= 1 / 255, (name, d.mean())
    else:
        assert d.max() <= ATOL, (name, d.max())


def test_every_drawn_op_is_tested_and_ranges_are_usbs():
    assert set(V.OPS) <= set(MAGNITUDES) and set(V.OP_FNS) == set(MAGNITUDES)
    # USB's augment_list (invert is defined there but not drawn)
    assert V.RANGES == {
        "autocontrast": (0, 1), "brightness": (0.05, 0.95), "color": (0.05, 0.95),
        "contrast": (0.05, 0.95), "equalize": (0, 1), "identity": (0, 1), "posterize": (4, 8),
        "rotate": (-30, 30), "sharpness": (0.05, 0.95), "shear_x": (-0.3, 0.3),
        "shear_y": (-0.3, 0.3), "solarize": (0, 1),  # USB: [0, 256] on uint8
        "translate_x": (-0.3, 0.3), "translate_y": (-0.3, 0.3)}


@pytest.mark.parametrize("name", sorted(MAGNITUDES))
def test_op_matches_torchvision_at_each_magnitude(name):
    for m in MAGNITUDES[name]:
        out = V.OP_FNS[name](X.clone(), torch.full((B,), m))
        ref = torch.stack([_ref(name, m)(X[i], U8[i]) for i in range(B)])
        _check(name, out, ref)


@pytest.mark.parametrize("name", sorted(MAGNITUDES))
def test_op_is_per_sample_with_mixed_magnitudes(name):
    ms = MAGNITUDES[name]
    m = torch.tensor([ms[i % len(ms)] for i in range(B)])
    out = V.OP_FNS[name](X.clone(), m)
    ref = torch.stack([_ref(name, float(m[i]))(X[i], U8[i]) for i in range(B)])
    _check(name, out, ref)


@pytest.mark.parametrize("name", sorted(V._THETA))
def test_geometric_ops_bilinear_match_torchvision(name):
    ms = MAGNITUDES[name]
    m = torch.tensor([ms[i % len(ms)] for i in range(B)])
    out = V.OP_FNS[name](X, m, mode="bilinear")
    ref = torch.stack([_geo_ref(name, float(m[i]), InterpolationMode.BILINEAR)(X[i], U8[i])
                       for i in range(B)])
    assert (out - ref).abs().max() <= ATOL


def test_posterize_is_within_a_level_of_torchvisions_float_kernel():
    for bits in (1, 4, 7):
        out = V.OP_FNS["posterize"](X, torch.full((B,), float(bits)))
        assert (out - TF.posterize(X, bits)).abs().max() <= 1 / 255


def test_rand_augment_draws_ops_and_magnitudes_as_documented():
    """One round of rand_augment equals, per image, torchvision's op at the magnitude drawn
    from RANGES (ops and magnitudes replayed from the same generator)."""
    n = 96
    g = torch.Generator().manual_seed(3)
    u8 = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)
    u8[: n // 2] = u8[: n // 2] // 3 + 40  # low-contrast half: autocontrast / equalize act
    x = u8.float() / 255
    g = torch.Generator().manual_seed(7)
    replay = torch.Generator().manual_seed(7)
    out = V.rand_augment(x.clone(), g, 1)
    op = (torch.rand(n, generator=replay) * len(V.OPS)).long()
    u = torch.rand(n, generator=replay)
    assert set(op.tolist()) == set(range(len(V.OPS)))  # every op drawn at least once
    for i in range(n):
        name = V.OPS[int(op[i])]
        lo, hi = V.RANGES[name]
        m = lo + (hi - lo) * float(u[i])
        d = (out[i] - _ref(name, m)(x[i], u8[i])).abs()
        if name in V._THETA:
            assert (d > ATOL).float().mean() <= 0.005 and d.mean() <= 1 / 255, (name, m)
        else:
            assert d.max() <= ATOL, (name, m)


def _strong(**params):
    return V.StrongView(V.StrongParams(**params), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_strong_view_shape_dtype_and_determinism():
    view = _strong(n_ops=2, max_ops=3)
    x = U8.repeat(4, 1, 1, 1)
    out = view(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out, view(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, view(x, torch.Generator().manual_seed(1)))
    lo, hi = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
    assert out.min() >= lo - 1e-6 and out.max() <= hi + 1e-6  # ops keep values in [0, 1]


def test_strong_view_without_ops_or_cutout_is_the_weak_view():
    x = U8.repeat(2, 1, 1, 1)
    strong = _strong(n_ops=0, cutout=0.0)(x, torch.Generator().manual_seed(5))
    weak = V.WeakView(V.WeakParams(), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert torch.equal(strong, weak(x, torch.Generator().manual_seed(5)))


def test_cutout_fills_one_square_of_the_drawn_size():
    n, h, w, frac = 64, 32, 32, 0.5
    x = torch.zeros(n, 3, h, w)
    out = V.cutout(x, torch.Generator().manual_seed(11), frac, fill=0.5)
    r = torch.rand(n, 3, generator=torch.Generator().manual_seed(11))  # the draws cutout used
    side, cy, cx = r[:, 0] * frac * h, r[:, 1] * h, r[:, 2] * w
    assert set(out.unique().tolist()) <= {0.0, 0.5}
    mask = out == 0.5
    assert torch.equal(mask[:, 0], mask[:, 1]) and torch.equal(mask[:, 0], mask[:, 2])
    full = 0
    for i in range(n):
        m = mask[i, 0]
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        if len(rows) == 0:
            assert side[i] < 2  # a square under ~1 px may cover no pixel centre
            continue
        # one filled rectangle: its bounding box is entirely filled
        assert m.sum() == len(rows) * len(cols)
        assert rows[-1] - rows[0] + 1 == len(rows) and cols[-1] - cols[0] + 1 == len(cols)
        # side: the square [c - side/2, c + side/2] clipped to the image, to within a pixel
        for idx, c, size in ((rows, cy[i], h), (cols, cx[i], w)):
            expect = min(size, float(c + side[i] / 2)) - max(0.0, float(c - side[i] / 2))
            assert abs(len(idx) - expect) <= 1, (i, len(idx), expect)
            assert idx[0] <= c <= idx[-1] + 1
        full += int(len(rows) == len(cols))
    assert full > n // 3  # most squares are not clipped by the border
    assert V.cutout(x, torch.Generator().manual_seed(11), 0.0).eq(0).all()  # max side 0: no fill
