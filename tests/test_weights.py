"""[model] weights / pretrained: starting weights matched to the backbone, recorded in run.json,
not re-applied on resume; offline pretrained fails fast with one line."""

import argparse
import json
import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from ltframe import resume_run, start_run
from ltframe.engine.setup import build_model
from ltframe.errors import RecipeError, RunInterrupted
from ltframe.models import weights as W
from ltframe.recipe import load_recipe
from ltframe.testing import StopAt, tiny_recipe


def _model(registry, tmp_path, **over):
    recipe = load_recipe(tiny_recipe(tmp_path, **over), registry)
    torch.manual_seed(1)
    return build_model(recipe, registry, 4), recipe


def _timm_state(name="resnet32_cifar", num_classes=4, seed=0):
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=num_classes).state_dict()


def test_timm_file_with_prefix_loads_backbone_and_fitting_classifier(registry, tmp_path):
    model, _ = _model(registry, tmp_path)
    state = _timm_state(num_classes=4)
    f = tmp_path / "w.safetensors"
    save_file({f"module.{k}": v for k, v in state.items()}, str(f))
    rec = W.load_weights(model, f)
    own = model.state_dict()
    assert torch.equal(own["backbone.conv1.weight"], state["conv1.weight"])
    assert torch.equal(own["heads.main.weight"], state["fc.weight"])  # the head asked for it
    assert rec["loaded"] == len(state) and rec["skipped"] == []
    assert rec["sha256"] == W.sha256_file(f) and len(rec["sha256"]) == 64


def test_classifier_of_other_shape_is_skipped(registry, tmp_path):
    model, _ = _model(registry, tmp_path)
    before = model.heads.main.weight.clone()
    state = _timm_state(num_classes=10)
    f = tmp_path / "w.pth"
    torch.save({"state_dict": state, "epoch": 3}, f)  # a nested training checkpoint
    rec = W.load_weights(model, f)
    assert rec["skipped"] == ["fc.bias", "fc.weight"]
    assert torch.equal(model.heads.main.weight, before)
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])


def test_a_head_that_does_not_ask_skips_the_classifier(registry, tmp_path):
    model, _ = _model(registry, tmp_path, model={"heads": {"main": {"name": "cosine"}}})
    f = tmp_path / "w.safetensors"
    save_file(_timm_state(num_classes=4), str(f))
    assert W.load_weights(model, f)["skipped"] == ["fc.bias", "fc.weight"]


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.pop("conv1.weight"), ["missing conv1.weight"]),
    (lambda s: s.update({"extra.weight": torch.zeros(2)}), ["unexpected extra.weight"]),
    (lambda s: s.update({"conv1.weight": torch.zeros(16, 3, 5, 5)}),
     ["shape conv1.weight (16, 3, 5, 5) in the file vs (16, 3, 3, 3)"]),
])
def test_mismatch_is_one_line_naming_keys_and_fix(registry, tmp_path, edit, words):
    model, _ = _model(registry, tmp_path)
    state = _timm_state()
    edit(state)
    f = tmp_path / "w.safetensors"
    save_file(state, str(f))
    with pytest.raises(RecipeError) as err:
        W.load_weights(model, f)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("model.weights: ")
    assert all(w in msg for w in words) and "model.backbone" in msg


def test_pickled_objects_are_refused(registry, tmp_path):
    model, _ = _model(registry, tmp_path)
    f = tmp_path / "w.pt"
    torch.save({"state_dict": _timm_state(), "args": argparse.Namespace(lr=0.1)}, f)
    with pytest.raises(RecipeError, match=r"weights_only=True.*\.safetensors"):
        W.load_weights(model, f)
    with pytest.raises(RecipeError, match="does not exist"):
        W.load_weights(model, tmp_path / "none.safetensors")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(RecipeError, match="not a weights file"):
        W.load_weights(model, tmp_path / "w.npz")


