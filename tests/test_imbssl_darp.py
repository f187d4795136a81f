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
def test_darp_run_resumes_bit_exact(tmp_path):
    over = {"run": {"checkpoint_every": 1, "log_every": 1},
            "data": {"split": {"name": "fraction", "labeled_fraction": 0.5}}, "stage": [STAGE]}
    full = Path(start_run(tiny_recipe(tmp_path / "a", **over))["run_dir"])
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
