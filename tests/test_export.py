"""A model out: ltframe.load_model, ltframe export (loaded by timm alone), ltframe eval --data."""

import json
from pathlib import Path

import pytest
import timm
import torch
from click.testing import CliRunner

import ltframe
from ltframe import start_run
from ltframe.cli import main
from ltframe.data.sources import decode_image
from ltframe.errors import DataError
from ltframe.export import LTClassifier, affine_form, export_run, load_model
from ltframe.predict import evaluate_folder, predict_files
from ltframe.testing import tiny_recipe, write_image_folder

CLASSES = [f"class{i}" for i in range(4)]  # the synthetic source's class names


def _run(tmp: Path, **over) -> Path:
    over.setdefault("eval", {"posthoc_tau": [1.0, 0.0]})
    over.setdefault("run", {"device": "cpu"})  # predict on the CPU too: the same arithmetic as timm's
    recipe = tiny_recipe(tmp, stage=[{"name": "train", "epochs": 1, "steps_per_epoch": 3,
                                      "eval_every": 1, "ema": 0.9}], **over)
    return Path(start_run(recipe)["run_dir"])


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory) -> Path:
    return _run(tmp_path_factory.mktemp("linear"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    write_image_folder(root, CLASSES[:3], 3, size=20)  # resized to the run's 16 px
    return root


def _predicted(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images, probabilities) as `ltframe predict` reported them (all classes)."""
    x = torch.stack([decode_image(r["file"], 16) for r in rows])
    p = torch.zeros(len(rows), len(CLASSES))
    for i, r in enumerate(rows):
        for t in r["top"]:
            p[i, t["index"]] = t["prob"]
    return x, p


def test_exported_model_loaded_by_timm_gives_predict_probabilities(linear_run, images,
                                                                   tmp_path):
    rows = predict_files(linear_run, [images], top_k=4)
    x, want = _predicted(rows)
    meta = export_run(linear_run, tmp_path / "model")
    assert meta["format"] == "timm" and meta["tau"] == 1.0 and meta["tau_folded"]
    side = json.loads((tmp_path / "model.json").read_text())
    assert side["classes"] == CLASSES and side["input_size"] == [3, 16, 16]
    assert len(side["mean"]) == 3 and len(side["std"]) == 3 and len(side["prior"]) == 4
    assert side["sha256"] and side["backbone"] == "resnet32_cifar"
    file = tmp_path / "model.safetensors"
    net = timm.create_model("resnet32_cifar", num_classes=4, pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(file), num_classes=4,
                                                        custom_load=False)).eval()
    clf = load_model(linear_run)
    with torch.no_grad():
        torch.testing.assert_close(net(clf.preprocess(x)).softmax(1), want)
    torch.testing.assert_close(load_model(file).predict_proba(x), want)
    torch.testing.assert_close(clf.predict_proba(x), want)
    # the JSON's own arguments build the same model; tau=0 undoes the folded adjustment
    kw = dict(side["timm"])
    net2 = timm.create_model(kw.pop("model_name"), **kw).eval()
    with torch.no_grad():
        torch.testing.assert_close(net2(clf.preprocess(x)).softmax(1), want)
    torch.testing.assert_close(load_model(file, tau=0.0)(clf.preprocess(x)),
                               load_model(linear_run, tau=0.0)(clf.preprocess(x)),
                               rtol=1e-4, atol=1e-4)


def test_load_model_is_a_plain_eval_module(linear_run):
    clf = ltframe.load_model(linear_run)
    assert isinstance(clf, LTClassifier) and not clf.training
    assert not any(m.training for m in clf.modules())
    assert clf.classes == CLASSES and clf.image_size == 16 and clf.tau == 1.0
    assert set(dict(clf.named_children())) == {"net"}
    assert set(dict(clf.net.named_children())) == {"backbone", "head"}  # the eval head only
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        raw = load_model(linear_run, tau=0.0)(x)
        torch.testing.assert_close(clf(x), raw - clf.log_prior)  # logits - 1 * log prior
    # the final weights: the last checkpoint's (where the stage's EMA weights became the model)
    from ltframe.engine import checkpoint as ckpt

    tensors, side, _ = ckpt.load(linear_run)
    assert torch.equal(clf.net.backbone.conv1.weight, tensors["model.backbone.conv1.weight"])
    assert torch.equal(clf.net.head.weight, tensors["model.heads.main.weight"])


@torch.no_grad()
def test_affine_form_folds_linear_heads_only(registry):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=g)
    heads = {name: registry.build(name, kind="head", in_features=8, num_classes=3)
             for name in ("linear", "lws", "tau_norm", "cosine", "ncm", "mlp")}
    heads["lws"].scale.weight.uniform_(0.5, 2.0)
    heads["tau_norm"].normalise.fill_(True)
    heads["tau_norm"].tau.fill_(0.7)
    heads["ncm"].means.normal_()
    for name in ("linear", "lws", "tau_norm"):
        w, b = affine_form(heads[name], 8)
        torch.testing.assert_close(x @ w.t() + b, heads[name](x), rtol=1e-5, atol=1e-5)
    for name in ("cosine", "ncm", "mlp"):
        assert affine_form(heads[name], 8) is None, name


@pytest.mark.slow
def test_other_heads_keep_the_ltframe_module(tmp_path, images):
    run = _run(tmp_path, model={"heads": {"main": {"name": "cosine", "scale": 16.0}}})
    meta = export_run(run, tmp_path / "cos.safetensors")
    assert meta["format"] == "ltframe" and "not linear" in meta["reason"]
    rows = predict_files(run, [images], top_k=4)
    x, want = _predicted(rows)
    torch.testing.assert_close(load_model(tmp_path / "cos.safetensors").predict_proba(x), want)
    with pytest.raises(ltframe.LtframeError, match="cannot export .* plain timm model"):
        export_run(run, tmp_path / "again", fmt="timm")


def test_eval_data_on_another_folder(linear_run, images, tmp_path):
    m = evaluate_folder(linear_run, images, ["eval.posthoc_tau=[0.0, 1.0]"])
    assert m["images"] == 9 and [r["posthoc_tau"] for r in m["rows"]] == [0.0, 1.0]
    clf = load_model(linear_run, tau=0.0)
    files = [f for c in CLASSES[:3] for f in sorted((images / c).glob("*.png"))]
    x = torch.stack([decode_image(str(f), 16) for f in files])
    pred = clf.predict_proba(x).argmax(1)
    labels = torch.tensor([CLASSES.index(f.parent.name) for f in files])
    assert m["top1"] == pytest.approx(100.0 * (pred == labels).float().mean().item())
    assert m["per_class"][3] == 0.0  # class3 has no images here
    bad = tmp_path / "bad"
    write_image_folder(bad, ["class0", "dog"], 1, size=16)
    with pytest.raises(DataError, match="class 'dog' is not one of the run's 4 classes"):
        evaluate_folder(linear_run, bad)


def test_cli_export_and_eval_data(linear_run, images, tmp_path):
    res = CliRunner().invoke(main, ["export", str(linear_run), "--out", str(tmp_path / "m"),
                                    "--tau", "0"])
    assert res.exit_code == 0, res.output
    assert "timm.create_model('resnet32_cifar'" in res.output
    assert json.loads((tmp_path / "m.json").read_text())["tau"] == 0.0
    res = CliRunner().invoke(main, ["eval", str(linear_run), "--data", str(images), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["images"] == 9
    bad = tmp_path / "bad"
    write_image_folder(bad, ["cat"], 1, size=16)
    res = CliRunner().invoke(main, ["eval", str(linear_run), "--data", str(bad)])
    assert res.exit_code == 1 and "error: --data" in res.output and "'cat'" in res.output
