"""DebiasPL (frank-xwang/debiased-pseudo-labeling main_DebiasPL.py): debiased pseudo-labels,
the q^ update and the adaptive marginal loss on fixed inputs against a loop version of the
authors' rule; USB's no-op update; state round trip; bounds; a stage without unlabeled data."""

import math

import pytest
import torch

from ltframe import start_run
from ltframe.engine.context import StepContext
from ltframe.errors import LtframeError, RecipeError
from ltframe.plugins import make_plugin_manager
from ltframe.testing import tiny_recipe

C = 3
WEAK = [torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.0], [-1.0, 0.0, 3.0], [1.5, 1.4, -2.0]]),
        torch.tensor([[1.0, 0.9, -2.0], [0.3, 2.5, 0.0], [3.0, -1.0, -1.0], [0.0, 0.0, 0.1]])]
STRONG = [torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]]),
          torch.tensor([[0.0, 1.0, 0.5], [2.0, 0.0, 0.0], [0.2, 0.1, 0.0], [0.0, 1.0, 1.0]])]


def _build(kind, **kw):
    reg = make_plugin_manager()[1]
    spec = reg.spec(kind, {"name": "debiaspl", **kw}, kind)
    return reg.build(spec, num_classes=C, class_counts=torch.tensor([6, 3, 1]),
                     labeled_counts=torch.tensor([6, 3, 1]), seed=0)


def _ctx(weak, strong):
    logits = {"unlabeled": weak, "unlabeled:weak": weak, "unlabeled:strong": strong}
    return StepContext(step=0, epoch=0, num_classes=C, class_counts=torch.tensor([6, 3, 1]),
                       targets=None, features_by_part={k: v for k, v in logits.items()},
                       logits_by_part={k: {"main": v} for k, v in logits.items()})


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def _reference(weak_steps, strong_steps, tau, thr, m):
    """The authors' train() loop: labels with the old q^, update q^, margin with the new q^."""
    qhat = [1.0 / C] * C
    out = []
    for weak, strong in zip(weak_steps, strong_steps, strict=True):
        labels, mask = [], []
        for row in weak.tolist():
            p = _softmax([z - tau * math.log(q) for z, q in zip(row, qhat, strict=True)])
            labels.append(max(range(C), key=lambda c: p[c]))
            mask.append(1.0 if max(p) >= thr else 0.0)
        probs = [_softmax(row) for row in weak.tolist()]
        mean = [sum(p[c] for p in probs) / len(probs) for c in range(C)]
        qhat = [m * q + (1 - m) * b for q, b in zip(qhat, mean, strict=True)]
        loss = 0.0
        for row, y, k in zip(strong.tolist(), labels, mask, strict=True):
            adj = [z + tau * math.log(q) for z, q in zip(row, qhat, strict=True)]
            loss += k * -math.log(_softmax(adj)[y])
        out.append((labels, mask, list(qhat), loss / len(labels)))
    return out


def test_labels_qhat_and_loss_follow_the_authors_rule():
    tau, thr, m = 1.0, 0.6, 0.5  # a fast q^ so the second step's debiasing is visible
    labeler = _build("pseudo_labeler", tau=tau, threshold=thr, momentum=m)
    loss = _build("loss")
    want = _reference(WEAK, STRONG, tau, thr, m)
    for weak, strong, (labels, mask, qhat, value) in zip(WEAK, STRONG, want, strict=True):
        ctx = _ctx(weak, strong)
        ctx.pseudo = labeler(ctx)
        assert ctx.pseudo.targets.tolist() == labels
        assert ctx.pseudo.mask.tolist() == mask
        assert torch.allclose(labeler.qhat, torch.tensor(qhat), atol=1e-6)
        assert loss(ctx).item() == pytest.approx(value, rel=1e-5)
    # q^ = [0.373, 0.299, 0.328] after step 1 flips row 0 of step 2 from class 0 to class 1
    assert WEAK[1].softmax(1).argmax(1).tolist() == [0, 1, 0, 2] and want[1][0] == [1, 1, 0, 2]


def test_usb_update_keeps_qhat_uniform_so_it_is_fixmatch():
    labeler = _build("pseudo_labeler", qhat="usb", tau=0.4, threshold=0.6)
    loss = _build("loss")
    for weak, strong in zip(WEAK, STRONG, strict=True):
        ctx = _ctx(weak, strong)
        ctx.pseudo = labeler(ctx)
        assert torch.allclose(labeler.qhat, torch.full((C,), 1 / C))
        conf, pred = weak.softmax(1).max(1)
        assert ctx.pseudo.targets.tolist() == pred.tolist()
        assert ctx.pseudo.mask.tolist() == (conf >= 0.6).float().tolist()
        ce = torch.nn.functional.cross_entropy(strong, pred, reduction="none")
        assert loss(ctx).item() == pytest.approx((ce * ctx.pseudo.mask).mean().item(), rel=1e-5)


def test_state_round_trip_is_bit_exact():
    a = _build("pseudo_labeler", momentum=0.9)
    a(_ctx(WEAK[0], STRONG[0]))
    b = _build("pseudo_labeler", momentum=0.9)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.qhat, b.qhat)
    ca, cb = _ctx(WEAK[1], STRONG[1]), _ctx(WEAK[1], STRONG[1])
    pa, pb = a(ca), b(cb)
    assert torch.equal(pa.targets, pb.targets) and torch.equal(a.qhat, b.qhat)
    assert torch.equal(ca.extras["debiaspl"], cb.extras["debiaspl"])
    with pytest.raises(LtframeError, match="saved 'qhat' has shape"):
        b.load_state_dict({"qhat": torch.zeros(5)})


@pytest.mark.parametrize("kw", [{"tau": -0.1}, {"threshold": 1.5}, {"momentum": 1.0},
                                {"qhat": "mean"}])
def test_parameters_are_bounded(kw):
    with pytest.raises(RecipeError, match="pseudo_labeler"):
        _build("pseudo_labeler", **kw)


def test_loss_without_its_labeler_is_a_clear_error():
    with pytest.raises(LtframeError, match="needs pseudo_labeler = \"debiaspl\""):
        _build("loss")(_ctx(WEAK[0], STRONG[0]))


def test_a_stage_without_unlabeled_data_is_refused_before_the_run(tmp_path):
    recipe = tiny_recipe(tmp_path, stage=[{"name": "s", "steps": 2, "pseudo_labeler": "debiaspl",
                                           "loss": [{"name": "ce"}]}])
    with pytest.raises(LtframeError, match="pseudo_labeler: an online pseudo-labeler needs unlabeled"):
        start_run(recipe)
