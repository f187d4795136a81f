"""Issue 19: the EMA update in a few foreach launches, and component state (BMB's memory,
`align`'s p_model, `consistency`'s table) made on the run's device, never copied in a step."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

import ltframe  # noqa: F401  (registers the CIFAR backbones)
from ltframe.engine.context import StepContext
from ltframe.engine.ema import EMA
from ltframe.models import LTModel, build_backbone
from ltframe.plugins import make_plugin_manager
from ltframe.probes import OpCounter, SyncProbe
from ltframe.registry import KINDS
from ltframe_bmb.memory import draw_keys


def _model(seed: int = 0) -> LTModel:
    torch.manual_seed(seed)
    return LTModel(build_backbone("resnet32_cifar"), {"main": torch.nn.Linear(64, 5)})


def _train_a_little(model: LTModel, opt: torch.optim.Optimizer) -> None:
    model.train()
    x = torch.randn(4, 3, 16, 16)
    _, logits = model(x)
    logits["main"].square().mean().backward()
    opt.step()
    opt.zero_grad()


def _old_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """The EMA update before issue 19: foreach lerp of the parameters, a copy per buffer."""
    with torch.no_grad():
        pairs = list(zip(ema.parameters(), model.parameters(), strict=True))
        torch._foreach_lerp_([e for e, _ in pairs], [m.detach() for _, m in pairs], 1.0 - decay)
        for e, m in zip(ema.buffers(), model.buffers(), strict=True):
            e.copy_(m)


def test_ema_update_is_bit_identical_to_the_per_tensor_formula():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = EMA(model, 0.99)
    reference = copy.deepcopy(ema.module)
    for _ in range(4):
        _train_a_little(model, opt)
        ema.update()
        _old_update(reference, model, 0.99)
    got, want = ema.module.state_dict(), reference.state_dict()
    assert list(got) == list(want)  # checkpoint keys (and format) unchanged
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert got["backbone.bn1.num_batches_tracked"].item() == 4
    # the EMA really moved: not a copy of the model, not its start
    assert not torch.equal(got["heads.main.weight"], model.state_dict()["heads.main.weight"])


def test_ema_update_is_at_most_four_kernel_launches():
    model = _model()
    ema = EMA(model, 0.999)
    with OpCounter() as counter, counter.range("ema"):
        ema.update()
    ops = counter.counts["ema"]
    assert sum(ops.values()) <= 4, ops
    # one lerp over the float parameters, one copy per buffer dtype (float32 stats, int64 counters)
    assert ops == Counter({"_foreach_lerp_": 1, "_foreach_copy_": 2}), ops
    n_params = len(list(model.parameters()))
    n_bufs = len(list(model.buffers()))
    assert n_bufs > 60 and n_params > 60  # what was one copy_ per buffer


def test_ema_foreach_lists_have_one_dtype_each():
    """CUDA's foreach fast route (one launch per chunk) needs one dtype per call."""
    model = _model()
    ema = EMA(model, 0.9)
    for dst, src in [*ema._params, *ema._bufs]:
        assert len({t.dtype for t in dst + src}) == 1
        assert all(a.shape == b.shape and a.stride() == b.stride() for a, b in zip(dst, src, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_ema_update_does_not_sync_on_cuda():
    model = _model().cuda()
    ema = EMA(model, 0.99)
    torch.cuda.set_sync_debug_mode("error")
    try:
        ema.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --- component state on the device ------------------------------------------------------------
DEV = torch.device("cpu")  # a torch.device is "the run's device" to the probe (a string: the host)
COUNTS = [20, 5, 1]
_, REG = make_plugin_manager()


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(6, 4)
        self.heads = torch.nn.ModuleDict({"main": torch.nn.Linear(4, 3),
                                          "aux": torch.nn.Linear(4, 3)})


def _ctx(model: _Model, step: int, epoch: int = 0) -> StepContext:
    """A step's context with device inputs (made with device=, derived from the model)."""
    g = torch.Generator().manual_seed(100 + step)
    xl, xw = torch.randn(8, 6, generator=g, device=DEV), torch.randn(16, 6, generator=g, device=DEV)
    xs = xw + 0.1 * torch.randn(16, 6, generator=g, device=DEV)
    feats = {"labeled": model.body(xl), "unlabeled": model.body(xw),
             "unlabeled:strong": model.body(xs)}
    logits = {k: {h: 5 * model.heads[h](f) for h in ("main", "aux")} for k, f in feats.items()}
    idx = {"labeled": torch.randint(0, 30, (8,), generator=g, device=DEV)}
    return StepContext(step=step, epoch=epoch, num_classes=3, class_counts=None,
                       targets=torch.randint(0, 3, (8,), generator=g, device=DEV),
                       features_by_part=feats, logits_by_part=logits, indices_by_part=idx,
                       model=model)


SPECS = {
    "bmb": ("loss", {"name": "bmb", "threshold": 0.3, "size": 8, "get": 4}),
    "align_window": ("pseudo_labeler", {"name": "align", "threshold": 0.5, "window": 4,
                                        "head": "aux"}),
    "align_ema": ("pseudo_labeler", {"name": "align", "p_model": "ema", "head": "aux"}),
    "align_ratio": ("pseudo_labeler", {"name": "align", "ratio": 10.0, "head": "aux"}),
    "consistency": ("loss", {"name": "consistency", "head": "aux"}),
}


def _build(name: str, counts: torch.Tensor, with_device: bool):
    kind, table = SPECS[name]
    kw = {"device": DEV} if with_device else {}
    return REG.build(REG.spec(kind, table, kind), num_classes=3, class_counts=counts,
                     labeled_counts=counts, num_samples=30, seed=3, **kw)


def _out(result) -> list[torch.Tensor]:
    return [result] if isinstance(result, torch.Tensor) else [result.targets, result.mask]


@pytest.mark.parametrize("with_device", [True, False], ids=["device", "from_class_counts"])
@pytest.mark.parametrize("name", list(SPECS))
def test_component_state_is_made_on_the_device_and_never_copied_in_a_step(name, with_device):
    """Built with the run's device (the `device` keyword, or without it the device of
    `class_counts`, which the engine puts there), a component's steps have no host<->device
    sync, first step included, and a checkpoint restores its state on the device, bit-exact."""
    model = _Model()
    with SyncProbe(model, recording=False) as probe:
        # what the engine passes: counts on the device; without `device`, only the counts say it
        counts = torch.tensor(COUNTS, device=DEV) if with_device else \
            torch.tensor(COUNTS).to(DEV)
        comp = _build(name, counts, with_device)
        probe.recording = True
        for step in range(3):
            _out(comp(_ctx(model, step, epoch=step // 2)))
        probe.recording = False
        assert not probe.syncs(), "\n".join(r.line() for r in probe.syncs())
        # a checkpoint: host tensors, loaded outside the step into a new component
        saved = {k: v.detach().cpu() for k, v in comp.state_dict().items()}
        other = _build(name, counts, with_device)
        other.load_state_dict(saved)
        probe.recording = True
        outs = [(_out(comp(_ctx(model, step, epoch=step // 2))),
                 _out(other(_ctx(model, step, epoch=step // 2)))) for step in range(3, 6)]
        probe.recording = False
        assert not probe.syncs(), "\n".join(r.line() for r in probe.syncs())
        for want, got in outs:
            assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
        for k, v in comp.state_dict().items():
            assert torch.equal(v, other.state_dict()[k]), k


def test_bmb_draws_equal_the_host_draws_they_replace():
    """On the CPU the device draws are the former CPU-generator draws, number for number."""
    w = torch.rand(50, generator=torch.Generator().manual_seed(1)) + 0.1
    got = draw_keys(w, torch.Generator(device=w.device).manual_seed(7))
    u = torch.rand(w.shape, generator=torch.Generator().manual_seed(7)).to(w.device).clamp_min(1e-12)
    assert torch.equal(got, u.log() / w.clamp_min(1e-6))


def test_bmb_state_device_and_generator():
    loss = _build("bmb", torch.tensor(COUNTS), with_device=True)
    assert loss.device == DEV and loss.estimate.device == DEV
    assert loss.labeled_counts.device == DEV and loss.labeled_counts.dtype == torch.float32
    assert loss._gen(3).device == DEV
    a = torch.rand(4, generator=loss._gen(3))
    assert torch.equal(a, torch.rand(4, generator=loss._gen(3)))  # a function of (seed, step)


def test_factories_take_the_device_keyword():
    for kind in ("pseudo_labeler", "loss", "transform"):
        assert "device" in KINDS[kind][1]