def test_run_records_weights_and_resume_does_not_reload(registry, tmp_path):
    """A run starts from the file (run.json says so); resume restores its checkpoint even when
    the file is gone; a finished run directory is itself a weights source."""
    state = _timm_state(num_classes=10, seed=3)
    f = tmp_path / "w.safetensors"
    save_file(state, str(f))
    seen = {}

    class Grab:
        from ltframe.hookspecs import hookimpl

        @hookimpl
        def ltframe_run_start(self, run):
            seen["conv1"] = run.model.backbone.conv1.weight.detach().cpu().clone()

    recipe = tiny_recipe(tmp_path, model={"weights": str(f)})
    with pytest.raises(RunInterrupted):
        start_run(recipe, plugins=[("grab", Grab()), ("stop", StopAt(4))])
    assert torch.equal(seen.pop("conv1"), state["conv1.weight"])
    run_dir = tmp_path / "runs" / "tiny"
    rec = json.loads((run_dir / "run.json").read_text())["weights"]
    assert rec["path"] == str(f.resolve()) and rec["sha256"] == W.sha256_file(f)
    assert rec["loaded"] == len(state) - 2 and rec["skipped"] == ["fc.bias", "fc.weight"]
    f.unlink()
    summary = resume_run(run_dir)  # restores its checkpoint: the weights file is not needed
    assert summary["top1"] >= 0

    model, _ = _model(registry, tmp_path / "b")
    rec = W.load_weights(model, run_dir)
    assert rec["skipped"] == [] and rec["loaded"] == len(model.state_dict())


def test_weights_and_pretrained_are_exclusive(registry, tmp_path):
    model, recipe = _model(registry, tmp_path, model={"weights": "w.safetensors",
                                                      "pretrained": True})
    with pytest.raises(RecipeError, match="both set"):
        W.apply_start_weights(model, recipe.model)
    with pytest.raises(RecipeError, match="use model.pretrained = true"):
        load_recipe(tiny_recipe(tmp_path, model={"backbone_args": {"pretrained": True}}),
                    registry)


def test_pretrained_without_published_weights(registry, tmp_path):
    model, recipe = _model(registry, tmp_path, model={"pretrained": True})
    with pytest.raises(RecipeError, match="no published weights for resnet32_cifar"):
        W.apply_start_weights(model, recipe.model)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return cache


def test_pretrained_offline_fails_fast(registry, tmp_path, empty_hub, monkeypatch):
    model, recipe = _model(registry, tmp_path, model={"backbone": "test_resnet",
                                                      "pretrained": True})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(RecipeError) as err:
        W.apply_start_weights(model, recipe.model)
    assert time.perf_counter() - t0 < 5
    msg = str(err.value)
    assert "\n" not in msg and "not in the hub cache" in msg and str(empty_hub) in msg
    assert "HF_HUB_OFFLINE is set" in msg and 'model.weights = "PATH"' in msg


def test_pretrained_unreachable_hub_fails_fast(registry, tmp_path, empty_hub, monkeypatch):
    from huggingface_hub import constants

    model, recipe = _model(registry, tmp_path, model={"backbone": "test_resnet",
                                                      "pretrained": True})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(RecipeError, match="127.0.0.1 cannot be reached"):
        W.apply_start_weights(model, recipe.model)
    assert time.perf_counter() - t0 < 5


def test_pretrained_from_the_hub_cache(registry, tmp_path, empty_hub, monkeypatch):
    """Cached weights load without any network (HF_HUB_OFFLINE set); the classifier is dropped."""
    cfg = timm.models.get_pretrained_cfg("test_resnet")
    snap = empty_hub / f"models--{cfg.hf_hub_id.replace('/', '--')}"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("0" * 40)
    (snap / "snapshots" / ("0" * 40)).mkdir(parents=True)
    state = _timm_state("test_resnet", num_classes=1000, seed=5)
    save_file(state, str(snap / "snapshots" / ("0" * 40) / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, recipe = _model(registry, tmp_path, model={"backbone": "test_resnet",
                                                      "pretrained": True})
    rec = W.apply_start_weights(model, recipe.model)
    assert rec["pretrained"] == cfg.hf_hub_id and rec["sha256"] == W.sha256_file(rec["path"])
    own = model.backbone.state_dict()
    assert rec["loaded"] == len(own) and all(torch.equal(own[k], state[k]) for k in own)
    assert "loaded" in W.describe_weights(rec) and cfg.hf_hub_id in W.describe_weights(rec)


def test_cli_pretrained_offline_one_line(tmp_path, empty_hub, monkeypatch):
    from click.testing import CliRunner

    from ltframe.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = tiny_recipe(tmp_path, model={"backbone": "test_resnet", "pretrained": True})
    t0 = time.perf_counter()
    res = CliRunner().invoke(main, ["run", str(recipe), "-q"])
    assert time.perf_counter() - t0 < 20
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert lines[0].startswith("error: model.pretrained: timm's weights for test_resnet")
    assert "internal error" not in res.output and not (tmp_path / "runs").exists()
