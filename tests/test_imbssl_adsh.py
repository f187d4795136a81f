"""Adsh (authors' code in wujianP/ImbalancedSSL Adsh/train.py update_s, algorithms/fixmatch.py):
score update and rectified labels on fixed inputs against loop versions of the authors' and
USB's rules; the engine's epoch_pool seam in a run; state round trip; bounds."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ltframe import resume_run, start_run
from ltframe.engine import checkpoint as ckpt
from ltframe.engine.context import PoolPredictions, StepContext
from ltframe.errors import LtframeError, RecipeError, RunInterrupted
from ltframe.plugins import make_plugin_manager
from ltframe.testing import StopAt, tiny_recipe
from ltframe_imbssl.adsh import authors_scores

C = 3
COUNTS = torch.tensor([6, 3, 1])  # class 0 is the head
# pool softmax rows: predicted class, confidence
POOL = torch.tensor([[0.97, 0.02, 0.01], [0.96, 0.03, 0.01], [0.90, 0.05, 0.05],
                     [0.60, 0.30, 0.10], [0.10, 0.85, 0.05], [0.20, 0.70, 0.10],
                     [0.30, 0.60, 0.10], [0.45, 0.50, 0.05], [0.10, 0.10, 0.80],
                     [0.30, 0.20, 0.50]])


def _build(**kw):
    reg = make_plugin_manager()[1]
    spec = reg.spec("pseudo_labeler", {"name": "adsh", **kw}, "pseudo_labeler")
    return reg.build(spec, num_classes=C, class_counts=COUNTS, labeled_counts=COUNTS, seed=0)


def _pool(probs=POOL):
    return PoolPredictions(index=torch.arange(len(probs)), probs=probs, num_classes=C,
                           class_counts=COUNTS, stage_index=0, stage_name="s")


def _ctx(logits):
    return StepContext(step=0, epoch=0, num_classes=C, class_counts=COUNTS, targets=None,
                       features_by_part={"unlabeled": logits},
                       logits_by_part={"unlabeled": {"main": logits}})


def _authors_update_s(probs, score, threshold):
    """update_s of Adsh/train.py, on numpy as the authors wrote it."""
    max_probs, targets = probs.max(1)
    lists = [[] for _ in range(C)]
    for i in range(targets.shape[0]):
        lists[targets[i]].append(max_probs[i].numpy())
    lists = np.array(lists, dtype=object)
    rho = 1.0
    for i in range(lists.shape[0]):
        lists[i] = np.sort(np.array(lists[i]))[::-1]
    for i in range(lists[0].shape[0]):
        if lists[0][i] < threshold:
            break
        rho = (i + 1) / lists[0].shape[0]
    for i in range(1, lists.shape[0]):
        if lists[i].shape[0] != 0:
            idx = max(0, np.round(lists[i].shape[0] * rho - 1).astype(int))
            score[i] = min(threshold, lists[i][idx])
    return score


def test_authors_score_update_matches_the_loop():
    # head: 0.97, 0.96, 0.90, 0.60 -> rho = 2 / 4; class 1: n = 4 -> idx round(1.0) = 1 -> 0.70;
    # class 2: n = 2 -> idx round(0.0) = 0 -> 0.80
    want = _authors_update_s(POOL, np.zeros(C) + 0.95, 0.95)
    got = authors_scores(POOL, torch.full((C,), 0.95), 0.95, 0)
    assert np.allclose(got.numpy(), want) and np.allclose(want, [0.95, 0.70, 0.80])
    # no head prediction reaches tau_1: rho stays 1, every class takes its smallest confidence
    low = POOL.clone()
    low[:3] = torch.tensor([0.9, 0.05, 0.05])
    want = _authors_update_s(low, np.zeros(C) + 0.95, 0.95)
    got = authors_scores(low, torch.full((C,), 0.95), 0.95, 0)
    assert np.allclose(got.numpy(), want) and np.allclose(want, [0.95, 0.5, 0.5])
    # a class without predictions keeps its score; rounding is numpy's half to even
    two = torch.tensor([[0.99, 0.01, 0.0], [0.5, 0.1, 0.4], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1],
                        [0.3, 0.6, 0.1], [0.4, 0.55, 0.05]])
    want = _authors_update_s(two, np.array([0.95, 0.95, 0.42]), 0.95)
    got = authors_scores(two, torch.tensor([0.95, 0.95, 0.42]), 0.95, 0)
    assert np.allclose(got.numpy(), want) and np.isclose(want[2], 0.42)


def test_labels_are_argmax_of_p_over_s_with_mask_at_one():
    adsh = _build()
    adsh.epoch_pool(_pool(), epoch=1)  # before epoch 2: s = [0.95, 0.70, 0.80]
    assert torch.allclose(adsh.scores, torch.tensor([0.95, 0.70, 0.80]))
    probs = torch.tensor([[0.50, 0.45, 0.05], [0.96, 0.02, 0.02], [0.10, 0.15, 0.75],
                          [0.05, 0.05, 0.90]])
    pl = adsh(_ctx(probs.log()))
    # r = p / s: row 0 [0.526, 0.643, 0.063] -> class 1 but below 1; row 2 0.9375 -> no
    assert pl.targets.tolist() == [1, 0, 2, 2] and pl.mask.tolist() == [0.0, 1.0, 0.0, 1.0]


def test_scores_adapt_only_from_the_third_epoch():
    adsh = _build()
    adsh.epoch_pool(_pool(), epoch=0)  # after epoch 0: epoch 1 still uses tau_1
    assert torch.equal(adsh.scores, torch.full((C,), 0.95))
    adsh.epoch_pool(_pool(), epoch=1)
    assert not torch.equal(adsh.scores, torch.full((C,), 0.95))


def _usb_after_train_epoch(probs, adsh_s, tau_1):
    """USB AdaptiveThresholdingHook.after_train_epoch: adsh_s = -log threshold."""
    conf_all, pred_all = torch.max(probs, dim=-1)
    lists = [torch.sort(conf_all[pred_all == y], descending=True)[0] for y in range(C)]
    rho = 1.0
    for i in range(len(lists[0])):
        if lists[0][i] < tau_1:
            break
        rho = i / len(lists[0])
    for k in range(C):
        if len(lists[k]) != 0:
            adsh_s[k] = -torch.log(lists[k][int(len(lists[k]) * rho) - 1])
    return adsh_s


def test_usb_mode_starts_at_0_39_and_follows_usbs_update():
    adsh = _build(mode="usb")
    assert adsh.pool_model == "ema" and adsh.start == 1
    assert torch.allclose(adsh.scores, torch.full((C,), math.exp(-0.95)))
    pl = adsh(_ctx(torch.tensor([[0.5, 0.3, 0.2], [0.35, 0.33, 0.32]]).log()))
    assert pl.targets.tolist() == [0, 0] and pl.mask.tolist() == [1.0, 0.0]  # 0.5 >= 0.387
    adsh.epoch_pool(_pool(), epoch=0)
    want = torch.exp(-_usb_after_train_epoch(POOL, torch.ones(C) * 0.95, 0.95))
    assert torch.allclose(adsh.scores, want)
    # rho = 1 / 4 (i = 1): head int(1) - 1 = 0 -> 0.97, class 1 int(1) - 1 = 0 -> 0.85, class 2
    # int(0.5) - 1 = -1 -> its smallest, 0.50
    assert torch.allclose(adsh.scores, torch.tensor([0.97, 0.85, 0.50]))
    # labels are argmax p (not p / s) and there is no cap at tau_1
    pl = adsh(_ctx(torch.tensor([[0.96, 0.03, 0.01], [0.1, 0.86, 0.04]]).log()))
    assert pl.targets.tolist() == [0, 1] and pl.mask.tolist() == [0.0, 1.0]


def test_state_round_trip_and_bounds():
    a = _build()
    a.epoch_pool(_pool(), epoch=3)
    b = _build()
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.scores, b.scores)
    with pytest.raises(LtframeError, match="saved 'scores' has shape"):
        b.load_state_dict({"scores": torch.zeros(4)})
    for kw in ({"tau_1": 0.0}, {"tau_1": 1.5}, {"start_epoch": -2}, {"mode": "paper"}):
        with pytest.raises(RecipeError, match="pseudo_labeler"):
            _build(**kw)


SPLIT = {"split": {"name": "fraction", "labeled_fraction": 0.5}}
STAGE = {"name": "s", "epochs": 4, "steps_per_epoch": 2, "data": "labeled+unlabeled",
         "ema": 0.9, "views": {"labeled": ["weak"], "unlabeled": ["weak", "strong"]},
         "pseudo_labeler": {"name": "adsh", "tau_1": 0.9},
         "loss": [{"name": "ce"}, {"name": "fixmatch"}]}


@pytest.mark.slow
def test_the_pool_pass_runs_between_epochs_and_resume_is_exact(tmp_path, monkeypatch):
    import ltframe_imbssl.adsh as adsh_module
    seen = []
    original = adsh_module.Adsh.epoch_pool

    def record(self, pool, epoch):
        seen.append((epoch, pool.index.numel(), tuple(pool.probs.shape)))
        original(self, pool, epoch)

    monkeypatch.setattr(adsh_module.Adsh, "epoch_pool", record)
    over = {"run": {"checkpoint_every": 1, "log_every": 1}, "data": SPLIT, "stage": [STAGE]}
    full = Path(start_run(tiny_recipe(tmp_path / "a", **over))["run_dir"])
    n = seen[0][1]
    assert seen == [(0, n, (n, 4)), (1, n, (n, 4)), (2, n, (n, 4))] and n > 0  # not after the last
    with pytest.raises(RunInterrupted):
        start_run(tiny_recipe(tmp_path / "b", **over), plugins=[("stop", StopAt(7))])
    part = tmp_path / "b" / "runs" / "tiny"
    tensors, side, _ = ckpt.load(part)
    assert side["step"] == 6 and any(k.endswith("scores") for k in tensors)
    resumed = Path(resume_run(part)["run_dir"])
    a, b = ckpt.load(full)[0], ckpt.load(resumed)[0]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = json.loads((full / "summary.json").read_text())
    assert sa["per_class"] == json.loads((resumed / "summary.json").read_text())["per_class"]
