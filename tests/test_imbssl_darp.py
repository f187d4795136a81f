"""DARP (bbuing9/DARP common.py estimate_pseudo / opt_solver, training_functions.py train_fix):
pruning and the solver on fixed inputs against the authors' rule, the refinement schedule, the
refined vs USB mask, state round trip (and resume), bounds and errors."""

import json
from pathlib import Path

import pytest
import torch

from ltframe import resume_run, start_run
from ltframe.engine import checkpoint as ckpt
from ltframe.engine.context import StepContext
from ltframe.errors import LtframeError, RecipeError, RunInterrupted
from ltframe.plugins import make_plugin_manager
from ltframe.testing import StopAt, tiny_recipe
from ltframe_imbssl.darp import prune, refine, solve

P8 = torch.tensor([[0.70, 0.20, 0.10], [0.60, 0.30, 0.10], [0.50, 0.25, 0.25], [0.20, 0.70, 0.10],
                   [0.30, 0.40, 0.30], [0.10, 0.30, 0.60], [0.45, 0.45, 0.10], [0.34, 0.33, 0.33]],
                  dtype=torch.float64)
C8 = torch.tensor([4.0, 2.5, 1.5], dtype=torch.float64)
# opt_solver(P8, C8, num_iter=10, th=0.1) of the authors' common.py run with numpy and
# scipy 1.17 (optimize.newton without fprime: the secant method)
SCIPY = torch.tensor([[0.7773052788, 0.1523103074, 0.0703844138],
                      [0.7003937287, 0.2295520568, 0.0700542145],
                      [0.6315422037, 0.1936331087, 0.1748246876],
                      [0.2690147754, 0.6457284184, 0.0852568061],
                      [0.4278461904, 0.3418120355, 0.2303417742],
                      [0.1522708342, 0.2994380025, 0.5482911633],
                      [0.5651257389, 0.3616612416, 0.0732130194],
                      [0.4765012390, 0.2758648317, 0.2476339293]], dtype=torch.float64)


def test_solver_matches_the_authors_opt_solver_with_scipy():
    got = solve(P8, C8, iters=10, tol=0.1, newton_steps=30)
    assert torch.allclose(got, SCIPY, atol=1e-9)
    assert torch.allclose(got.sum(1), torch.ones(8, dtype=torch.float64))
    assert torch.allclose(got.sum(0), C8, atol=0.05)  # columns near c (tolerance 0.1 on nu)


def _prune_loop(q_y, saved_q, alpha):
    """estimate_pseudo (classes from the last to the first, top int(alpha * c_i) rows) and the
    rescaling train_fix applies to pseudo_orig."""
    n, k = saved_q.shape
    labels = torch.zeros(n, k)
    k_probs = torch.zeros(k)
    for i in reversed(range(k)):
        num_i = int(alpha * q_y[i])
        values, idx = saved_q[:, i].sort(dim=0, descending=True)
        labels[idx[:num_i], i] = 1
        k_probs[i] = values[:num_i].sum()
    weights = (q_y + 1e-6) / (k_probs + 1e-6)
    scale = labels * weights.reshape(1, -1)
    return (saved_q * scale + 1e-6) / (saved_q * scale + 1e-6).sum(dim=1, keepdim=True)


def test_prune_matches_the_authors_loop():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(2 * torch.randn(20, 4, generator=g), 1)
    target = torch.tensor([8.0, 6.0, 4.0, 2.0])
    for alpha in (2.0, 0.5, 1.3):
        assert torch.allclose(prune(probs, target, alpha), _prune_loop(target, probs, alpha), atol=1e-7)
    # a row in no class's top set becomes uniform
    few = prune(probs, torch.tensor([1.0, 1.0, 0.0, 0.0]), 1.0)
    assert (few == 0.25).all(1).sum() >= 18


def _build(pool=8, **kw):
    reg = make_plugin_manager()[1]
    spec = reg.spec("pseudo_labeler", {"name": "darp", **kw}, "pseudo_labeler")
    return reg.build(spec, num_classes=3, class_counts=torch.tensor([8, 5, 3]),
                     labeled_counts=torch.tensor([8, 5, 3]), num_samples=20,
                     unlabeled_index=torch.arange(10, 10 + pool), seed=0)


def _ctx(step, epoch, logits, idx):
    return StepContext(step=step, epoch=epoch, num_classes=3, class_counts=torch.tensor([8, 5, 3]),
                       targets=None, features_by_part={"unlabeled": logits},
                       logits_by_part={"unlabeled": {"main": logits}},
                       indices_by_part={"unlabeled": idx})


