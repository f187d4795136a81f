"""Known values for the classic long-tailed losses (shared/METHODS.md)."""

import math

import pytest
import torch
import torch.nn.functional as F

from ltframe.engine.context import StepContext
from ltframe_classics.losses import cb_weights


def ctx_for(logits, targets, epoch=0, counts=(100, 10, 1)):
    parts = {"labeled": torch.zeros(len(targets), 2)}
    return StepContext(step=0, epoch=epoch, num_classes=logits.shape[1],
                       class_counts=torch.tensor(counts), targets=targets,
                       features_by_part=parts, logits_by_part={"labeled": {"main": logits}})


def build(registry, table, counts=(100, 10, 1)):
    return registry.build(registry.spec("loss", table, "loss"), num_classes=len(counts),
                          class_counts=torch.tensor(counts))


def test_cb_weights_effective_number():
    counts = torch.tensor([100, 10, 1])
    w = cb_weights(counts, 0.9)
    raw = torch.tensor([(1 - 0.9) / (1 - 0.9 ** n) for n in (100, 10, 1)])
    assert torch.allclose(w, raw / raw.sum() * 3, atol=1e-6)
    assert w.sum().item() == pytest.approx(3.0) and w[2] > w[1] > w[0]


def test_cb_ce_and_drw_switch(registry):
    logits = torch.randn(5, 3)
    y = torch.tensor([0, 1, 2, 0, 1])
    plain = build(registry, "ce")(ctx_for(logits, y))
    assert plain.item() == pytest.approx(F.cross_entropy(logits, y).item(), abs=1e-6)
    w = cb_weights(torch.tensor([100, 10, 1]), 0.9999)
    cb = build(registry, {"name": "ce", "reweight": "cb"})(ctx_for(logits, y))
    assert cb.item() == pytest.approx(F.cross_entropy(logits, y, weight=w).item(), abs=1e-6)
    drw = build(registry, {"name": "ce", "reweight": "drw", "drw_epoch": 3})
    assert drw(ctx_for(logits, y, epoch=2)).item() == pytest.approx(plain.item(), abs=1e-6)
    assert drw(ctx_for(logits, y, epoch=3)).item() == pytest.approx(cb.item(), abs=1e-6)


def test_focal_gamma_zero_is_ce_and_down_weights_easy_samples(registry):
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.1, 0.0]])
    y = torch.tensor([0, 1])
    f0 = build(registry, {"name": "focal", "gamma": 0.0})(ctx_for(logits, y))
    assert f0.item() == pytest.approx(F.cross_entropy(logits, y).item(), abs=1e-6)
    f1 = build(registry, {"name": "focal", "gamma": 1.0})(ctx_for(logits, y))
    ce = F.cross_entropy(logits, y, reduction="none")
    assert f1.item() == pytest.approx(((1 - torch.exp(-ce)) * ce).mean().item(), abs=1e-6)


def test_ldam_margins_and_logits(registry):
    loss = build(registry, {"name": "ldam", "max_margin": 0.5, "scale": 30.0})
    m = torch.tensor([100, 10, 1], dtype=torch.float64) ** -0.25
    assert torch.allclose(loss.margins.double(), m * 0.5 / m.max(), atol=1e-6)
    assert loss.margins.max().item() == pytest.approx(0.5)
    cos = torch.tensor([[0.5, 0.1, 0.2]])
    y = torch.tensor([1])
    expected = F.cross_entropy(30 * (cos - torch.tensor([[0.0, loss.margins[1], 0.0]])), y)
    assert loss(ctx_for(cos, y)).item() == pytest.approx(expected.item(), abs=1e-5)


def test_la_offsets_are_tau_log_prior(registry):
    loss = build(registry, {"name": "la", "tau": 1.0})
    prior = torch.tensor([100, 10, 1]) / 111
    assert torch.allclose(loss.offset, prior.log(), atol=1e-6)
    logits = torch.zeros(1, 3)
    y = torch.tensor([2])
    expected = -math.log(prior[2] / prior.sum())
    assert loss(ctx_for(logits, y)).item() == pytest.approx(expected, abs=1e-5)
