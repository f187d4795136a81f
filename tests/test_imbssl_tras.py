"""TRAS (Stomach-ache/TRAS train.py): the base pseudo-labels and the TRAS loss on fixed inputs
against a loop version of the code's rule (compute_adjustment, T_logit, balanced_softmax_loss,
KL), USB's flipped sign and self target (semilearn/imb_algorithms/tras), the warm-up epoch
switch, parameter bounds and the pairing of loss and labeler."""

import math

import pytest
import torch

from ltframe import start_run
from ltframe.engine.context import StepContext
from ltframe.errors import LtframeError
from ltframe.plugins import make_plugin_manager
from ltframe.testing import tiny_recipe
from ltframe_imbssl.tras import KEY, adjustment, transfer_scale

C = 3
COUNTS = torch.tensor([30, 10, 5])


def _reg():
    return make_plugin_manager()[1]


def _labeler(**kw):
    reg = _reg()
    spec = reg.spec("pseudo_labeler", {"name": "tras", **kw}, "pseudo_labeler")
    return reg.build(spec, num_classes=C, class_counts=COUNTS, labeled_counts=COUNTS)


def _loss(**kw):
    reg = _reg()
    spec = reg.spec("loss", {"name": "tras", **kw}, "loss")
    return reg.build(spec, num_classes=C, class_counts=COUNTS, labeled_counts=COUNTS)