def test_fixmatch_during_warmup_then_refined_labels_on_schedule():
    darp = _build(warmup=0, every=2, threshold=0.6)
    assert torch.allclose(darp.target, torch.tensor([4.0, 2.5, 1.5]))  # 8 x labeled proportions
    logp = P8.float().log()
    # epoch 0 (<= warmup): FixMatch on the softmax; P records the rows
    pl = darp(_ctx(0, 0, logp[:4], torch.arange(10, 14)))
    assert pl.targets.tolist() == [0, 0, 0, 1] and pl.mask.tolist() == [1.0, 1.0, 0.0, 1.0]
    darp(_ctx(1, 0, logp[4:], torch.arange(14, 18)))
    assert torch.allclose(darp.P, P8.float())
    # epoch 1, batch 0: refine the whole pool; the batch takes its rows of Q
    pl = darp(_ctx(2, 1, logp[:4], torch.arange(10, 14)))
    want = refine(P8.float(), torch.tensor([4.0, 2.5, 1.5]), 2.0, 10, 0.1, 30)
    assert torch.allclose(darp.Q, want)
    conf, pred = want[:4].max(1)
    assert pl.targets.tolist() == pred.tolist()
    assert pl.mask.tolist() == (conf >= 0.6).float().tolist()
    # batch 1: no refinement (every = 2): the stored Q rows, even for new probabilities
    q_before = darp.Q.clone()
    pl = darp(_ctx(3, 1, torch.zeros(4, 3), torch.arange(14, 18)))
    assert torch.equal(darp.Q, q_before) and pl.targets.tolist() == want[4:].argmax(1).tolist()


def test_usb_mask_uses_the_unrefined_probabilities_and_global_steps():
    darp = _build(warmup=0, every=3, threshold=0.6, mask="usb", schedule="global")
    logp = P8.float().log()
    darp(_ctx(0, 0, logp[:4], torch.arange(10, 14)))
    darp(_ctx(1, 0, logp[4:], torch.arange(14, 18)))
    q0 = darp.Q.clone()
    darp(_ctx(2, 1, logp[:4], torch.arange(10, 14)))  # global step 2: 2 % 3 != 0, no refinement
    assert torch.equal(darp.Q, q0)
    pl = darp(_ctx(3, 1, logp[:4], torch.arange(10, 14)))  # step 3: refine
    assert not torch.equal(darp.Q, q0)
    assert pl.targets.tolist() == darp.Q[:4].argmax(1).tolist()
    assert pl.mask.tolist() == (P8[:4].max(1).values >= 0.6).float().tolist()


def test_given_target_state_round_trip_and_errors():
    darp = _build(target="given", target_dist=[1.0, 1.0, 2.0])
    assert torch.allclose(darp.target, torch.tensor([2.0, 2.0, 4.0]))
    darp = _build(warmup=0, every=1)
    darp(_ctx(0, 1, P8.float().log()[:4], torch.arange(10, 14)))
    other = _build(warmup=0, every=1)
    other.load_state_dict(darp.state_dict())
    assert torch.equal(other.P, darp.P) and torch.equal(other.Q, darp.Q)
    assert (other.epoch, other.epoch_step) == (darp.epoch, darp.epoch_step)
    with pytest.raises(LtframeError, match="saved 'P' has shape"):
        _build(pool=5).load_state_dict(darp.state_dict())
    with pytest.raises(LtframeError, match="target_dist with 3 non-negative numbers"):
        _build(target="given", target_dist=[1.0])
    for kw in ({"alpha": -1.0}, {"every": 0}, {"tol": 0.0}, {"threshold": 2.0}, {"mask": "x"}):
        with pytest.raises(RecipeError, match="pseudo_labeler"):
            _build(**kw)


def test_a_split_without_unlabeled_samples_is_refused(tmp_path):
    recipe = tiny_recipe(tmp_path, stage=[{
        "name": "s", "steps": 2, "data": "labeled+unlabeled", "pseudo_labeler": "darp",
        "loss": [{"name": "ce"}, {"name": "fixmatch"}],
        "views": {"labeled": ["weak"], "unlabeled": ["weak", "strong"]}}])
    with pytest.raises(LtframeError, match="unlabeled"):
        start_run(recipe)


STAGE = {"name": "s", "epochs": 2, "steps_per_epoch": 2, "data": "labeled+unlabeled", "ema": 0.9,
         "views": {"labeled": ["weak"], "unlabeled": ["weak", "strong"]},
         "pseudo_labeler": {"name": "darp", "warmup": 0, "every": 2, "threshold": 0.3},
         "loss": [{"name": "ce"}, {"name": "fixmatch"}]}


