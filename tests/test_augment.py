"""ltframe.data.augment (lean uint8 RandAugment) against torchvision.transforms.v2.functional.

The op-by-op comparisons (formerly of views.py's float ops, now removed): each batched op runs once on a
uint8 batch with one magnitude per image; the reference applies the torchvision function to each
uint8 image alone at the same (float32) magnitude. Tolerances as there, on the [0, 1] scale:
- colour ops: max abs diff <= 1e-5, i.e. the same uint8 levels as torchvision's uint8 kernels;
- bilinear warps (float images): max abs diff <= 1e-5;
- nearest-neighbour warps: at most 0.5% of the values may differ by more than 1e-5, mean abs diff
  <= 1/255 (none differs on these images today).
Plus: draws replayed from the generator, determinism, the composed warp's documented behaviour,
Cutout, and a check that a call makes no host synchronisation.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ltframe.data import augment as A
from ltframe.data import views as V
from ltframe.testing import edge_case_images

ATOL = 1e-5
B, H, W = 4, 32, 32




U8 = edge_case_images(B, H, W)
X = U8.float() / 255


@pytest.fixture(autouse=True, params=[True, False], ids=["cpu-paths", "cuda-paths"])
def fast_paths(request, monkeypatch):
    """Every test runs twice: with the CPU's faster equivalents and with the kernel sequence
    a GPU runs (e.g. the sharpness blur as one whole-weight convolution): both equal torchvision."""
    monkeypatch.setattr(A, "CPU_FAST_PATHS", request.param)
    return request.param


def _geo_ref(name: str, m: float, mode: InterpolationMode):
    def affine(img, translate=(0.0, 0.0), shear=(0.0, 0.0), center=None):
        return TF.affine(img, angle=0.0, translate=list(translate), scale=1.0, shear=list(shear),
                         interpolation=mode, center=center)

    def shear_deg(v):
        return math.degrees(math.atan(v))

    return {
        "rotate": lambda img: TF.rotate(img, m, interpolation=mode),
        "shear_x": lambda img: affine(img, shear=(shear_deg(m), 0.0), center=[0, 0]),
        "shear_y": lambda img: affine(img, shear=(0.0, shear_deg(m)), center=[0, 0]),
        "translate_x": lambda img: affine(img, translate=(m * img.shape[-1], 0.0)),
        "translate_y": lambda img: affine(img, translate=(0.0, m * img.shape[-2])),
    }[name]


def _ref(name: str, m: float):
    """torchvision's per-image function for op `name` at the float32 magnitude m, uint8 -> uint8."""
    m = float(torch.tensor(m, dtype=torch.float32))  # the value the batched op receives
    if name in A.GEOMETRIC:
        return _geo_ref(name, m, InterpolationMode.NEAREST)
    return {
        "identity": lambda img: img,
        "brightness": lambda img: TF.adjust_brightness(img, m),
        "color": lambda img: TF.adjust_saturation(img, m),
        "contrast": lambda img: TF.adjust_contrast(img, m),
        "sharpness": lambda img: TF.adjust_sharpness(img, m),
        "posterize": lambda img: TF.posterize(img, int(m)),
        "solarize": lambda img: TF.solarize(img, float(torch.tensor(m) * 255)),
        "autocontrast": lambda img: TF.autocontrast(img),
        "equalize": lambda img: TF.equalize(img),
        "invert": lambda img: TF.invert(img),
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
    assert out.shape == ref.shape and out.dtype == ref.dtype == torch.uint8
    d = (out.float() - ref.float()).abs() / 255
    if name in A.GEOMETRIC:  # nearest-neighbour warp: see the module docstring
        assert (d > ATOL).float().mean() <= 0.005, (name, (d > ATOL).float().mean())
        assert d.mean() <= 1 / 255, (name, d.mean())
    else:
        assert d.max() <= ATOL, (name, d.max())


def test_every_drawn_op_is_tested_and_ranges_are_usbs():
    assert set(A.OPS) <= set(MAGNITUDES) and set(A.OP_FNS) == set(MAGNITUDES)
    # USB's augment_list (invert is defined there but not drawn)
    assert A.RANGES == {
        "autocontrast": (0, 1), "brightness": (0.05, 0.95), "color": (0.05, 0.95),
        "contrast": (0.05, 0.95), "equalize": (0, 1), "identity": (0, 1), "posterize": (4, 8),
        "rotate": (-30, 30), "sharpness": (0.05, 0.95), "shear_x": (-0.3, 0.3),
        "shear_y": (-0.3, 0.3), "solarize": (0, 1),  # USB: [0, 256] on uint8
        "translate_x": (-0.3, 0.3), "translate_y": (-0.3, 0.3)}


@pytest.mark.parametrize("name", sorted(MAGNITUDES))
def test_op_matches_torchvision_at_each_magnitude(name):
    for m in MAGNITUDES[name]:
        out = A.OP_FNS[name](U8.clone(), torch.full((B,), m))
        ref = torch.stack([_ref(name, m)(U8[i]) for i in range(B)])
        _check(name, out, ref)


@pytest.mark.parametrize("name", sorted(MAGNITUDES))
def test_op_is_per_sample_with_mixed_magnitudes(name):
    ms = MAGNITUDES[name]
    m = torch.tensor([ms[i % len(ms)] for i in range(B)])
    out = A.OP_FNS[name](U8.clone(), m)
    ref = torch.stack([_ref(name, float(m[i]))(U8[i]) for i in range(B)])
    _check(name, out, ref)


@pytest.mark.parametrize("name", sorted(A.GEOMETRIC))
def test_geometric_ops_bilinear_match_torchvision(name):
    ms = MAGNITUDES[name]
    m = torch.tensor([ms[i % len(ms)] for i in range(B)])
    out = A.OP_FNS[name](X, m, mode="bilinear")
    ref = torch.stack([_geo_ref(name, float(m[i]), InterpolationMode.BILINEAR)(X[i]) for i in range(B)])
    assert (out - ref).abs().max() <= ATOL


def test_posterize_is_within_a_level_of_torchvisions_float_kernel():
    for bits in (1, 4, 7):
        out = A.OP_FNS["posterize"](U8, torch.full((B,), float(bits))).float() / 255
        assert (out - TF.posterize(X, bits)).abs().max() <= 1 / 255


@pytest.mark.parametrize("name", sorted(set(MAGNITUDES) - set(A.GEOMETRIC)))
def test_colour_ops_are_within_two_levels_of_torchvisions_float_kernels(name):
    """The uint8 ops differ from the float ops (torchvision's float kernels, which the former
    float implementation in views.py matched) by rounding only."""
    float_ref = {"identity": lambda img, m: img, "brightness": TF.adjust_brightness,
                 "color": TF.adjust_saturation, "contrast": TF.adjust_contrast,
                 "sharpness": TF.adjust_sharpness, "solarize": TF.solarize,
                 "autocontrast": lambda img, m: TF.autocontrast(img),
                 "invert": lambda img, m: TF.invert(img),
                 "posterize": lambda img, m: TF.posterize(img, int(m)),
                 "equalize": lambda img, m: TF.equalize(img)}[name]
    for m in MAGNITUDES[name]:
        new = A.OP_FNS[name](U8, torch.full((B,), m)).float() / 255
        old = torch.stack([float_ref(img, m) for img in X])
        assert (new - old).abs().max() <= 2 / 255 + ATOL, (name, m)


def _batch(n: int = 96, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=g)
    u8[: n // 2] = u8[: n // 2] // 3 + 40  # low-contrast half: autocontrast / equalize act
    return u8


def test_rand_augment_draws_ops_and_magnitudes_as_documented():
    """One round of rand_augment equals, per image, torchvision's op at the magnitude drawn from
    RANGES (ops and magnitudes replayed from the same generator, in views.py's draw order)."""
    u8 = _batch()
    n = u8.shape[0]
    out = A.rand_augment(u8.clone(), torch.Generator().manual_seed(7), 1)
    replay = torch.Generator().manual_seed(7)
    op = (torch.rand(n, generator=replay) * len(A.OPS)).long()
    u = torch.rand(n, generator=replay)
    assert set(op.tolist()) == set(range(len(A.OPS)))  # every op drawn at least once
    for i in range(n):
        name = A.OPS[int(op[i])]
        lo, hi = (torch.tensor(v, dtype=torch.float32) for v in A.RANGES[name])
        m = float(lo + (hi - lo) * u[i])
        d = (out[i].float() - _ref(name, m)(u8[i]).float()).abs() / 255
        if name in A.GEOMETRIC:
            assert (d > ATOL).float().mean() <= 0.005 and d.mean() <= 1 / 255, (name, m)
        else:
            assert d.max() <= ATOL, (name, m)


def test_draws_are_per_image_deterministic_and_old_compatible():
    g = torch.Generator().manual_seed(5)
    code, m = A.draw_ops(g, 64, 3, max_ops=5)
    replay = torch.Generator().manual_seed(5)
    count = 3 + int(torch.randint(0, 3, (1,), generator=replay))
    for r in range(5):
        op = (torch.rand(64, generator=replay) * len(A.OPS)).long()
        u = torch.rand(64, generator=replay)
        if r >= count:  # rounds past the batch's op count are identity
            assert code[r].eq(A.OPS.index("identity")).all()
            continue
        assert torch.equal(code[r], op)
        lo = torch.tensor([A.RANGES[A.OPS[i]][0] for i in op.tolist()])
        hi = torch.tensor([A.RANGES[A.OPS[i]][1] for i in op.tolist()])
        assert torch.equal(m[r], lo + (hi - lo) * u)
    x = _batch(32)
    out = A.rand_augment(x, torch.Generator().manual_seed(1), 2, 3)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out, A.rand_augment(x, torch.Generator().manual_seed(1), 2, 3))
    assert not torch.equal(out, A.rand_augment(x, torch.Generator().manual_seed(2), 2, 3))
    assert torch.equal(A.rand_augment(x, torch.Generator().manual_seed(1), 0), x)


def _apply(x: torch.Tensor, ops: list[tuple[str, float]]) -> torch.Tensor:
    """apply_ops with the same op list for every image."""
    n = x.shape[0]
    code = torch.tensor([[A.OPS.index(o)] * n for o, _ in ops])
    m = torch.tensor([[v] * n for _, v in ops])
    return A.apply_ops(x, code, m)


def test_colour_rounds_then_one_composed_warp():
    """Colour ops apply in the drawn order (exactly torchvision's sequence); the geometric ops
    apply after them as one warp: exactly torchvision's with one geometric op per image."""
    x = U8
    out = _apply(x, [("rotate", 12.0), ("equalize", 0.0), ("posterize", 5.0)])
    ref = torch.stack([_ref("rotate", 12.0)(TF.posterize(TF.equalize(img), 5)) for img in x])
    _check("rotate", out, ref)
    out = _apply(x, [("contrast", 0.3), ("sharpness", 0.2)])
    ref = torch.stack([TF.adjust_sharpness(TF.adjust_contrast(img, 0.3), 0.2) for img in x])
    _check("contrast", out, ref)
    # composed translations keep content a sequential warp would have filled with 0
    back = _apply(x, [("translate_x", 0.25), ("translate_x", -0.25)])
    assert torch.equal(back, x)
    seq = _ref("translate_x", -0.25)(_ref("translate_x", 0.25)(x))
    assert seq[..., -8:].eq(0).all()


def test_composed_warp_follows_the_drawn_order():
    """Non-commuting geometric ops compose in the drawn order: on a smooth image, where both hold
    content, the single warp is within ~1 level of torchvision's sequential nearest warps and far
    from the reversed order; they disagree on fill vs content for a few % of the pixels (content
    a sequential warp moved out and lost)."""
    ramp = torch.linspace(0, 255, W)[None, :] * torch.linspace(0.3, 1, H)[:, None]
    x = torch.stack([ramp, ramp.flip(1), ramp.t()])[None].round().to(torch.uint8)
    for ops in ([("rotate", 30.0), ("translate_x", 0.25), ("shear_y", 0.3)],
                [("shear_x", 0.3), ("shear_y", 0.3)]):
        out = _apply(x, ops)[0].float()
        seq, rev = x[0], x[0]
        for name, v in ops:
            seq = _ref(name, v)(seq)
        for name, v in reversed(ops):
            rev = _ref(name, v)(rev)
        seq, rev = seq.float(), rev.float()
        d_seq = (out - seq).abs()[(out > 0) & (seq > 0)].mean()
        d_rev = (out - rev).abs()[(out > 0) & (rev > 0)].mean()
        assert d_seq < 2 and d_rev > 4 * d_seq, (ops, d_seq, d_rev)
        assert ((out == 0) != (seq == 0)).float().mean() < 0.1


def test_cutout_fills_one_square_of_the_drawn_size():
    n, h, w, frac = 64, 32, 32, 0.5
    x = torch.zeros(n, 3, h, w)
    out = A.cutout(x, torch.Generator().manual_seed(11), frac, fill=0.5)
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
        assert m.sum() == len(rows) * len(cols)  # one filled rectangle
        assert rows[-1] - rows[0] + 1 == len(rows) and cols[-1] - cols[0] + 1 == len(cols)
        for idx, c, size in ((rows, cy[i], h), (cols, cx[i], w)):
            expect = min(size, float(c + side[i] / 2)) - max(0.0, float(c - side[i] / 2))
            assert abs(len(idx) - expect) <= 1, (i, len(idx), expect)
            assert idx[0] <= c <= idx[-1] + 1
        full += int(len(rows) == len(cols))
    assert full > n // 3  # most squares are not clipped by the border
    assert A.cutout(x, torch.Generator().manual_seed(11), 0.0).eq(0).all()  # max side 0: no fill
    u8 = A.cutout(torch.zeros(n, 3, h, w, dtype=torch.uint8), torch.Generator().manual_seed(11), frac)
    assert torch.equal(u8 == 128, mask) and u8.dtype == torch.uint8  # uint8: round(255 * 0.5)


class NoSync(TorchFunctionMode):
    """Fails on what would make a CUDA host wait or copy host data each call (a simple stand-in
    for the full detector): reading tensor values on the host, data-dependent shapes, and
    building tensors from host data with a device."""

    BANNED = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
              torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
              torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.unique,
              torch.unique, torch.masked_select, torch.Tensor.masked_select, torch.argwhere,
              torch.Tensor.any, torch.Tensor.all, torch.bincount}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.BANNED:
            raise AssertionError(f"host sync: {func.__name__}")
        if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None:
            raise AssertionError("host data copied to a device per call")
        if func is torch.Tensor.__getitem__:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                raise AssertionError("boolean-mask indexing (data-dependent shape)")
        return func(*args, **kwargs)