def _ctx(epoch=20, seed=0, views=2, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    parts = ["labeled", "unlabeled:weak", "unlabeled:strong", "unlabeled:strong#2"][:2 + views]
    logits = {p: {h: scale * torch.randn(6 if p == "labeled" else 10, C, generator=g)
                  for h in ("main", "aux")} for p in parts}
    feats = {p: torch.zeros(v["main"].shape[0], 2) for p, v in logits.items()}
    return StepContext(step=0, epoch=epoch, num_classes=C, class_counts=COUNTS,
                       targets=torch.tensor([0, 1, 2, 0, 0, 1]), features_by_part=feats,
                       logits_by_part=logits)


def _lsm(row):
    z = max(row)
    lse = z + math.log(sum(math.exp(v - z) for v in row))
    return [v - lse for v in row]


def _la(sign="authors", tro=1.0):
    n = COUNTS.tolist()
    if sign == "usb":  # USB: log((n_min / n_c)^tro + 1e-12)
        return [math.log((min(n) / c) ** tro + 1e-12) for c in n]
    return [math.log((c / sum(n)) ** tro + 1e-12) for c in n]  # compute_adjustment


def _reference(ctx, la, target="base", thr=0.95, a=2.0, b=2.0):
    """train.py's loss_x_S + loss_u_S (T_logit, la_u, KL with T = 1), one sample at a time."""
    e = [math.exp(-v) for v in la]
    t_logit = [a * v / sum(e) + b for v in e]
    L, y = ctx.logits_by_part, ctx.targets.tolist()
    lab = L["labeled"]["aux"].tolist()
    total = sum(-_lsm([z + s for z, s in zip(lab[i], la, strict=True)])[y[i]] for i in range(6)) / 6
    weak = L["unlabeled:weak"]["aux"].tolist()
    strong = [p for p in L if p.startswith("unlabeled:strong")]
    acc = 0.0
    for part in strong:  # the code's mean over the concatenated views
        for j in range(10):
            pw = [math.exp(v) for v in _lsm(weak[j])]
            if max(pw) < thr:
                continue
            yhat = pw.index(max(pw))
            src = L[part]["main"][j].tolist() if target == "base" else weak[j]
            q = [math.exp(v) for v in _lsm([(z - t_logit[yhat] * s) / 2 for z, s in
                                            zip(src, la, strict=True)])]
            logp = _lsm(L[part]["aux"][j].tolist())
            acc += -sum(q[c] * logp[c] for c in range(C))
    return total + acc / (10 * len(strong))


@pytest.mark.parametrize("sign", ["authors", "usb"])
def test_pseudo_labels_are_post_hoc_adjusted(sign):
    lab = _labeler(threshold=0.7, la=sign)
    assert torch.allclose(lab.la, torch.tensor(_la(sign)))
    ctx = _ctx()
    pl = lab(ctx)
    weak = ctx.logits_by_part["unlabeled:weak"]["main"].tolist()
    la = _la(sign)
    for j in range(10):
        p = [math.exp(v) for v in _lsm([z - s for z, s in zip(weak[j], la, strict=True)])]
        assert int(pl.targets[j]) == p.index(max(p))
        assert float(pl.mask[j]) == float(max(p) >= 0.7)
    assert ctx.extras[KEY] is lab.la
    # the authors' adjustment favours tail classes, USB's the head classes
    flat = torch.zeros(1, C)
    ctx.logits_by_part["unlabeled:weak"]["main"] = flat.expand(10, C)
    assert int(lab(ctx).targets[0]) == (C - 1 if sign == "authors" else 0)


def test_adjustment_and_transfer_scale():
    pi = COUNTS.float() / COUNTS.sum()
    assert torch.allclose(adjustment(COUNTS, 1.0), pi.log())
    assert torch.allclose(adjustment(COUNTS, 2.0), 2 * pi.log(), atol=1e-5)
    usb = adjustment(COUNTS, 1.0, "usb")
    assert torch.allclose(usb, -pi.log() + pi.log()[-1], atol=1e-5)  # -log pi + a constant
    t = transfer_scale(pi.log(), 2.0, 2.0)
    assert torch.allclose(t, 2 * (1 / pi) / (1 / pi).sum() + 2)
    assert t[-1] > t[0]  # the authors' T grows toward the tail ...
    assert transfer_scale(usb, 2.0, 2.0)[0] > transfer_scale(usb, 2.0, 2.0)[-1]  # USB's to the head


@pytest.mark.parametrize("views", [1, 2])
@pytest.mark.parametrize("sign,target", [("authors", "base"), ("usb", "self"), ("authors", "self")])
def test_loss_is_the_code_rule_on_fixed_inputs(views, sign, target):
    lab, loss = _labeler(la=sign), _loss(threshold=0.6, target=target)
    ctx = _ctx(views=views)
    lab(ctx)
    want = _reference(ctx, _la(sign), target=target, thr=0.6)
    assert math.isclose(float(loss(ctx)), want, rel_tol=1e-5)


def test_a_and_b_and_temperature_change_the_targets():
    lab = _labeler()
    ctx = _ctx()
    lab(ctx)
    base = float(_loss(threshold=0.0)(ctx))
    assert math.isclose(float(_loss(threshold=0.0, a=1.0, b=0.5)(ctx)),
                        _reference(ctx, _la(), thr=0.0, a=1.0, b=0.5), rel_tol=1e-5)
    assert float(_loss(threshold=0.0, temperature=1.0)(ctx)) != base


def test_warm_up_epoch_switch():
    lab, loss = _labeler(), _loss(threshold=0.6, start_epoch=11)  # the code's epoch > 10
    for epoch, active in ((0, False), (10, False), (11, True), (30, True)):
        ctx = _ctx(epoch=epoch)
        lab(ctx)
        ctx.logits_by_part["labeled"]["aux"].requires_grad_(True)
        out = loss(ctx)
        if active:
            assert math.isclose(float(out.detach()), _reference(ctx, _la(), thr=0.6), rel_tol=1e-5)
        else:  # 0, but the TRAS head stays in the graph (zero gradient)
            assert float(out.detach()) == 0.0 and out.requires_grad
            out.backward()
            assert torch.equal(ctx.logits_by_part["labeled"]["aux"].grad, torch.zeros(6, C))
    usb = _loss(start_epoch=1, threshold=0.6)
    ctx = _ctx(epoch=1)
    lab(ctx)
    assert float(usb(ctx)) > 0


def test_the_default_starts_at_once():
    lab, loss = _labeler(), _loss(threshold=0.6)
    ctx = _ctx(epoch=0)
    lab(ctx)
    assert math.isclose(float(loss(ctx)), _reference(ctx, _la(), thr=0.6), rel_tol=1e-5)


def test_no_gradient_into_the_targets():
    lab, loss = _labeler(), _loss(threshold=0.0)
    ctx = _ctx()
    for part in ctx.logits_by_part.values():
        for z in part.values():
            z.requires_grad_(True)
    lab(ctx)
    loss(ctx).backward()
    L = ctx.logits_by_part
    assert L["unlabeled:strong"]["main"].grad is None  # the base head's strong logits: targets
    assert L["unlabeled:weak"]["aux"].grad is None  # mask and yhat
    assert L["unlabeled:strong"]["aux"].grad is not None and L["labeled"]["aux"].grad is not None


def test_bad_parameters_are_refused():
    reg = _reg()
    for bad in ({"threshold": 1.5}, {"a": -1.0}, {"b": 101.0}, {"temperature": 0.0},
                {"start_epoch": -1}, {"target": "weak"}):
        with pytest.raises(LtframeError):
            reg.spec("loss", {"name": "tras", **bad}, "stage[0].loss[2]")
    for bad in ({"tau": -0.5}, {"la": "minus"}, {"threshold": -0.1}):
        with pytest.raises(LtframeError):
            reg.spec("pseudo_labeler", {"name": "tras", **bad}, "stage[0].pseudo_labeler")
    with pytest.raises(LtframeError, match="head and base are both"):
        _loss(head="main")


def test_without_the_labeler_no_adjustment():
    """A hand-made context without the labeler's la (a run without it is refused first)."""
    ctx = _ctx()
    assert math.isclose(float(_loss(threshold=0.6)(ctx)), _reference(ctx, [0.0] * C, thr=0.6),
                        rel_tol=1e-5)


@pytest.mark.slow
def test_a_stage_without_the_tras_labeler_is_refused(tmp_path):
    over = {"model": {"heads": {"main": {"name": "linear"}, "aux": {"name": "linear"}},
                      "eval_head": "aux"},
            "data": {"split": {"name": "fraction", "labeled_fraction": 0.3}},
            "stage": [{"name": "tras", "epochs": 1, "steps_per_epoch": 2,
                       "data": "labeled+unlabeled",
                       "views": {"labeled": ["weak"], "unlabeled": ["weak", "strong"]},
                       "pseudo_labeler": {"name": "threshold"},
                       "loss": ["ce", "fixmatch", "tras"]}]}
    with pytest.raises(LtframeError, match=r"loss\[2\]: loss 'tras' uses the logit adjustment"):
        start_run(tiny_recipe(tmp_path, **over))
