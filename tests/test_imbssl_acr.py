"""ACR (Gank0078/ACR train.py): the loss on fixed inputs against a loop version of the code's
rule, the estimate of u and the adaptive tau over epochs against the code's expressions (torch's
KLDivLoss, its index-assignment histogram), the state round trip, bounds and a stage without
unlabeled batches."""

import math

import pytest
import torch
import torch.nn.functional as F

from ltframe import start_run
from ltframe.engine.context import StepContext
from ltframe.errors import LtframeError
from ltframe.plugins import make_plugin_manager
from ltframe.testing import tiny_recipe
from ltframe_imbssl.acr import class_histogram

C = 3
COUNTS = torch.tensor([30, 10, 5])


def _build(**kw):
    reg = make_plugin_manager()[1]
    spec = reg.spec("loss", {"name": "acr", **kw}, "loss")
    return reg.build(spec, num_classes=C, class_counts=COUNTS, labeled_counts=COUNTS)


def _ctx(step=0, epoch=0, seed=0, views=2, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    parts = ["labeled", "unlabeled:weak", "unlabeled:strong", "unlabeled:strong#2"][:2 + views]
    logits = {p: {h: scale * torch.randn(6 if p == "labeled" else 10, C, generator=g)
                  for h in ("main", "aux")} for p in parts}
    feats = {p: torch.zeros(v["main"].shape[0], 2) for p, v in logits.items()}
    return StepContext(step=step, epoch=epoch, num_classes=C, class_counts=COUNTS,
                       targets=torch.tensor([0, 1, 2, 0, 0, 1]), features_by_part=feats,
                       logits_by_part=logits)


def _lsm(row):
    z = max(row)
    lse = z + math.log(sum(math.exp(v - z) for v in row))
    return [v - lse for v in row]


def _reference_loss(ctx, tau, tau12=2.0, tau2=2.0, thr=0.95):
    """train.py's Lx_b + Lu + Lu_b, one sample at a time."""
    pi = [c / sum(COUNTS.tolist()) for c in COUNTS.tolist()]

    def la(t):
        return [math.log(p ** t + 1e-12) for p in pi]

    L = ctx.logits_by_part
    y = ctx.targets.tolist()
    lab = L["labeled"]["aux"].tolist()
    total = sum(-_lsm([z + a for z, a in zip(lab[i], la(tau2), strict=True)])[y[i]] for i in range(6)) / 6
    w1, w2 = L["unlabeled:weak"]["main"].tolist(), L["unlabeled:weak"]["aux"].tolist()
    strong = [p for p in L if p.startswith("unlabeled:strong")]
    for part in strong:
        s1, s2 = L[part]["main"].tolist(), L[part]["aux"].tolist()
        u1 = u2 = 0.0
        for j in range(10):
            p1 = [math.exp(v) for v in _lsm([z - a for z, a in zip(w1[j], la(tau), strict=True)])]
            p12 = [math.exp(v) for v in _lsm([z - a for z, a in zip(w1[j], la(tau12), strict=True)])]
            pb = [math.exp(v) for v in _lsm(w2[j])]
            pt = [math.exp(v) for v in _lsm(w1[j])]
            if max(p1) >= thr or max(pt) >= thr:
                u1 += -_lsm(s1[j])[p1.index(max(p1))]
            if max(pb) >= thr or max(p12) >= thr:
                u2 += -_lsm(s2[j])[p12.index(max(p12))]
        total += (u1 / 10 + u2 / 10) / len(strong)
    return total


@pytest.mark.parametrize("views", [1, 2])
def test_loss_is_the_code_rule_on_fixed_inputs(views):
    loss = _build(threshold=0.8)
    ctx = _ctx(views=views)
    assert math.isclose(float(loss(ctx)), _reference_loss(ctx, 2.0, thr=0.8), rel_tol=1e-5)
    fixed = _build(threshold=0.8, tau1=1.0, tau12=0.5, tau2=3.0)
    ctx = _ctx(views=views, seed=4)
    assert math.isclose(float(fixed(ctx)), _reference_loss(ctx, 1.0, 0.5, 3.0, thr=0.8),
                        rel_tol=1e-5)


def test_histogram_is_the_code_index_assignment():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        labels = torch.randint(0, 5, (40,), generator=g)
        kept = torch.rand(40, generator=g) > 0.5
        want = torch.zeros(5)
        want[labels] += kept.float()  # train.py: now_mask[targets_u_b] += mask_l * mask_b
        assert torch.equal(class_histogram(labels, kept, 5, "presence"), want)
        assert torch.equal(class_histogram(labels, kept, 5, "counts"),
                           torch.bincount(labels[kept], minlength=5).float())


def _reference_estimate(batches, ema_u=0.99, est_epoch=1, tau1=2.0, thr=0.95):
    """train.py's loop: per epoch start tau from count_KL / eval_step, per step u and count_KL."""
    kl_div = torch.nn.KLDivLoss(reduction="sum")
    py_con = COUNTS.float() / COUNTS.sum()
    py_uni, py_rev = torch.ones(C) / C, torch.flip(py_con, dims=[0])
    u, count, taus = torch.ones(C) / C, torch.zeros(3), []
    tau = tau1
    for epoch, steps in enumerate(batches):
        if epoch > est_epoch:
            count = count / len(steps)
            soft = torch.exp(count[0]) / torch.exp(count).sum()
            new = 0 + (tau1 - 0) * soft
            if not math.isnan(new):
                tau = float(new)
        count = torch.zeros(3)
        taus.append(tau)
        for w2 in steps:
            probs = torch.softmax(w2, -1)
            maxb, tb = probs.max(-1)
            now = torch.zeros(C)
            if epoch > est_epoch:
                now[tb] += maxb.ge(thr).float()
                if now.sum() > 0:
                    now = now / now.sum()
                    u = ema_u * u + (1 - ema_u) * now
                    count[0] += 0.5 * kl_div(py_con.log(), u) + 0.5 * kl_div(u.log(), py_con)
                    count[1] += 0.5 * kl_div(py_uni.log(), u) + 0.5 * kl_div(u.log(), py_uni)
                    count[2] += 0.5 * kl_div(py_rev.log(), u) + 0.5 * kl_div(u.log(), py_rev)
    return u, taus


def test_estimate_and_adaptive_tau_over_epochs():
    loss = _build(est_epoch=1, ema_u=0.9, threshold=0.5)
    batches, taus = [], []
    for epoch in range(5):
        steps = []
        for s in range(3):
            ctx = _ctx(step=epoch * 3 + s, epoch=epoch, seed=100 + epoch * 3 + s, scale=3.0)
            steps.append(ctx.logits_by_part["unlabeled:weak"]["aux"].clone())
            loss(ctx)
            if s == 0:
                taus.append(float(loss.tau))
        batches.append(steps)
    u_ref, taus_ref = _reference_estimate(batches, ema_u=0.9, est_epoch=1, thr=0.5)
    assert torch.allclose(loss.u, u_ref, atol=1e-6)
    assert taus[:2] == [2.0, 2.0] and math.isclose(taus[2], 2.0 / 3, rel_tol=1e-6)
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(taus, taus_ref, strict=True))
    assert not math.isclose(taus[4], taus[3])
    # ACR-dagger: tau stays tau1
    fixed = _build(est_epoch=1, ema_u=0.9, adaptive=False, threshold=0.5)
    for epoch in range(len(batches)):
        for s in range(3):
            fixed(_ctx(step=epoch * 3 + s, epoch=epoch, seed=100 + epoch * 3 + s, scale=3.0))
    assert float(fixed.tau) == 2.0 and torch.allclose(fixed.u, u_ref, atol=1e-6)