def test_no_host_sync_per_call():
    x = _batch(32)
    gen = torch.Generator().manual_seed(0)
    A.rand_augment(x, gen, 2, 3)  # first call per device builds the cached constants
    with NoSync():
        out = A.rand_augment(x, gen, 2, 3)
        A.cutout(out, gen, 0.5)
        for name, fn in A.OP_FNS.items():
            fn(x, torch.full((32,), MAGNITUDES[name][0]))
    with pytest.raises(AssertionError, match="host"), NoSync():  # the detector does detect
        torch.tensor([1.0], device=x.device)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    views = [V.NoneView(V.NoneParams(), mean, std), V.WeakView(V.WeakParams(), mean, std),
             V.ResizedCropView(V.ResizedCropParams(), mean, std),
             V.StrongView(V.StrongParams(n_ops=2, max_ops=3), mean, std)]
    for view in views:
        view.to(x.device)  # the trainer does this at stage set-up
    with NoSync():
        for view in views:
            view(x, gen)


def _strong_new(x: torch.Tensor, gen: torch.Generator, p: V.StrongParams) -> torch.Tensor:
    """The `strong` view spelled out on this module (flip + crop on uint8, RandAugment on uint8,
    then float, Cutout, normalisation)."""
    norm = V.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = V.flip_pad_crop(x, gen, p.flip, p.pad, "reflect")
    x = A.rand_augment(x, gen, p.n_ops, p.max_ops).float()  # uint8 levels
    if p.cutout > 0:
        x = A.cutout(x, gen, p.cutout, levels=True)  # gray 127.5
    out = norm.from_levels(x)
    # = (x / 255 - mean) / std, the usual normalisation, up to float rounding
    assert torch.allclose(out, norm(x / 255), atol=2e-6, rtol=0)
    return out


