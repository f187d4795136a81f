"""Heads: known values (cosine, LWS, tau-norm, NCM) and decoupled two-stage runs."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ltframe import start_run
from ltframe.testing import tiny_recipe


def head(registry, table, d=2, c=2):
    return registry.build(registry.spec("head", table, "head"), in_features=d, num_classes=c)


def test_cosine_head_is_scaled_cosine(registry):
    h = head(registry, {"name": "cosine", "scale": 2.0})
    with torch.no_grad():
        h.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
    out = h(torch.tensor([[1.0, 1.0]]))
    assert torch.allclose(out, 2.0 * torch.tensor([[2 ** -0.5, 2 ** -0.5]]), atol=1e-6)


def test_lws_scales_after_the_bias(registry):
    h = head(registry, "lws")
    with torch.no_grad():
        h.fc.weight.copy_(torch.eye(2))
        h.fc.bias.copy_(torch.tensor([1.0, 2.0]))
        h.scale.weight.copy_(torch.tensor([2.0, 0.5]))
    assert torch.allclose(h(torch.tensor([[1.0, 1.0]])), torch.tensor([[4.0, 1.5]]))


def test_tau_norm_known_values_and_search(registry):
    h = head(registry, {"name": "tau_norm", "tau": 1.0})
    with torch.no_grad():
        h.fc.weight.copy_(torch.tensor([[4.0, 0.0], [0.0, 1.0]]))  # head class has a big norm
        h.fc.bias.zero_()
    x = torch.tensor([[0.3, 1.0]])  # true class 1, but 4*0.3 > 1*1.0 without normalisation
    assert h(x).argmax().item() == 0
    assert torch.allclose(h.logits_with(x, 1.0), torch.tensor([[0.3, 1.0]]))
    assert torch.allclose(h.logits_with(x, 0.0), torch.tensor([[1.2, 1.0]]))
    feats = torch.tensor([[1.0, 0.0], [0.3, 1.0], [0.2, 1.0]])
    labels = torch.tensor([0, 1, 1])
    info = h.fit(feats, labels, None, None)
    assert info["tau"] >= 0.2 and info["val_balanced_acc"] == 100.0
    assert h(x).argmax().item() == 1  # after fitting, tau-normalised logits are used


def test_ncm_nearest_class_mean(registry):
    h = head(registry, "ncm")
    feats = torch.tensor([[2.0, 0.1], [3.0, -0.1], [-1.0, 2.0], [-1.2, 3.0]])
    labels = torch.tensor([0, 0, 1, 1])
    h.fit(feats, labels)
    assert torch.allclose(h.center, feats.mean(0))
    assert h(feats).argmax(1).tolist() == [0, 0, 1, 1]
    assert torch.allclose(h.means.norm(dim=1), torch.ones(2), atol=0.2)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["crt", "lws", "tau_norm", "ncm"])
def test_decoupled_classifier_stage_keeps_the_backbone(tmp_path, mode):
    heads = {"crt": "linear", "lws": "lws", "tau_norm": "tau_norm", "ncm": "linear"}
    model = {"heads": {"main": {"name": heads[mode]}}}
    second = {"name": "cls", "train": ["heads.main"], "steps": 3}
    if mode == "crt":
        second.update(reset=["heads.main"], sampler={"name": "class_aware", "per_class": 2})
    elif mode == "lws":
        second.update(train=["heads.main.scale"], sampler="class_balanced")
    elif mode == "tau_norm":
        second = {"name": "cls", "fit": ["heads.main"], "train": []}
    else:
        model["heads"]["ncm"] = {"name": "ncm"}
        second = {"name": "cls", "fit": ["heads.ncm"], "train": [], "eval_head": "ncm"}
    over = {"model": model, "data": {"val_per_class": 2},
            "stage": [{"name": "rep", "steps": 3}, second]}
    summary = start_run(tiny_recipe(tmp_path, **over))
    run_dir = Path(summary["run_dir"])
    a = load_file(str(run_dir / "checkpoints/stage0-rep.safetensors"))
    b = load_file(str(run_dir / "checkpoints/stage1-cls.safetensors"))
    for k in a:
        if k.startswith("model.backbone."):
            assert torch.equal(a[k], b[k]), k
    changed = [k for k in a if k.startswith("model.heads.") and not torch.equal(a[k], b[k])]
    assert changed, "the classifier stage changed nothing"
    if mode == "lws":
        assert changed == ["model.heads.main.scale.weight"]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    if mode in ("tau_norm", "ncm"):
        assert any(r["event"] == "fit" for r in rows)
    assert summary["stages"][-1]["eval_head"] == ("ncm" if mode == "ncm" else "main")


@pytest.mark.slow
@pytest.mark.parametrize("classifier, head", [("crt", "linear"), ("lws", "lws"),
                                              ("tau_norm", "tau_norm"), ("ncm", "ncm")])
def test_decoupled_scheduler_derives_the_classifier_stage(tmp_path, classifier, head):
    heads = {"main": {"name": "linear" if head == "ncm" else head}}
    if head == "ncm":
        heads["ncm"] = {"name": "ncm"}
    over = {"model": {"heads": heads},
            "scheduler": {"name": "decoupled", "classifier": classifier, "epochs": 1,
                          "head": "ncm" if head == "ncm" else "main"},
            "stage": [{"name": "rep", "steps": 3, "train": ["backbone", "heads.main"]}]}
    summary = start_run(tiny_recipe(tmp_path, **over))
    names = [s["stage"] for s in summary["stages"]]
    assert names == ["rep", classifier]
    run_dir = Path(summary["run_dir"])
    a = load_file(str(run_dir / "checkpoints/stage0-rep.safetensors"))
    b = load_file(str(run_dir / f"checkpoints/stage1-{classifier}.safetensors"))
    stats = ("running_mean", "running_var", "num_batches_tracked")
    weights = [k for k in a if k.startswith("model.backbone.") and not k.endswith(stats)]
    assert weights and all(torch.equal(a[k], b[k]) for k in weights)  # frozen backbone
    bn = [k for k in a if k.startswith("model.backbone.") and k.endswith("running_mean")]
    # classifier-balancing re-estimates BN statistics on the class-balanced batches
    moved = not all(torch.equal(a[k], b[k]) for k in bn)
    assert moved == (classifier in ("crt", "lws"))
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    starts = [r for r in rows if r["event"] == "stage_start"]
    if classifier in ("crt", "lws"):
        assert starts[1]["total_steps"] > 0
    else:
        assert starts[1]["total_steps"] == 0 and any(r["event"] == "fit" for r in rows)
