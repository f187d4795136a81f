"""Alternate sampling (paper 000): the `consistency` loss and the `alternate` scheduler."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ltframe import start_run
from ltframe.engine.context import StepContext
from ltframe.errors import RecipeError
from ltframe.plugins import make_plugin_manager
from ltframe.recipe import OptimCfg, StageCfg
from ltframe.testing import tiny_recipe
from ltframe_alternate.consistency import Consistency, ConsistencyParams

_, REG = make_plugin_manager()


def _ctx(logits, idx, epoch, head="g"):
    return StepContext(step=0, epoch=epoch, num_classes=logits.shape[1], class_counts=None,
                       targets=None, features_by_part={"labeled": logits},
                       logits_by_part={"labeled": {head: logits}},
                       indices_by_part={"labeled": idx})


def _loss(**kw):
    return REG.build(REG.spec("loss", {"name": "consistency", "head": "g", **kw}, "loss"),
                     num_classes=3, num_samples=5, class_counts=None, seed=0)


def test_loss_equals_hand_computation_and_memory_follows_epochs():
    torch.manual_seed(0)
    assert _loss().p.form == "kl"  # paper 000 eq. (3)
    loss = _loss(form="ce")
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    idx = torch.tensor([1, 3])
    # epoch 0: targets are uniform
    got = loss(_ctx(a, idx, 0))
    want = -(torch.full((2, 3), 1 / 3) * F.log_softmax(a, 1)).sum(1).mean()
    assert torch.allclose(got, want)
    # same epoch again: still uniform (written rows go to the "next" buffer)
    assert torch.allclose(loss(_ctx(b, idx, 0)), -(F.log_softmax(b, 1) / 3).sum(1).mean())
    # epoch 1: the targets are the last softmax written in epoch 0 (b's); unseen rows uniform
    c = torch.randn(3, 3)
    idx2 = torch.tensor([3, 1, 0])
    p_prev = torch.stack([F.softmax(b, 1)[1], F.softmax(b, 1)[0], torch.full((3,), 1 / 3)])
    want = -(p_prev * F.log_softmax(c, 1)).sum(1).mean()
    assert torch.allclose(loss(_ctx(c, idx2, 1)), want)
    assert torch.allclose(loss.prev[[1, 3]], F.softmax(b, 1))
    assert torch.allclose(loss.next[[3, 1, 0]], F.softmax(c, 1))
    # kl form: CE minus the entropy of the stored distribution
    kl = _loss(form="kl")
    kl.prev = p_prev.repeat(2, 1)[:5]
    kl.epoch = 4
    got = kl(_ctx(c, torch.tensor([0, 1, 2]), 4))
    want = F.kl_div(F.log_softmax(c, 1), kl.prev[:3], reduction="batchmean")
    assert torch.allclose(got, want, atol=1e-6)


def test_gradient_flows_only_through_current_logits():
    loss = _loss()
    x = torch.randn(2, 3, requires_grad=True)
    loss(_ctx(x, torch.tensor([0, 1]), 0)).backward()
    assert x.grad is not None and not loss.next.requires_grad


def test_state_round_trip_is_identical():
    torch.manual_seed(1)
    one = _loss()
    for e in range(3):
        one(_ctx(torch.randn(4, 3), torch.randperm(5)[:4], e))
    two = Consistency(ConsistencyParams(head="g"), num_classes=3, num_samples=5)
    two.load_state_dict(one.state_dict())
    x, idx = torch.randn(4, 3), torch.tensor([4, 0, 2, 1])
    for e in (2, 3):  # within the saved epoch, then across a boundary
        assert torch.equal(one(_ctx(x, idx, e)), two(_ctx(x, idx, e)))
    for k, v in one.state_dict().items():
        assert torch.equal(v, two.state_dict()[k])


def _scheduler(**params):
    spec = REG.spec("scheduler", {"name": "alternate", **params}, "scheduler")
    rep = StageCfg(name="rep", epochs=3, train=["backbone", "heads.g_prime"],
                   loss=[REG.spec("loss", {"name": "ce", "head": "g_prime"}, "l")])
    optim = OptimCfg(
        REG.spec("optimizer", {"name": "sgd", "lr": 0.1}, "o"),
        REG.spec("lr_schedule", "constant", "s"))
    return REG.build(spec, stages=[(rep, optim)])


def test_stage_sequence_for_two_loops():
    s = _scheduler(loops=2, classifier_epochs=2, finetune_epochs=5)
    plans = []
    while (p := s.next_stage([{}] * len(plans))) is not None:
        plans.append(p)
    assert [p.name for p in plans] == ["init", "cls0", "ft1", "cls1", "ft2", "cls2"]
    assert [p.index for p in plans] == list(range(6))
    cfg = [p.cfg for p in plans]
    assert cfg[0].train == ["backbone", "heads.g_prime"] and cfg[0].epochs == 3
    assert cfg[1].reset == ["heads.g"] and cfg[3].reset == cfg[5].reset == []  # update g
    assert _scheduler(loops=2, classifier_reset=True).next_stage([{}] * 3).cfg.reset == ["heads.g"]
    for c in (cfg[1], cfg[3], cfg[5]):
        assert c.train == ["heads.g"] and c.data == "labeled"
        assert c.sampler.name == "class_balanced" and c.epochs == 2 and c.eval_head == "g"
        assert [loss.params.head for loss in c.loss] == ["g"]
    for c in (cfg[2], cfg[4]):
        assert c.train == ["backbone", "heads.g_prime"] and c.reset == []
        assert c.data == "labeled+pseudo" and c.sampler.name == "random" and c.epochs == 5
        assert [(x.name, x.params.head, x.weight) for x in c.loss] == [
            ("ce", "g_prime", 1.0), ("consistency", "g_prime", 1.0)]
        assert c.eval_head == "g_prime" and c.label is None  # g is stale while f moves
    labels = [(c.label.name if c.label else None, c.label_head) for c in cfg]
    assert labels == [(None, ""), ("threshold", "g"), (None, ""), ("threshold", "g"),
                      (None, ""), (None, "")]
    assert cfg[1].label.params.threshold == 0.0 and cfg[1].label.params.hard
    assert [p.optim.schedule.name for p in plans[1:]] == ["cosine"] * 5
    # pure in the history length
    assert s.next_stage([{}] * 3).cfg == cfg[3]


def test_table3_ablations_by_values():
    s = _scheduler(loops=1, classifier_sampler="random",
                   finetune_sampler={"name": "class_balanced"},
                   classifier_data="labeled+pseudo", consistency_weight=0.5)
    cls0, ft1, cls1 = (s.next_stage([{}] * h).cfg for h in (1, 2, 3))
    assert cls0.sampler.name == cls1.sampler.name == "random"
    assert ft1.sampler.name == "class_balanced" and ft1.loss[1].weight == 0.5
    assert cls0.data == "labeled" and cls1.data == "labeled+pseudo"
    assert s.next_stage([{}] * 4) is None
    with pytest.raises(RecipeError, match="finetune_sampler"):
        _scheduler(finetune_sampler="nope")
    with pytest.raises(RecipeError, match="same head"):
        _scheduler(g="a", g_prime="a")
    zero = _scheduler(loops=0)
    assert zero.next_stage([{}]).cfg.label is None and zero.next_stage([{}] * 2) is None


@pytest.mark.slow
def test_tiny_end_to_end(tmp_path):
    stage = {"name": "rep", "epochs": 1, "steps_per_epoch": 2, "train": ["backbone", "heads.g_prime"],
             "loss": [{"name": "ce", "head": "g_prime"}], "eval_head": "g_prime"}
    path = tiny_recipe(
        tmp_path,
        data={"split": {"name": "fraction", "labeled_fraction": 0.5}},
        model={"heads": {"g": {"name": "linear"}, "g_prime": {"name": "linear"}},
               "eval_head": "g"},
        scheduler={"name": "alternate", "loops": 1, "classifier_epochs": 1, "finetune_epochs": 1},
        stage=[stage])
    summary = start_run(path)
    assert [s["stage"] for s in summary["pseudo_labels"]] == ["cls0"]  # one labelling (L = 1)
    assert sum(summary["pseudo_labels"][0]["pl_selected"]) > 0  # threshold 0: the whole pool
    run = Path(summary["run_dir"])
    assert (run / "pseudo_labels" / "stage1-cls0.csv").exists()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["stage"] for x in lines if x["event"] == "stage_start"] == [
        "init", "cls0", "ft1", "cls1"]
    train = {x["stage"]: x["loss"] for x in lines if x["event"] == "train"}
    assert set(train["ft1"]) == {"ce", "consistency", "total"} and set(train["cls1"]) == {
        "ce", "total"}
    # the consistency memory is checkpointed; the fine-tune wrote its samples' softmaxes
    meta = json.loads((run / "checkpoints" / "stage2-ft1.json").read_text())
    assert set(meta["components"]["loss.consistency"]) == {"prev", "next", "epoch"}
    tensors = load_file(run / "checkpoints" / "stage2-ft1.safetensors")
    nxt = tensors["component.loss.consistency.next"]
    assert nxt.shape == (96, 4) and torch.allclose(nxt.sum(1), torch.ones(96))
    assert (nxt - 0.25).abs().amax(1).gt(1e-6).sum() > 0
