"""ABC (LeeHyuck/ABC ABCcode0920/ABCfix.py): the auxiliary loss on fixed inputs against a loop
version of the authors' rule, the Bernoulli masks' probabilities, USB's hard targets, the
parameter bounds and the error on a stage without unlabeled batches."""

import math

import pytest
import torch

from ltframe import start_run
from ltframe.engine.context import StepContext
from ltframe.errors import LtframeError
from ltframe.plugins import make_plugin_manager
from ltframe.testing import tiny_recipe
from ltframe_imbssl.abc import balance_ratio, unlabeled_keep_prob

COUNTS = torch.tensor([40, 10, 4])


def _registry():
    return make_plugin_manager()[1]


def _build(**kw):
    reg = _registry()
    spec = reg.spec("loss", {"name": "abc", **kw}, "loss")
    return reg.build(spec, num_classes=3, class_counts=COUNTS, labeled_counts=COUNTS, seed=2)


def _ctx(step=0, epoch=0, views=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = {"labeled": {"aux": 3 * torch.randn(6, 3, generator=g)},
              "unlabeled:weak": {"aux": 4 * torch.randn(8, 3, generator=g)}}
    for v in range(views):
        name = "unlabeled:strong" if v == 0 else f"unlabeled:strong#{v + 1}"
        logits[name] = {"aux": 2 * torch.randn(8, 3, generator=g)}
    feats = {k: torch.zeros(v["aux"].shape[0], 2) for k, v in logits.items()}
    return StepContext(step=step, epoch=epoch, num_classes=3, class_counts=COUNTS,
                       targets=torch.tensor([0, 1, 2, 0, 2, 1]), features_by_part=feats,
                       logits_by_part=logits)


def _reference(ctx, m_lab, m_unl, threshold, soft=True):
    """ABCfix.py's abcloss + abcloss1 + abcloss2, one sample at a time."""
    def log_softmax(row):
        z = max(row)
        lse = z + math.log(sum(math.exp(v - z) for v in row))
        return [v - lse for v in row]

    lab = ctx.logits_by_part["labeled"]["aux"].tolist()
    y = ctx.targets.tolist()
    total = sum(-m_lab[i] * log_softmax(lab[i])[y[i]] for i in range(len(y))) / len(y)
    weak = ctx.logits_by_part["unlabeled:weak"]["aux"].tolist()
    for part in [p for p in ctx.logits_by_part if p.startswith("unlabeled:strong")]:
        strong = ctx.logits_by_part[part]["aux"].tolist()
        acc = 0.0
        for j in range(len(weak)):
            q = [math.exp(v) for v in log_softmax(weak[j])]
            k = q.index(max(q))
            if max(q) < threshold:
                continue
            ls = log_softmax(strong[j])
            acc += m_unl[j] * (-sum(q[c] * ls[c] for c in range(3)) if soft else -ls[k])
        total += acc / len(weak)
    return total


@pytest.mark.parametrize("targets", ["soft", "hard"])
def test_loss_is_the_authors_rule_on_fixed_inputs(targets):
    loss = _build(threshold=0.6, targets=targets)
    ctx = _ctx(step=3, epoch=7)
    q = ctx.logits_by_part["unlabeled:weak"]["aux"].softmax(1)
    m_lab, m_unl = loss.masks(ctx.targets, q.argmax(1), 7, 3)  # the same draws as the call
    want = _reference(ctx, m_lab.tolist(), m_unl.tolist(), 0.6, soft=targets == "soft")
    assert math.isclose(float(loss(ctx)), want, rel_tol=1e-5)
    # the masks are drawn from (seed, step): the same step gives the same masks
    a, b = loss.masks(ctx.targets, q.argmax(1), 7, 3), loss.masks(ctx.targets, q.argmax(1), 7, 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_one_strong_view_as_usb_and_the_strong_parameter():
    one = _build(threshold=0.0, targets="hard")
    ctx = _ctx(views=1)
    q = ctx.logits_by_part["unlabeled:weak"]["aux"].softmax(1)
    m_lab, m_unl = one.masks(ctx.targets, q.argmax(1), 0, 0)
    assert math.isclose(float(one(ctx)), _reference(ctx, m_lab.tolist(), m_unl.tolist(), 0.0,
                                                    soft=False), rel_tol=1e-5)
    # naming one part of two trains only that one
    named = _build(threshold=0.0, strong=["unlabeled:strong"])
    two = _ctx(views=2)
    only = {k: v for k, v in two.logits_by_part.items() if k != "unlabeled:strong#2"}
    ref = _ctx(views=2)
    ref.logits_by_part = only
    assert torch.equal(named(two), named(ref))


def test_mask_probabilities():
    ratio = balance_ratio(COUNTS)
    assert torch.allclose(ratio, torch.tensor([0.1, 0.4, 1.0]))
    assert torch.equal(unlabeled_keep_prob(ratio, 0, 500), torch.ones(3))  # epoch 0: all kept
    assert torch.allclose(unlabeled_keep_prob(ratio, 250, 500), torch.tensor([0.55, 0.7, 1.0]))
    assert torch.allclose(unlabeled_keep_prob(ratio, 500, 500), ratio)
    loss = _build()
    y = torch.tensor([0] * 4000 + [2] * 10)
    freq = torch.stack([loss.masks(y, y, 250, s)[0][:4000].mean() for s in range(5)]).mean()
    assert abs(float(freq) - 0.1) < 0.01
    m_lab, m_unl = loss.masks(y, y, 250, 0)
    assert m_lab[4000:].all() and m_unl[4000:].all()  # the rarest class is always kept
    assert abs(float(m_unl[:4000].mean()) - 0.55) < 0.03


def test_bad_parameters_are_refused():
    reg = _registry()
    for bad in ({"threshold": 1.5}, {"horizon": 0}, {"targets": "both"}, {"seed": -1}):
        with pytest.raises(LtframeError):
            reg.spec("loss", {"name": "abc", **bad}, "stage[0].loss[2]")


@pytest.mark.slow
def test_a_stage_without_unlabeled_batches_is_refused(tmp_path):
    over = {"model": {"heads": {"main": {"name": "linear"}, "aux": {"name": "linear"}},
                      "eval_head": "aux"},
            "stage": [{"name": "abc", "epochs": 1, "steps_per_epoch": 2, "data": "labeled",
                       "loss": ["ce", "abc"]}]}
    with pytest.raises(LtframeError, match=r"loss\[1\]: loss 'abc' needs unlabeled batches"):
        start_run(tiny_recipe(tmp_path, **over))
