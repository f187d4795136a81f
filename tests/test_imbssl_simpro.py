"""SimPro (LeapLabTHU/SimPro SimPro/train.py): pseudo-labels, loss and the end-of-epoch prior
updates on fixed inputs against the code's expressions, the state round trip, bounds and the
errors (no unlabeled batches, the loss without its labeler)."""

import math

import pytest
import torch
import torch.nn.functional as F

from ltframe import start_run
from ltframe.engine.context import StepContext
from ltframe.errors import LtframeError
from ltframe.plugins import make_plugin_manager
from ltframe.testing import tiny_recipe

C = 3
COUNTS = torch.tensor([30, 10, 5])


def _reg():
    return make_plugin_manager()[1]


def _labeler(**kw):
    reg = _reg()
    return reg.build(reg.spec("pseudo_labeler", {"name": "simpro", **kw}, "pseudo_labeler"),
                     num_classes=C, class_counts=COUNTS, labeled_counts=COUNTS)


def _loss(**kw):
    reg = _reg()
    return reg.build(reg.spec("loss", {"name": "simpro", **kw}, "loss"), num_classes=C,
                     class_counts=COUNTS)


def _ctx(step=0, epoch=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    parts = {"labeled:weak": 6, "labeled:strong": 6, "unlabeled:weak": 10,
             "unlabeled:strong": 10, "unlabeled:strong#2": 10}
    logits = {p: {"main": 4 * torch.randn(n, C, generator=g)} for p, n in parts.items()}
    feats = {p: torch.zeros(n, 2) for p, n in parts.items()}
    return StepContext(step=step, epoch=epoch, num_classes=C, class_counts=COUNTS,
                       targets=torch.randint(0, C, (6,), generator=g), features_by_part=feats,
                       logits_by_part=logits)


def _reference(batches, tau=2.0, thr=0.5, ema_u=0.9):
    """train.py's epoch loop: adjustments at the epoch start, sums per step, updates after."""
    py_con = COUNTS.float() / COUNTS.sum()
    adapt, est = py_con.clone(), torch.ones(C) / C
    losses = []
    for steps in batches:
        adj_u = torch.log(est ** tau + 1e-12)
        adj = torch.log(adapt ** tau + 1e-12)
        dis, lab = torch.zeros(C), torch.zeros(C)
        for ctx in steps:
            L = ctx.logits_by_part
            pl = torch.softmax(L["unlabeled:weak"]["main"] + adj_u, dim=-1)
            mask = pl.max(-1).values.ge(thr)
            lab += torch.bincount(ctx.targets, minlength=C)
            dis += torch.sum(pl[mask], dim=0)
            m2 = torch.cat([mask, mask]).float()
            lu = (F.cross_entropy(torch.cat([L["unlabeled:strong"]["main"],
                                             L["unlabeled:strong#2"]["main"]]) + adj,
                                  torch.cat([pl, pl]), reduction="none") * m2).mean()
            lx = F.cross_entropy(torch.cat([L["labeled:weak"]["main"], L["labeled:strong"]["main"]])
                                 + adj, torch.cat([ctx.targets, ctx.targets]))
            losses.append(float(lx + lu))
        est = est * ema_u + dis / (dis.sum() + 1) * (1 - ema_u)
        fwd = lab + dis
        adapt = adapt * ema_u + fwd / fwd.sum() * (1 - ema_u)
    return losses, est, adapt


def test_labels_loss_and_prior_updates_against_the_code():
    labeler, loss = _labeler(threshold=0.5), _loss()
    batches = [[_ctx(step=e * 3 + s, epoch=e, seed=e * 3 + s) for s in range(3)] for e in range(4)]
    got = []
    for steps in batches:
        for ctx in steps:
            ctx.pseudo = labeler(ctx)
            got.append(float(loss(ctx)))
    want, est, adapt = _reference(batches)
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(got, want, strict=True))
    # the fourth epoch's sums are applied at the first step of a fifth
    labeler(_ctx(step=12, epoch=4, seed=99))
    assert torch.allclose(labeler.pi_u, est, atol=1e-6)
    assert torch.allclose(labeler.pi_a, adapt, atol=1e-6)
    assert not torch.allclose(labeler.pi_u, torch.ones(C) / C)
    # soft targets, mask 0/1
    pl = labeler(_ctx(step=13, epoch=4, seed=5))
    assert pl.targets.shape == (10, C) and set(pl.mask.tolist()) <= {0.0, 1.0}


def test_labeled_divisor():
    labeler = _labeler(threshold=1.0)  # nothing kept: only the labeled term
    ctx = _ctx()
    ctx.pseudo = labeler(ctx)
    assert torch.allclose(_loss(labeled_divisor=4.0)(ctx), _loss()(ctx) / 4)


def test_state_round_trip_is_bit_exact():
    a = _labeler(threshold=0.3)
    for step in range(5):
        a(_ctx(step=step, epoch=step // 2, seed=step))
    b = _labeler(threshold=0.3)
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    for step in range(5, 9):
        pa, pb = a(_ctx(step=step, epoch=step // 2, seed=step)), b(_ctx(step=step, epoch=step // 2,
                                                                      seed=step))
        assert torch.equal(pa.targets, pb.targets) and torch.equal(pa.mask, pb.mask)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_bad_parameters_are_refused():
    reg = _reg()
    for kind, bad in (("pseudo_labeler", {"tau": -1.0}), ("pseudo_labeler", {"threshold": 2.0}),
                      ("pseudo_labeler", {"ema_u": 1.0}), ("loss", {"labeled_divisor": 0.0})):
        with pytest.raises(LtframeError):
            reg.spec(kind, {"name": "simpro", **bad}, "stage[0]")


STAGE = {"name": "simpro", "epochs": 1, "steps_per_epoch": 2, "data": "labeled+unlabeled",
         "views": {"labeled": ["weak", "strong"], "unlabeled": ["weak", "strong"]},
         "pseudo_labeler": "simpro", "loss": ["simpro"]}


@pytest.mark.slow
def test_errors_before_the_run(tmp_path):
    ssl = {"split": {"name": "fraction", "labeled_fraction": 0.3}}
    no_unl = {**STAGE, "data": "labeled", "pseudo_labeler": None}
    no_unl.pop("pseudo_labeler")
    with pytest.raises(LtframeError, match=r"loss\[0\]: loss 'simpro' needs unlabeled batches"):
        start_run(tiny_recipe(tmp_path / "a", data=ssl, stage=[no_unl]))
    wrong = {**STAGE, "pseudo_labeler": "threshold"}
    with pytest.raises(LtframeError, match="set the stage's pseudo_labeler = \"simpro\""):
        start_run(tiny_recipe(tmp_path / "b", data=ssl, stage=[wrong]))
