"""SAW (ZJUJeffLai/SAW_SSL imbOptim/classWeights.py getClassWeights, train_fix_cifar10.py
SemiLoss): the effective-number weights, the weighted labeled and unlabeled terms and the
per-epoch update from stored pseudo-labels on fixed inputs against loop versions of the rule;
USB's pool counts; state round trip; bounds."""

import math

import pytest
import torch

from ltframe.engine.context import PoolPredictions, PseudoLabels, StepContext
from ltframe.errors import LtframeError, RecipeError
from ltframe.plugins import make_plugin_manager
from ltframe_imbssl.saw import effective_weights

C = 3
COUNTS = torch.tensor([100, 10, 1])


def _weights_loop(counts, beta=None, normalize=1.0):
    """getClassWeights, type "effective", with --normalize: beta given (imbOptim, const != 1)
    or (N - 1) / N."""
    if beta is None:
        mean = sum(counts) / len(counts)
        beta = (mean - 1) / mean
    counts = [1 if n == 0 else n for n in counts]
    w = [(1 - beta) / (1 - beta ** n) for n in counts]
    return [normalize * len(w) * v / sum(w) for v in w]


def _build(**kw):
    reg = make_plugin_manager()[1]
    spec = reg.spec("loss", {"name": "saw", **kw}, "loss")
    return reg.build(spec, num_classes=C, class_counts=COUNTS, labeled_counts=COUNTS,
                     num_samples=10, seed=0)


def test_effective_weights_match_the_loop():
    got = effective_weights(COUNTS, 0.99)
    assert torch.allclose(got, torch.tensor(_weights_loop([100, 10, 1], 0.99)), rtol=1e-5)
    # hand: 0.01 / (1 - 0.99^n) = 0.015774, 0.104583, 1.0 -> x 3 / 1.120357
    assert torch.allclose(got, torch.tensor([0.042238, 0.280048, 2.677714]), rtol=1e-4)
    auto = effective_weights(torch.tensor([30, 0, 3]), 0.0, normalize=2.0)
    assert torch.allclose(auto, torch.tensor(_weights_loop([30, 0, 3], None, 2.0)), rtol=1e-5)
    assert auto.sum().item() == pytest.approx(6.0)


def _ctx(epoch, weak, strong=None, idx=None, pseudo=None, targets=None, labeled=None):
    logits = {"unlabeled": weak, "unlabeled:weak": weak}
    if strong is not None:
        logits["unlabeled:strong"] = strong
    if labeled is not None:
        logits["labeled"] = labeled
    return StepContext(step=0, epoch=epoch, num_classes=C, class_counts=COUNTS, targets=targets,
                       features_by_part=dict(logits),
                       logits_by_part={k: {"main": v} for k, v in logits.items()},
                       indices_by_part={"unlabeled": idx} if idx is not None else {},
                       pseudo=pseudo)


def test_labeled_term_weights_each_sample_by_its_class():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, C, generator=g)
    y = torch.tensor([0, 1, 2, 0, 2])
    loss = _build(on="labeled")
    w = _weights_loop([100, 10, 1], 0.99)
    want = sum(w[t] * -math.log(torch.softmax(z[i], 0)[t].item()) for i, t in enumerate(y.tolist())) / 5
    got = loss(_ctx(0, z[:1], labeled=z, targets=y))
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_unlabeled_weights_follow_last_epochs_stored_pseudo_labels():
    loss = _build(on="unlabeled")
    eye = torch.eye(C) * 5
    # epoch 0: samples 0..5 predicted [0, 0, 0, 0, 1, 2], then sample 3 again as class 1
    for idx, cls in ((torch.tensor([0, 1, 2]), [0, 0, 0]), (torch.tensor([3, 4, 5]), [0, 1, 2]),
                     (torch.tensor([3]), [1])):
        weak = eye[cls]
        pl = PseudoLabels(torch.tensor(cls), torch.ones(len(cls)))
        value = loss(_ctx(0, weak, weak, idx, pl))
        assert torch.equal(loss.weights, torch.ones(C))  # uniform all through epoch 0
        assert value.item() == pytest.approx(torch.nn.functional.cross_entropy(weak, pl.targets).item(),
                                             rel=1e-6)
    assert loss.pred[:7].tolist() == [0, 0, 0, 1, 1, 2, -1]
    # epoch 1: counts [3, 2, 1] (unseen samples left out) -> weights of the loop
    strong = torch.tensor([[0.2, 0.1, 0.0], [0.0, 0.3, 0.1], [1.0, 0.0, 2.0]])
    pl = PseudoLabels(torch.tensor([0, 1, 2]), torch.tensor([1.0, 0.0, 1.0]))
    value = loss(_ctx(1, eye[[0, 1, 2]], strong, torch.tensor([6, 7, 8]), pl))
    w = _weights_loop([3, 2, 1], 0.99)
    assert torch.allclose(loss.weights, torch.tensor(w), rtol=1e-5)
    ce = torch.nn.functional.cross_entropy(strong, pl.targets, reduction="none").tolist()
    want = (w[0] * ce[0] * 1 + w[1] * ce[1] * 0 + w[2] * ce[2] * 1) / 3
    assert value.item() == pytest.approx(want, rel=1e-5)


def _usb_effective_weights(y_cnt):
    """semilearn/imb_algorithms/saw/utils.py effective_weights."""
    n = torch.sum(y_cnt) / len(y_cnt)
    beta = (n - 1) / n
    w = (1.0 - beta) / (1.0 - torch.pow(beta, y_cnt))
    return w / w.sum() * len(y_cnt)


def test_usb_pool_counts():
    loss = _build(on="unlabeled", counts="pool", beta=0.0)
    assert loss.pool_model == "ema" and loss.pred.numel() == 0
    assert _build(on="unlabeled").pool_model is None  # the authors' counts need no pass
    probs = torch.tensor([[0.9, 0.05, 0.05]] * 5 + [[0.1, 0.8, 0.1]] * 2)
    loss.epoch_pool(PoolPredictions(torch.arange(7), probs, C, COUNTS, 0, "s"), 0)
    want = _usb_effective_weights(torch.tensor([5.0, 2.0, 1.0]))  # class 2 absent: counted 1
    assert torch.allclose(loss.weights, want.float(), rtol=1e-5)


def test_state_round_trip_and_bounds():
    a = _build(on="unlabeled")
    eye = torch.eye(C)
    a(_ctx(0, eye, eye, torch.tensor([0, 1, 2]), PseudoLabels(torch.tensor([0, 1, 2]), torch.ones(3))))
    a(_ctx(1, eye, eye, torch.tensor([3, 4, 5]), PseudoLabels(torch.tensor([0, 1, 2]), torch.ones(3))))
    b = _build(on="unlabeled")
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.weights, b.weights) and torch.equal(a.pred, b.pred) and a.epoch == b.epoch
    with pytest.raises(LtframeError, match="saved 'pred' has shape"):
        b.load_state_dict({**a.state_dict(), "pred": torch.zeros(4, dtype=torch.long)})
    for kw in ({"beta": 1.0}, {"beta": -0.1}, {"normalize": 0.0}, {"on": "both"}):
        with pytest.raises(RecipeError, match="loss"):
            _build(**kw)
