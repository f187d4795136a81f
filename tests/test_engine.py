"""End-to-end behaviour of the engine on tiny CPU runs."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ltframe import PseudoLabels, hookimpl, resume_run, start_run
from ltframe.engine import checkpoint as ckpt
from ltframe.errors import CheckpointError, DataError, NonFiniteLossError, RecipeError, RunInterrupted
from ltframe.registry import NoParams
from ltframe.testing import HookRecorder, StopAt, tiny_recipe


def _latest_tensors(run_dir: Path) -> dict:
    tensors, _, _ = ckpt.load(run_dir)
    return tensors


def test_run_writes_run_directory_and_summary(tmp_path):
    summary = start_run(tiny_recipe(tmp_path))
    run_dir = Path(summary["run_dir"])
    for name in ("resolved.toml", "run.json", "metrics.jsonl", "summary.json",
                 "splits/labeled.txt", "splits/counts.json", "checkpoints/latest"):
        assert (run_dir / name).is_file(), name
    saved = json.loads((run_dir / "summary.json").read_text())
    for key in ("top1", "many", "medium", "few", "per_class"):
        assert key in saved
    assert len(saved["per_class"]) == 4
    counts = json.loads((run_dir / "splits/counts.json").read_text())
    assert counts["labeled"] == [24, 15, 9, 6]  # exp profile, ratio 4, n_max 24
    assert counts["test"] == [6, 6, 6, 6]
    meta = json.loads((run_dir / "run.json").read_text())
    assert "classics" in meta["plugins"] and "builtin" in meta["plugins"]
    events = [json.loads(line)["event"] for line in (run_dir / "metrics.jsonl").open()]
    assert events.count("eval") == 2 and "train" in events


def test_new_run_never_overwrites_an_earlier_one(tmp_path):
    recipe = tiny_recipe(tmp_path, stage=[{"name": "train", "steps": 1}])
    first = Path(start_run(recipe)["run_dir"])
    before = (first / "summary.json").read_bytes()
    second = Path(start_run(recipe)["run_dir"])
    assert first != second and second.name == "tiny-1"
    assert (first / "summary.json").read_bytes() == before


def test_hooks_fire_in_order_and_evaluate_merges_metrics(tmp_path):
    rec = HookRecorder()
    summary = start_run(tiny_recipe(tmp_path), plugins=[("recorder", rec)])
    names = rec.names()
    assert names[0] == "run_start" and names[-1] == "run_end"
    assert names.count("step_end") == 6 and names.count("epoch_end") == 2
    assert names.index("stage_start") < names.index("step_end") < names.index("stage_end")
    assert summary["stages"][0]["stage"] == "train"
    run_dir = Path(summary["run_dir"])
    evals = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    assert any(e.get("recorder_seen") == 24 for e in evals if e["event"] == "eval")


@pytest.mark.slow
def test_resume_mid_epoch_equals_uninterrupted_run(tmp_path):
    over = {
        "run": {"checkpoint_every": 2, "log_every": 1},
        "data": {"split": {"name": "fraction", "labeled_fraction": 0.5}},
        "stage": [
            {"name": "a", "epochs": 2, "steps_per_epoch": 3, "ema": 0.9,
             "data": "labeled+unlabeled", "views": {"labeled": ["weak"],
                                                     "unlabeled": ["weak", "strong"]}},
            {"name": "b", "epochs": 1, "steps_per_epoch": 3, "train": ["heads.main"],
             "reset": ["heads.main"], "sampler": "class_balanced"},
        ],
    }
    full = Path(start_run(tiny_recipe(tmp_path / "a", **over))["run_dir"])
    with pytest.raises(RunInterrupted, match=r"during step 5 of 6 \(4 completed\).*step-s0-00000004"
                       r".*ltframe resume .*runs/tiny"):
        start_run(tiny_recipe(tmp_path / "b", **over), plugins=[("stop", StopAt(5))])
    part = tmp_path / "b" / "runs" / "tiny"
    _, side, _ = ckpt.load(part)
    assert side["step"] == 4 and side["stage_index"] == 0  # mid-epoch 2 of stage a
    resumed = Path(resume_run(part)["run_dir"])
    a = load_file(str(full / "checkpoints" / "stage1-b.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "stage1-b.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = json.loads((full / "summary.json").read_text())
    sb = json.loads((resumed / "summary.json").read_text())
    assert sa["per_class"] == sb["per_class"]


class _NaNLoss:
    def __init__(self, params, num_classes, class_counts):
        self.calls = 0

    def __call__(self, ctx):
        self.calls += 1
        loss = ctx.logits().logsumexp(1).mean()
        return loss * float("nan") if ctx.epoch >= 1 else loss


class _NaNPlugin:
    @hookimpl
    def ltframe_register(self, registry):
        registry.register("loss", "nan_after_epoch", _NaNLoss, NoParams)


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    recipe = tiny_recipe(tmp_path, stage=[{"name": "train", "epochs": 3, "steps_per_epoch": 2,
                                            "loss": [{"name": "nan_after_epoch"}]}])
    with pytest.raises(NonFiniteLossError, match="non-finite loss.*last good checkpoint"):
        start_run(recipe, plugins=[("nan", _NaNPlugin())])
    run_dir = tmp_path / "runs" / "tiny"
    tensors, side, _ = ckpt.load(run_dir)  # still loads: verified hash
    assert side["step"] == 2  # the end of epoch 1, before the NaN
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("model."))
    assert not (run_dir / "summary.json").exists()


def test_corrupt_checkpoint_is_reported_and_not_loaded(tmp_path):
    run_dir = Path(start_run(tiny_recipe(tmp_path))["run_dir"])
    (run_dir / "summary.json").unlink()  # as if the run had stopped
    for tfile in (run_dir / "checkpoints").glob("*.safetensors"):  # every checkpoint corrupt
        data = bytearray(tfile.read_bytes())
        data[-10:] = bytes(b ^ 0xFF for b in data[-10:])
        tfile.write_bytes(bytes(data))
    latest = (run_dir / "checkpoints/latest").read_text().strip()
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="no usable checkpoint.*corrupt"):
        resume_run(run_dir)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files  # untouched
    (run_dir / "checkpoints" / f"{latest}.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="sidecar .* is corrupt"):
        ckpt.load(run_dir)


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    run_dir = Path(start_run(tiny_recipe(tmp_path))["run_dir"])
    (run_dir / "summary.json").unlink()  # as if the run had stopped
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(CheckpointError, match="does not match this model.*unexpected heads.main.bias"):
        resume_run(run_dir, ["model.heads.main.bias=false"])
    with pytest.raises(DataError, match="split differs"):  # the data changed under the run
        resume_run(run_dir, ["data.source.num_classes=5"])
    # a refused resume changes nothing (resolved.toml, run.json, metrics stay as they were)
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files


def test_frozen_backbone_and_reset_head(tmp_path):
    over = {"stage": [
        {"name": "rep", "steps": 2},
        {"name": "cls", "steps": 2, "train": ["heads.main"], "reset": ["heads.main"]},
    ]}
    run_dir = Path(start_run(tiny_recipe(tmp_path, **over))["run_dir"])
    a = load_file(str(run_dir / "checkpoints/stage0-rep.safetensors"))
    b = load_file(str(run_dir / "checkpoints/stage1-cls.safetensors"))
    backbone = [k for k in a if k.startswith("model.backbone.")]
    assert backbone and all(torch.equal(a[k], b[k]) for k in backbone)  # incl. BN stats
    assert not torch.equal(a["model.heads.main.weight"], b["model.heads.main.weight"])


class _Threshold:
    """Test pseudo-labeler: argmax of the first unlabeled view, confidence >= 0."""

    def __init__(self, params, num_classes, class_counts):
        pass

    def __call__(self, ctx):
        probs = ctx.logits("unlabeled").detach().softmax(1)
        conf, pred = probs.max(1)
        return PseudoLabels(pred, (conf >= 0).float())


class _PLLoss:
    def __init__(self, params, num_classes, class_counts):
        pass

    def __call__(self, ctx):
        logits = ctx.logits("unlabeled:strong")
        ce = torch.nn.functional.cross_entropy(logits, ctx.pseudo.targets, reduction="none")
        return (ce * ctx.pseudo.mask).mean()


class _PLPlugin:
    @hookimpl
    def ltframe_register(self, registry):
        registry.register("pseudo_labeler", "test_argmax", _Threshold, NoParams)
        registry.register("loss", "test_pl", _PLLoss, NoParams)


def test_pseudo_label_diagnostics_use_hidden_labels(tmp_path):
    over = {"data": {"split": {"name": "fraction", "labeled_fraction": 0.5}},
            "stage": [{"name": "ssl", "epochs": 1, "steps_per_epoch": 2,
                       "data": "labeled+unlabeled", "unlabeled_ratio": 2,
                       "pseudo_labeler": {"name": "test_argmax"},
                       "loss": [{"name": "ce"}, {"name": "test_pl", "weight": 0.5}]}]}
    run_dir = Path(start_run(tiny_recipe(tmp_path, **over), plugins=[("pl", _PLPlugin())])
                   ["run_dir"])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    pl = [r for r in rows if r["event"] == "pseudo_labels"]
    assert pl and pl[0]["pl_count"] == 2 * 2 * 8  # steps x (ratio x batch)
    assert len(pl[0]["pl_precision"]) == 4 and len(pl[0]["pl_recall"]) == 4
    train = [r for r in rows if r["event"] == "train"]
    assert {"ce", "test_pl", "total"} <= set(train[0]["loss"])


def test_unknown_model_part_is_a_recipe_error(tmp_path):
    recipe = tiny_recipe(tmp_path, stage=[{"name": "x", "steps": 1, "train": ["heads.aux"]}])
    with pytest.raises(RecipeError, match="unknown model part 'heads.aux'.*heads.main"):
        start_run(recipe)


def test_unlabeled_stage_without_unlabeled_data_is_explained(tmp_path):
    recipe = tiny_recipe(tmp_path, stage=[{"name": "x", "steps": 1, "data": "labeled+unlabeled"}])
    with pytest.raises(RecipeError, match="split has none"):
        start_run(recipe)


def test_missing_data_root_fails_before_writing_anything(tmp_path):
    recipe = tiny_recipe(tmp_path, data={"source": {"name": "cifar10",
                                                    "root": str(tmp_path / "nowhere")}})
    with pytest.raises(DataError, match="no CIFAR-10 found at .*nowhere"):
        start_run(recipe)
    assert not (tmp_path / "runs").exists()


def test_crash_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run_dir = Path(start_run(tiny_recipe(tmp_path))["run_dir"])
    before = (run_dir / "checkpoints/latest").read_text()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(run_dir / "checkpoints", "step-s9-00000001", {"x": torch.ones(2)}, {})
    assert (run_dir / "checkpoints/latest").read_text() == before
    assert not list((run_dir / "checkpoints").glob(".*tmp"))  # no half-written files
    ckpt.load(run_dir)  # the previous checkpoint still loads


class _StepProbe:
    steps: list[int] = []

    def __init__(self, params, **kw):
        pass

    def __call__(self, ctx):
        _StepProbe.steps.append(ctx.step)
        return ctx.logits().logsumexp(1).mean() * 0 + 1.0


class _ProbePlugin:
    @hookimpl
    def ltframe_register(self, registry):
        registry.register("loss", "t_step_probe", _StepProbe, NoParams)


def test_loss_start_skips_the_term_until_its_step(tmp_path):
    _StepProbe.steps = []
    recipe = tiny_recipe(tmp_path, stage=[{"name": "train", "epochs": 2, "steps_per_epoch": 3,
                                            "loss": [{"name": "ce"},
                                                     {"name": "t_step_probe", "start": 4}]}])
    run_dir = Path(start_run(recipe, plugins=[("probe", _ProbePlugin())])["run_dir"])
    assert _StepProbe.steps == [4, 5]  # not called during the warm-up
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    train = [r["loss"] for r in rows if r["event"] == "train"]
    assert train[0]["t_step_probe"] == 0.0 and train[-1]["t_step_probe"] > 0


def test_loss_start_must_be_a_step_count(tmp_path):
    recipe = tiny_recipe(tmp_path, stage=[{"name": "x", "steps": 1,
                                            "loss": [{"name": "ce", "start": -1}]}])
    with pytest.raises(RecipeError, match=r"stage\[0\]\.loss\[0\]\.start"):
        start_run(recipe)


def test_optimizer_impl_keywords(tmp_path):
    from ltframe.plugins import make_plugin_manager

    _, reg = make_plugin_manager()
    w = [torch.nn.Parameter(torch.zeros(3))]
    for name in ("sgd", "adam", "adamw"):
        loop = reg.build(reg.spec("optimizer", {"name": name, "lr": 0.1, "impl": "loop"}, "o"),
                         params=w)
        assert loop.defaults["foreach"] is False
        auto = reg.build(reg.spec("optimizer", {"name": name, "lr": 0.1}, "o"), params=w)
        assert not auto.defaults.get("fused")  # CPU parameters: PyTorch's default kernel
        with pytest.raises(RecipeError, match="fused.*CUDA"):
            reg.build(reg.spec("optimizer", {"name": name, "lr": 0.1, "impl": "fused"}, "o"),
                      params=w)


@pytest.mark.slow
def test_compiled_training_forward_matches_eager(tmp_path):
    vit = {"backbone": "vit_tiny_patch16_224",
           "backbone_args": {"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 32,
                             "num_heads": 2}}
    stage = [{"name": "train", "steps": 3, "steps_per_epoch": 3, "views": {"labeled": ["none"]}}]
    from torch._dynamo.utils import counters

    counters.clear()
    runs = []
    for mode in ("off", "default"):
        recipe = tiny_recipe(tmp_path / mode, model=vit, stage=stage,
                             run={"name": mode, "compile": mode})
        runs.append(_latest_tensors(Path(start_run(recipe)["run_dir"])))
    eager, compiled = runs
    keys = [k for k in eager if k.startswith("model.")]
    assert keys and all(not k.startswith("model._orig_mod") for k in compiled)
    assert all(torch.allclose(eager[k], compiled[k], atol=1e-4) for k in keys)
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled graph really ran