@pytest.mark.slow
@pytest.mark.parametrize("target", ["labeled", "bbse"])
def test_darp_run_resumes_bit_exact(tmp_path, target, monkeypatch):
    import ltframe_imbssl.darp as darp_module
    seen = []
    original = darp_module.Darp.epoch_pool

    def record(self, pool, epoch):
        seen.append((epoch, pool.split, pool.index.numel(), pool.labels is not None))
        original(self, pool, epoch)

    monkeypatch.setattr(darp_module.Darp, "epoch_pool", record)
    data = {"split": {"name": "fraction", "labeled_fraction": 0.5}}
    stage = STAGE
    if target == "bbse":  # the estimate after epoch 0 (the warm-up) refines epoch 1
        data.update(val_per_class=2, val_first=True)
        stage = {**STAGE, "pseudo_labeler": {**STAGE["pseudo_labeler"], "target": "bbse",
                                             "bbse_cond": 1e12}}
    over = {"run": {"checkpoint_every": 1, "log_every": 1}, "data": data, "stage": [stage]}
    full = Path(start_run(tiny_recipe(tmp_path / "a", **over))["run_dir"])
    if target == "bbse":  # after epoch 0 (= warmup) only: val (8 = 2 per class, labels), unlabeled
        assert [s[:2] for s in seen] == [(0, "val"), (0, "unlabeled")]
        assert seen[0][2:] == (8, True) and seen[1][2] > 0 and not seen[1][3]
    else:
        assert seen == []  # no pass without BBSE
    with pytest.raises(RunInterrupted):
        start_run(tiny_recipe(tmp_path / "b", **over), plugins=[("stop", StopAt(4))])
    part = tmp_path / "b" / "runs" / "tiny"
    tensors, side, _ = ckpt.load(part)
    q = [v for k, v in tensors.items() if k.endswith(".Q")]
    assert side["step"] == 3 and q and not torch.allclose(q[0], torch.full_like(q[0], 0.25))
    resumed = Path(resume_run(part)["run_dir"])
    a, b = ckpt.load(full)[0], ckpt.load(resumed)[0]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = json.loads((full / "summary.json").read_text())
    assert sa["per_class"] == json.loads((resumed / "summary.json").read_text())["per_class"]
    if target == "bbse":  # the estimate's state is checkpointed
        assert any(k.endswith(".bbse_sum") for k in a)


# --- BBSE estimate of the unlabeled class distribution (train_base_estim.py estimate_q_y) ----

VAL_P = torch.tensor([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.3, 0.5, 0.2],
                      [0.1, 0.2, 0.7], [0.2, 0.2, 0.6]])
VAL_Y = torch.tensor([0, 0, 1, 1, 2, 2])
UNL_P = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6],
                      [0.6, 0.3, 0.1], [0.3, 0.3, 0.4], [0.4, 0.5, 0.1], [0.1, 0.1, 0.8]])


def _authors_estimate(val_p, val_y, unl_p):
    """estimate_q_y / confusion: conf[:, y] += p per sample, columns / their sums, numpy's
    inv(conf) @ sum of the unlabeled softmax, numpy's cond."""
    import numpy as np

    conf = np.zeros((3, 3))
    for p, y in zip(val_p.tolist(), val_y.tolist(), strict=True):
        conf[:, y] += p
    for i in range(3):
        conf[:, i] /= conf[:, i].sum()
    q_tilde = np.asarray(unl_p.tolist()).sum(0)
    return np.linalg.inv(conf) @ q_tilde, float(np.linalg.cond(conf))


def _pool(split, probs, labels=None):
    from ltframe.engine.context import PoolPredictions

    return PoolPredictions(index=torch.arange(probs.shape[0]), probs=probs, num_classes=3,
                           class_counts=torch.tensor([8, 5, 3]), stage_index=0, stage_name="s",
                           split=split, labels=labels)


def test_bbse_estimate_matches_the_authors_rule():
    from ltframe_imbssl.darp import bbse_estimate, soft_confusion

    conf = soft_confusion(VAL_P, VAL_Y, 3)
    est, cond = bbse_estimate(conf, UNL_P)
    want, want_cond = _authors_estimate(VAL_P, VAL_Y, UNL_P)
    assert torch.allclose(est, torch.tensor(want, dtype=torch.float64), atol=1e-9)
    assert abs(cond - want_cond) < 1e-9 * want_cond
    assert torch.allclose(conf @ est, UNL_P.double().sum(0))  # M est = q~
    # a class without val samples, or a singular M: no estimate
    assert bbse_estimate(soft_confusion(VAL_P[:4], VAL_Y[:4], 3), UNL_P)[1] == float("inf")
    flat = torch.full((6, 3), 1 / 3)
    est, cond = bbse_estimate(soft_confusion(flat, VAL_Y, 3), UNL_P)
    assert cond == float("inf") or cond > 1e12


