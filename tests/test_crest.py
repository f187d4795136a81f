"""CReST's selection rule, its generations and the scheduler's errors."""

import dataclasses
import math

import pytest
import torch

from ltframe.config import ComponentSpec
from ltframe.data.longtail import ProfileCfg, SplitCfg, make_splits
from ltframe.engine.context import PoolPredictions
from ltframe.errors import RecipeError
from ltframe.plugins import make_plugin_manager
from ltframe.recipe import OptimCfg, StageCfg
from ltframe_crest.scheduler import Crest, CrestParams, temperature
from ltframe_crest.select import CrestSelect, CrestSelectParams, keep_rates, select_top

_, REG = make_plugin_manager()


def test_keep_rates_follow_formula_for_cifar10_lt_counts():
    # CIFAR-10-LT ratio 100, beta = 10%: labeled = ceil(0.1 * floor(5000 * 100^(-c/9)))
    n = [math.floor(5000 * 100 ** (-c / 9)) for c in range(10)]
    labeled = torch.tensor([math.ceil(0.1 * x) for x in n])
    rates = keep_rates(labeled, alpha=3)
    for c in range(10):
        assert rates[c].item() == pytest.approx((labeled[9 - c].item() / labeled[0].item()) ** (1 / 3))
    assert rates[0].item() == pytest.approx(0.01 ** (1 / 3))  # 5 / 500
    assert rates[9].item() == 1.0
    by_ratio = keep_rates(labeled, alpha=3, ratio=100)
    assert by_ratio[0].item() == pytest.approx(100 ** (-1 / 3))
    # unsorted classes: rates follow the rank by labeled count
    perm = torch.tensor([3, 0, 9, 1, 2, 4, 5, 6, 7, 8])
    assert torch.allclose(keep_rates(labeled[perm], 3), rates[perm])


def test_selection_counts_equal_floor_of_predicted_times_rate():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(5000, 10, generator=g) * 3, 1)
    rates = keep_rates(torch.tensor([500, 300, 180, 108, 65, 39, 23, 14, 9, 5]), alpha=3)
    pos, labels, conf = select_top(probs, rates)
    pred = probs.argmax(1)
    n_pred = torch.bincount(pred, minlength=10)
    assert torch.bincount(labels, minlength=10).tolist() == [
        math.floor(n_pred[c].item() * rates[c].item()) for c in range(10)]
    # the kept ones are the most confident of their predicted class
    for c in range(10):
        kept = conf[labels == c]
        rest = probs.max(1).values[(pred == c) & ~torch.isin(torch.arange(5000), pos)]
        if kept.numel() and rest.numel():
            assert kept.min() >= rest.max()
    sel = CrestSelect(CrestSelectParams(), 10, torch.tensor([500, 300, 180, 108, 65, 39, 23, 14, 9, 5]))
    out = sel.label_pool(PoolPredictions(torch.arange(5000) + 100, probs, 10,
                                         torch.zeros(10), 0, "g0"))
    assert torch.equal(out.index, pos + 100) and torch.equal(out.targets, labels)


def test_real_cifar10_lt_split_selection_counts():
    labels = torch.arange(10).repeat_interleave(5000)
    splits = make_splits(labels, 10, ProfileCfg(name="exp", ratio=100),
                         SplitCfg(name="fraction", labeled_fraction=0.1), 0, 0)
    counts = torch.bincount(labels[splits.labeled], minlength=10)
    n = [math.floor(5000 * 100 ** (-c / 9)) for c in range(10)]
    assert counts.tolist() == [math.ceil(0.1 * x) for x in n]
    assert splits.unlabeled.numel() == 12406 - int(counts.sum())


@dataclasses.dataclass
class _AlignLike:
    threshold: float = 0.95
    t: float = 1.0


@dataclasses.dataclass
class _NoT:
    threshold: float = 0.95


def _template(**kw):
    spec = ComponentSpec("pseudo_labeler", "align", _AlignLike())
    cfg = StageCfg(name="gen", data="labeled+unlabeled", pseudo_labeler=spec, **kw)
    return cfg, OptimCfg(ComponentSpec("optimizer", "sgd", None),
                         ComponentSpec("lr_schedule", "constant", None))


def test_generations_plan():
    s = Crest(CrestParams(generations=3), [_template()])
    plans = [s.next_stage([{}] * g) for g in range(3)]
    assert s.next_stage([{}] * 3) is None
    assert [p.cfg.data for p in plans] == ["labeled+unlabeled", "labeled+pseudo+unlabeled",
                                           "labeled+pseudo+unlabeled"]
    assert [p.cfg.label is not None for p in plans] == [True, True, False]
    assert plans[0].cfg.label.name == "crest_select" and plans[0].cfg.label.params.alpha == 3
    assert plans[0].cfg.reset == [] and plans[1].cfg.reset == ["backbone", "heads"]
    assert [p.cfg.pseudo_labeler.params.t for p in plans] == [1.0, 0.75, 0.5]
    fixed = Crest(CrestParams(generations=3, progressive=False), [_template()])
    assert fixed.next_stage([{}] * 2).cfg.pseudo_labeler.params.t == 1.0
    assert temperature(0, 6, 0.5) == 1.0 and temperature(5, 6, 0.5) == 0.5
    assert temperature(2, 6, 0.5) == pytest.approx(0.8)


def test_crest_bad_values():
    with pytest.raises(RecipeError, match="no unlabeled"):
        Crest(CrestParams(), [(StageCfg(data="labeled"), None)])
    with pytest.raises(RecipeError, match="one \\[\\[stage\\]\\] table per generation"):
        Crest(CrestParams(), [_template(), _template()])
    no_t = StageCfg(data="labeled+unlabeled",
                    pseudo_labeler=ComponentSpec("pseudo_labeler", "threshold", _NoT()))
    with pytest.raises(RecipeError, match="has none; use"):
        Crest(CrestParams(progressive=True), [(no_t, None)])
    Crest(CrestParams(progressive=False), [(no_t, None)])
    for table, match in (({"name": "crest", "generations": 0}, "generations"),
                         ({"name": "crest", "alpha": -1}, "alpha"),
                         ({"name": "crest", "t_min": 0}, "t_min")):
        with pytest.raises(RecipeError, match=match):
            REG.spec("scheduler", table, "scheduler")
