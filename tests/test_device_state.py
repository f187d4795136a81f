"""Issue 19: the EMA update in a few foreach launches, and component state (BMB's memory,
`align`'s p_model, `consistency`'s table) made on the run's device, never copied in a step."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

import ltframe  # noqa: F401  (registers the CIFAR backbones)
from ltframe.engine.ema import EMA
from ltframe.models import LTModel, build_backbone
from ltframe.probes import OpCounter


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