def test_bbse_target_from_the_epoch_pool_passes():
    darp = _build(warmup=2, target="bbse", bbse_from=1, bbse_cond=1e6)
    assert darp.pool_splits == ("val", "unlabeled") and darp.pool_head == "main"
    labeled = darp.target.clone()
    assert torch.allclose(labeled, torch.tensor([4.0, 2.5, 1.5]))  # before any estimate
    # the engine asks for the pass only at the ends of epochs bbse_from..warmup
    for epoch, kind in ((-1, None), (0, None), (1, "model"), (2, "model"), (3, None)):
        darp.epoch = epoch
        assert darp.pool_model == kind
    assert _build(warmup=2).pool_model is None and _build(warmup=2).pool_splits == ("unlabeled",)
    darp.epoch = 0
    darp.epoch_pool(_pool("val", VAL_P, VAL_Y), 0)  # before bbse_from: ignored
    darp.epoch_pool(_pool("unlabeled", UNL_P), 0)
    assert darp.bbse_n == 0 and torch.equal(darp.target, labeled)
    want, _ = _authors_estimate(VAL_P, VAL_Y, UNL_P)
    want = torch.tensor(want)
    assert (want >= 0).all()
    darp.epoch_pool(_pool("val", VAL_P, VAL_Y), 1)
    darp.epoch_pool(_pool("unlabeled", UNL_P), 1)
    assert darp.bbse_n == 1
    assert torch.allclose(darp.target.double(), want / want.sum() * 8, atol=1e-5)  # x N_u = 8
    # a second accepted estimate: the target is the mean of both
    unl2 = UNL_P.flip(1)
    want2 = torch.tensor(_authors_estimate(VAL_P, VAL_Y, unl2)[0])
    darp.epoch_pool(_pool("val", VAL_P, VAL_Y), 2)
    darp.epoch_pool(_pool("unlabeled", unl2), 2)
    mean = (want + want2) / 2 if (want2 >= 0).all() else want
    assert torch.allclose(darp.target.double(), mean / mean.sum() * 8, atol=1e-5)
    n = darp.bbse_n
    # the state round trip restores the estimate and the target
    other = _build(warmup=2, target="bbse", bbse_from=1, bbse_cond=1e6)
    other.load_state_dict(darp.state_dict())
    assert torch.equal(other.target, darp.target) and other.bbse_n == n
    assert torch.equal(other.bbse_sum, darp.bbse_sum) and torch.equal(other.bbse_last, darp.bbse_last)
    with pytest.raises(LtframeError, match="no BBSE estimate"):
        other.load_state_dict(_build(warmup=2).state_dict())
    # rejected: a condition number over bbse_cond, or a negative entry
    strict = _build(warmup=2, target="bbse", bbse_cond=1.5)
    strict.epoch_pool(_pool("val", VAL_P, VAL_Y), 0)
    strict.epoch_pool(_pool("unlabeled", UNL_P), 0)
    assert strict.bbse_n == 0 and torch.equal(strict.target, labeled) and strict.bbse_last_cond > 1.5
    neg = _build(warmup=2, target="bbse")
    neg.epoch_pool(_pool("val", VAL_P, VAL_Y), 0)
    neg.epoch_pool(_pool("unlabeled", torch.tensor([[1.0, 0.0, 0.0]] * 8)), 0)
    assert (neg.bbse_last < 0).any() and neg.bbse_n == 0
    for kw in ({"bbse_cond": 1.0}, {"bbse_from": -1}, {"target": "est"}):
        with pytest.raises(RecipeError, match="pseudo_labeler"):
            _build(**kw)


def test_bbse_needs_a_val_split(tmp_path):
    stage = {**STAGE, "pseudo_labeler": {**STAGE["pseudo_labeler"], "target": "bbse"}}
    recipe = tiny_recipe(tmp_path, data={"split": {"name": "fraction", "labeled_fraction": 0.5}},
                         stage=[stage])
    with pytest.raises(LtframeError, match="held-out labeled val split.*data.val_per_class"):
        start_run(recipe)


def test_an_unknown_pool_split_is_refused(tmp_path, monkeypatch):
    import functools

    import ltframe_imbssl.darp as darp_module
    original = darp_module.Darp.__init__

    @functools.wraps(original)  # the registry passes the keywords the signature names
    def init(self, *a, **k):
        original(self, *a, **k)
        self.pool_splits = ("test",)

    monkeypatch.setattr(darp_module.Darp, "__init__", init)
    recipe = tiny_recipe(tmp_path, data={"split": {"name": "fraction", "labeled_fraction": 0.5}},
                         stage=[STAGE])
    with pytest.raises(LtframeError, match="'test' split at epoch ends"):
        start_run(recipe)
