"""`[optim] no_decay`: parameter groups without weight decay (biases, normalisation layers)."""

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

import ltframe.models  # noqa: F401  (registers wrn28_2 / resnet32_cifar into timm)
from ltframe import resume_run, start_run
from ltframe.engine import checkpoint as ckpt
from ltframe.engine.param_groups import is_norm, no_decay_ids, param_groups
from ltframe.errors import RecipeError, RunInterrupted
from ltframe.models import LTModel
from ltframe.recipe import build_recipe, load_raw
from ltframe.testing import StopAt, tiny_recipe


def _model(backbone: str) -> LTModel:
    body = timm.create_model(backbone, num_classes=0)
    return LTModel(body, {"main": nn.Linear(body.num_features, 10)})


def _usb_rule(model: nn.Module) -> set[str]:
    """USB 0.3.2 semilearn/core/utils/build.py get_optimizer(bn_wd_skip=True): a parameter
    whose name contains 'bn' or 'bias' goes to the weight_decay = 0 group."""
    return {n for n, _ in model.named_parameters() if "bn" in n or "bias" in n}


@pytest.mark.parametrize("backbone", ["wrn28_2", "resnet32_cifar"])
def test_bias_and_norm_select_exactly_usbs_parameters(backbone):
    model = _model(backbone)
    ids = no_decay_ids(model, ["bias", "norm"])
    ours = {n for n, p in model.named_parameters() if id(p) in ids}
    assert ours == _usb_rule(model)
    assert ours and len(ours) < len(list(model.parameters()))
    # one rule alone: only the head's bias is a bias outside normalisation layers
    bias_only = {n for n, p in model.named_parameters() if id(p) in no_decay_ids(model, ["bias"])}
    assert bias_only == {n for n in ours if n.endswith(".bias")}
    norm_only = {n for n, p in model.named_parameters() if id(p) in no_decay_ids(model, ["norm"])}
    assert norm_only == ours - {"heads.main.bias"}


def test_norm_covers_torch_and_timm_norm_layers():
    from timm.layers import LayerNorm2d, RmsNorm
    for m in (nn.BatchNorm1d(3), nn.SyncBatchNorm(3), nn.GroupNorm(1, 3), nn.LayerNorm(3),
              nn.InstanceNorm2d(3, affine=True), LayerNorm2d(3), RmsNorm(3)):
        assert is_norm(m), type(m).__name__
    for m in (nn.Linear(3, 3), nn.Conv2d(3, 3, 1), nn.Sequential(nn.BatchNorm1d(3))):
        assert not is_norm(m), type(m).__name__


def test_groups_keep_order_and_leave_out_empty_groups():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2, bias=False))
    params = list(model.parameters())
    assert param_groups(params, model, ()) == params  # no rules: the plain list, as before
    groups = param_groups(params, model, ["bias", "norm"])
    assert [len(g["params"]) for g in groups] == [2, 3]
    assert groups[0]["params"][0] is model[0].weight and groups[0]["params"][1] is model[2].weight
    assert groups[1]["weight_decay"] == 0.0 and "weight_decay" not in groups[0]
    only = param_groups([model[2].weight], model, ["bias"])
    assert len(only) == 1 and only[0]["params"] == [model[2].weight]
    with pytest.raises(ValueError, match="unknown entry 'bn'; allowed: bias, norm"):
        param_groups(params, model, ["bn"])


def test_a_weight_decay_step_leaves_excluded_parameters_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-1, 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(param_groups(model.parameters(), model, ["bias", "norm"]), lr=0.1,
                          momentum=0.9, weight_decay=0.5)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # only weight decay moves a parameter
    opt.step()
    for n, p in model.named_parameters():
        if n in ("0.weight", "2.weight"):
            torch.testing.assert_close(p, before[n] * (1 - 0.1 * 0.5))
        else:
            assert torch.equal(p, before[n]), n


def _recipe(registry, tmp_path: Path, **optim):
    return build_recipe(load_raw(tiny_recipe(tmp_path, optim=optim)), registry)


def test_recipe_no_decay_is_validated_resolved_and_overridden_per_stage(tmp_path, registry):
    r = _recipe(registry, tmp_path, name="sgd", lr=0.1, no_decay=["bias", "norm"])
    assert r.optim.no_decay == ("bias", "norm")
    assert r.to_dict()["optim"]["no_decay"] == ["bias", "norm"]
    assert "no_decay" not in _recipe(registry, tmp_path, name="sgd", lr=0.1).to_dict()["optim"]
    with pytest.raises(RecipeError, match=r"optim.no_decay: unknown entry 'bn'; allowed: .*bias"):
        _recipe(registry, tmp_path, name="sgd", no_decay=["bn"])
    with pytest.raises(RecipeError, match="optim.no_decay: expected a list"):
        _recipe(registry, tmp_path, name="sgd", no_decay="bias")
    raw = load_raw(tiny_recipe(tmp_path, optim={"name": "sgd", "no_decay": ["bias"]},
                               stage=[{"name": "a", "steps": 1},
                                      {"name": "b", "steps": 1, "optim": {"no_decay": []}}]))
    r = build_recipe(raw, registry)
    assert [o.no_decay for o in r.stage_optims] == [("bias",), ()]


@pytest.mark.slow
def test_no_decay_run_resumes_bit_exact(tmp_path):
    over = {"run": {"checkpoint_every": 2, "log_every": 1},
            "optim": {"name": "sgd", "lr": 0.05, "weight_decay": 0.01, "no_decay": ["bias", "norm"]},
            "stage": [{"name": "a", "epochs": 2, "steps_per_epoch": 3}]}
    full = Path(start_run(tiny_recipe(tmp_path / "a", **over))["run_dir"])
    with pytest.raises(RunInterrupted):
        start_run(tiny_recipe(tmp_path / "b", **over), plugins=[("stop", StopAt(5))])
    part = tmp_path / "b" / "runs" / "tiny"
    _, side, _ = ckpt.load(part)
    assert len(side["optimizer"]["param_groups"]) == 2
    assert [g["weight_decay"] for g in side["optimizer"]["param_groups"]] == [0.01, 0.0]
    resumed = Path(resume_run(part)["run_dir"])
    a = load_file(str(full / "checkpoints" / "stage0-a.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "stage0-a.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = json.loads((full / "summary.json").read_text())
    assert sa["per_class"] == json.loads((resumed / "summary.json").read_text())["per_class"]
