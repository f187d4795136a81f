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


# CB-focal as in kaidic/LDAM-DRW losses.py (FocalLoss / focal_loss), written out by hand:
# ce_w = w_y * CE, p = exp(-ce_w), loss = mean_i (1 - p)^gamma * ce_w.
FOCAL_LOGITS = [[2.0, 0.5, -1.0], [0.3, 1.2, 0.1], [-0.5, 0.0, 0.7], [1.5, -0.2, 0.4]]
FOCAL_TARGETS = [0, 1, 2, 2]


def _effective_number_weights(counts, beta):
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    return [r / sum(raw) * len(counts) for r in raw]


def _cb_focal_by_hand(logits, targets, weights, gamma):
    total = 0.0
    for row, y in zip(logits, targets, strict=True):
        ce = math.log(sum(math.exp(v) for v in row)) - row[y]
        ce_w = (weights[y] if weights else 1.0) * ce
        total += (1 - math.exp(-ce_w)) ** gamma * ce_w
    return total / len(targets)


@pytest.mark.parametrize("gamma", [1.0, 2.0])
def test_cb_focal_weight_inside_the_focal_factor_and_batch_mean(registry, gamma):
    counts = (100, 10, 1)
    w = _effective_number_weights(counts, 0.9999)
    expected = _cb_focal_by_hand(FOCAL_LOGITS, FOCAL_TARGETS, w, gamma)
    loss = build(registry, {"name": "focal", "gamma": gamma, "reweight": "cb"}, counts)
    got = loss(ctx_for(torch.tensor(FOCAL_LOGITS), torch.tensor(FOCAL_TARGETS))).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_focal_drw_switches_to_cb_focal_at_drw_epoch(registry):
    counts = (100, 10, 1)
    logits, y = torch.tensor(FOCAL_LOGITS), torch.tensor(FOCAL_TARGETS)
    loss = build(registry, {"name": "focal", "gamma": 1.0, "reweight": "drw", "drw_epoch": 160})
    plain = _cb_focal_by_hand(FOCAL_LOGITS, FOCAL_TARGETS, None, 1.0)
    cb = _cb_focal_by_hand(FOCAL_LOGITS, FOCAL_TARGETS, _effective_number_weights(counts, 0.9999),
                           1.0)
    assert loss(ctx_for(logits, y, epoch=159)).item() == pytest.approx(plain, rel=1e-5)
    assert loss(ctx_for(logits, y, epoch=160)).item() == pytest.approx(cb, rel=1e-5)
    unweighted = build(registry, {"name": "focal", "gamma": 1.0})(ctx_for(logits, y, epoch=200))
    assert unweighted.item() == pytest.approx(plain, rel=1e-5)


@pytest.mark.parametrize("name", ["ce", "ldam", "la"])
def test_weighted_ce_family_keeps_pytorchs_weighted_mean(registry, name):
    counts = (100, 10, 1)
    w = _effective_number_weights(counts, 0.9999)
    loss = build(registry, {"name": name, "reweight": "drw", "drw_epoch": 1}, counts)
    logits, y = torch.tensor(FOCAL_LOGITS), torch.tensor(FOCAL_TARGETS)
    z = loss.adjusted_logits(ctx_for(logits, y)).tolist()
    num = den = 0.0
    for row, t in zip(z, FOCAL_TARGETS, strict=True):
        ce = math.log(sum(math.exp(v) for v in row)) - row[t]
        num, den = num + w[t] * ce, den + w[t]
    assert loss(ctx_for(logits, y, epoch=1)).item() == pytest.approx(num / den, rel=1e-5)


@pytest.mark.parametrize("table", [
    {"name": "focal", "gamma": -1.0}, {"name": "ce", "beta": 1.0}, {"name": "ce", "drw_epoch": -1},
    {"name": "ldam", "scale": 0.0}, {"name": "ce", "label_smoothing": 1.5},
])
def test_loss_params_out_of_range_are_recipe_errors(registry, table):
    from ltframe.errors import RecipeError

    with pytest.raises(RecipeError, match="out of range"):
        registry.spec("loss", table, "loss")