def test_strong_view_runs_on_this_module():
    """views.StrongView is this module's pipeline, draws included (the generator state after
    the view is the same)."""
    x = U8.repeat(8, 1, 1, 1)
    for p in (V.StrongParams(n_ops=0), V.StrongParams(n_ops=2), V.StrongParams(n_ops=2, max_ops=4)):
        g_view, g_new = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
        view = V.StrongView(p, mean=(0.5,) * 3, std=(0.25,) * 3)
        out = _strong_new(x, g_new, p)
        assert torch.equal(view(x, g_view), out)
        assert torch.equal(g_view.get_state(), g_new.get_state())
        assert out.shape == x.shape and out.min() >= -2 - 1e-6 and out.max() <= 2 + 1e-6


def test_rounds_clamp_beyond_the_drawn_ranges_and_equalize_is_exact_for_huge_channels(monkeypatch):
    """apply_ops with magnitudes outside RANGES (enhance factors > 1, posterize beyond 8 bits)
    clamps each round as torchvision's uint8 ops do; equalize's int64 path (channels of 2^23+
    pixels) gives the float path's LUT."""
    x = U8
    ops = [("brightness", 1.6), ("contrast", 1.9), ("posterize", 9.0), ("color", 1.7)]
    out = _apply(x, ops)
    ref = torch.stack([TF.adjust_saturation(TF.posterize(TF.adjust_contrast(
        TF.adjust_brightness(img, _f32(1.6)), _f32(1.9)), 8), _f32(1.7)) for img in x])
    assert torch.equal(out, ref)
    u8 = _batch(16)
    pairs = [[(name, 0.0), ("equalize", 0.0)] for name in ("equalize", "autocontrast")]
    want = [_apply(u8, ops) for ops in pairs]
    monkeypatch.setattr(A, "EQUALIZE_FLOAT_PIXELS", 1)
    assert all(torch.equal(_apply(u8, ops), w) for ops, w in zip(pairs, want, strict=True))


def _f32(m: float) -> float:
    return float(torch.tensor(m, dtype=torch.float32))