def test_state_round_trip_is_bit_exact():
    a = _build(est_epoch=0, threshold=0.5)
    for step in range(5):
        a(_ctx(step=step, epoch=step // 2, seed=step))
    b = _build(est_epoch=0, threshold=0.5)
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    for step in range(5, 9):
        assert torch.equal(a(_ctx(step=step, epoch=step // 2, seed=step)),
                           b(_ctx(step=step, epoch=step // 2, seed=step)))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    with pytest.raises(LtframeError, match="saved 'u' has shape"):
        reg = make_plugin_manager()[1]
        other = reg.build(reg.spec("loss", "acr", "loss"), num_classes=4,
                          class_counts=torch.tensor([4, 3, 2, 1]))
        other.load_state_dict(a.state_dict())


def test_bad_parameters_are_refused():
    reg = make_plugin_manager()[1]
    for bad in ({"threshold": -0.1}, {"tau1": -1.0}, {"ema_u": 1.0}, {"est_epoch": -1},
                {"temperature": 0.0}, {"histogram": "sum"}):
        with pytest.raises(LtframeError):
            reg.spec("loss", {"name": "acr", **bad}, "stage[0].loss[1]")


@pytest.mark.slow
def test_a_stage_without_unlabeled_batches_is_refused(tmp_path):
    over = {"model": {"heads": {"main": {"name": "linear"}, "aux": {"name": "linear"}},
                      "eval_head": "aux"},
            "stage": [{"name": "acr", "epochs": 1, "steps_per_epoch": 2, "data": "labeled",
                       "loss": ["ce", "acr"]}]}
    with pytest.raises(LtframeError, match=r"loss\[1\]: loss 'acr' needs unlabeled batches"):
        start_run(tiny_recipe(tmp_path, **over))


def test_balanced_ce_uses_tau2():
    loss = _build(threshold=1.0)  # nothing confident: only the labeled term
    ctx = _ctx()
    pi = COUNTS.float() / COUNTS.sum()
    want = F.cross_entropy(ctx.logits_by_part["labeled"]["aux"] + torch.log(pi ** 2 + 1e-12),
                           ctx.targets)
    assert torch.allclose(loss(ctx), want)
