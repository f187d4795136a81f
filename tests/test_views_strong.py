"""The `strong` view (and its weak / none siblings) at the view level: shape, dtype, range,
determinism, no ops == the weak view, Cutout inside the view, and the views' draws on the
generator's device.

The RandAugment ops themselves (uint8, against torchvision.transforms.v2.functional op by op,
draws replayed from the generator, Cutout's square) are tested in tests/test_augment.py.
"""

from __future__ import annotations

import torch

from ltframe.data import augment as A
from ltframe.data import views as V
from ltframe.testing import edge_case_images

B, H, W = 4, 32, 32
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)




U8 = edge_case_images(B, H, W)


def _strong(**params):
    return V.StrongView(V.StrongParams(**params), mean=MEAN, std=STD)


def _weak():
    return V.WeakView(V.WeakParams(), mean=MEAN, std=STD)


def test_views_reexport_the_augment_module():
    assert V.OPS == A.OPS and V.RANGES == A.RANGES and V.OP_FNS is A.OP_FNS
    assert V.rand_augment is A.rand_augment and V.cutout is A.cutout and V.warp is A.warp


def test_strong_view_shape_dtype_and_determinism():
    view = _strong(n_ops=2, max_ops=3)
    x = U8.repeat(4, 1, 1, 1)
    out = view(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(out, view(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, view(x, torch.Generator().manual_seed(1)))
    lo, hi = (0 - 0.5) / 0.25, (1 - 0.5) / 0.25
    assert out.min() >= lo - 1e-6 and out.max() <= hi + 1e-6  # ops keep values in [0, 1]
    # on the uint8 grid before normalisation (the ops are uint8 ops; Cutout's 0.5 is not)
    levels = (_strong(n_ops=3, cutout=0.0)(x, torch.Generator().manual_seed(0)) * 0.25 + 0.5) * 255
    assert (levels - levels.round()).abs().max() < 1e-3


def test_strong_view_is_flip_crop_randaugment_cutout_on_uint8():
    x = U8.repeat(3, 1, 1, 1)
    p = V.StrongParams(n_ops=2, max_ops=3, cutout=0.4)
    out = _strong(n_ops=2, max_ops=3, cutout=0.4)(x, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    y = V.flip_pad_crop(x, g, p.flip, p.pad, "reflect")
    y = A.rand_augment(y, g, p.n_ops, p.max_ops).float() / 255
    y = A.cutout(y, g, p.cutout)
    # normalised from the levels in one kernel: (y - 0.5) / 0.25 up to float rounding
    assert torch.allclose(out, (y - 0.5) / 0.25, atol=2e-6, rtol=0)


def test_strong_view_without_ops_or_cutout_is_the_weak_view():
    x = U8.repeat(2, 1, 1, 1)
    strong = _strong(n_ops=0, cutout=0.0)(x, torch.Generator().manual_seed(5))
    assert torch.equal(strong, _weak()(x, torch.Generator().manual_seed(5)))


def test_strong_view_cutout_fills_one_gray_square_over_the_weak_view():
    x = U8.repeat(16, 1, 1, 1)
    strong = _strong(n_ops=0, cutout=0.5)(x, torch.Generator().manual_seed(6))
    weak = _weak()(x, torch.Generator().manual_seed(6))
    gray = (0.5 - 0.5) / 0.25
    diff = strong != weak
    assert ((strong[diff] - gray).abs() < 1e-6).all()  # normalised 127.5 (float rounding)
    filled = (strong - gray).abs().lt(1e-6).all(1)  # [N,H,W]: where the square is
    assert filled.any()
    for i in range(x.shape[0]):
        m = filled[i] | diff[i].any(0)
        rows, cols = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        if len(rows):
            assert len(rows) <= 0.5 * H + 1 and len(cols) <= 0.5 * W + 1


def test_views_draw_on_the_generator_device_and_cache_constants():
    x = U8.repeat(2, 1, 1, 1)
    for view in (_strong(n_ops=2), _weak(), V.NoneView(V.NoneParams(), MEAN, STD),
                 V.ResizedCropView(V.ResizedCropParams(), MEAN, STD)):
        assert view.to("cpu") is view
        mean, std = view.constants(torch.device("cpu"))
        assert view.constants(torch.device("cpu"))[0] is mean  # built once per device
        out = view(x, torch.Generator().manual_seed(0))
        assert out.shape == x.shape and out.dtype == torch.float32
    assert not V.elsewhere(torch.Generator(), x) and not V.elsewhere(None, x)


def test_augmentation_generator_state_of_another_kind_reseeds_deterministically():
    """The trainer's generator lives on the run's device; a checkpoint's state of another kind
    of generator (e.g. a CPU state resumed on CUDA, whose Philox state is 16 bytes) seeds it
    deterministically instead of failing; a state of its own kind is restored as is."""
    from types import SimpleNamespace

    from ltframe.engine.trainer import Trainer

    def restored(state):
        t = SimpleNamespace(aug_gen=torch.Generator().manual_seed(123))
        Trainer._set_aug_state(t, state)
        return torch.rand(4, generator=t.aug_gen)

    own = torch.Generator().manual_seed(9)
    assert torch.equal(restored(own.get_state()), torch.rand(4, generator=own))
    philox = torch.arange(16, dtype=torch.uint8)  # not a CPU generator's state
    assert torch.equal(restored(philox), restored(philox))
    assert not torch.equal(restored(philox), restored(philox.flip(0)))


def test_flip_crop_table_equals_flip_then_pad_then_crop():
    """The views' one-gather flip + reflect-pad + crop (a per-size table of source pixels)
    equals flipping, padding and cropping, for every offset and both flips; sizes whose table
    would be large, padding the image cannot reflect, and zero padding take the general path."""
    g = torch.Generator().manual_seed(0)
    for (h, w), pad in (((32, 32), 4), ((8, 12), 3), ((5, 7), 1), ((6, 6), 0)):
        x = torch.randint(0, 256, (64, 3, h, w), dtype=torch.uint8, generator=g)
        u = torch.rand(3 * 64, generator=g)
        u[:4] = torch.tensor([0.0, 0.4999999, 0.5, 0.9999999])  # flip boundary
        f, off = u[:64], u[64:].view(64, 2)
        ref = V.apply_flip_pad_crop(x, f, off, pad, "reflect")
        got = V.apply_flip_pad_crop(x, f, off, pad, "reflect", u)
        assert torch.equal(got, ref)
        # the reference spelled out for one image: flip, pad, crop at floor(off * (2 pad + 1))
        i = 1
        o = (off[i] * (2 * pad + 1)).long()
        img = x[i].flip(2) if f[i] < 0.5 else x[i]
        if pad:
            img = torch.nn.functional.pad(img[None].float(), (pad,) * 4, mode="reflect")[0].byte()
        assert torch.equal(got[i], img[:, o[0]:o[0] + h, o[1]:o[1] + w])
    assert V._crop_table(4, 4, 4, torch.device("cpu")) is None  # reflect refuses pad >= size
    assert V._crop_table(224, 224, 4, torch.device("cpu")) is None  # too large: general path
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=g)
    u = torch.rand(12, generator=g)
    zeros = V.apply_flip_pad_crop(x, u[:4], u[4:].view(4, 2), 2, "zeros", u)
    assert torch.equal(zeros, V.apply_flip_pad_crop(x, u[:4], u[4:].view(4, 2), 2, "zeros"))
