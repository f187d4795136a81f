"""Reported numbers, epoch-aligned sampling, post-hoc evaluation of finished runs, and recipe
values caught before anything is written."""

import json
from pathlib import Path

import pytest
import torch

from ltframe import evaluate_checkpoint, hookimpl, load_recipe, start_run
from ltframe.data.samplers import BatchStream
from ltframe.errors import RecipeError
from ltframe.plugins import make_plugin_manager
from ltframe.registry import NoParams
from ltframe.testing import tiny_recipe

TWO_STAGES = {"stage": [
    {"name": "rep", "epochs": 2, "steps_per_epoch": 2, "eval_every": 1},
    {"name": "cls", "epochs": 4, "steps_per_epoch": 2, "eval_every": 1, "train": ["heads.main"]},
]}


def _evals(run_dir: Path, stage: str) -> list[dict]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").open())
    return [r for r in rows if r["event"] == "eval" and r["stage"] == stage]


@pytest.mark.parametrize("report", ["last", "best", "mean_last_k"])
def test_reported_number_follows_the_protocol_over_the_final_stage(tmp_path, report):
    summary = start_run(tiny_recipe(tmp_path, **TWO_STAGES,
                                    eval={"report": report, "last_k": 3}))
    evals = _evals(Path(summary["run_dir"]), "cls")
    assert len(evals) == 4
    top1 = [e["top1"] for e in evals]
    expected = {"last": top1[-1], "best": max(top1), "mean_last_k": sum(top1[-3:]) / 3}[report]
    assert summary["top1"] == pytest.approx(expected)
    assert summary["report"] == report
    assert summary["last"]["top1"] == top1[-1]  # the last evaluation is always kept
    if report == "best":
        assert summary["best_epoch"] == evals[top1.index(max(top1))]["epoch"]


def test_batch_stream_epochs_line_up_with_sampler_epochs():
    class Recorder:
        def __init__(self, n):
            self.n, self.epochs = n, []

        def __len__(self):
            return self.n

        def epoch_indices(self, epoch):
            self.epochs.append(epoch)
            return torch.arange(self.n) + 100 * epoch

    s = BatchStream(Recorder(10), torch.arange(1000), 4, epoch_aligned=True)
    assert s.batches_per_epoch() == 3
    sizes = [s.next().numel() for _ in range(6)]
    assert sizes == [4, 4, 2, 4, 4, 2] and s.epoch == 2
    d = BatchStream(Recorder(10), torch.arange(1000), 4, epoch_aligned=True, drop_last=True)
    batches = [d.next() for _ in range(4)]
    assert d.batches_per_epoch() == 2 and [b.numel() for b in batches] == [4] * 4
    assert batches[2][0] == 100  # epoch 1 starts fresh, the remainder of epoch 0 is skipped
    w = BatchStream(Recorder(10), torch.arange(1000), 4)  # endless: batches span epochs
    assert [w.next().numel() for _ in range(3)] == [4, 4, 4] and w.epoch == 1


class _EpochSampler:
    """Records the stage epoch at which each sampler epoch is first asked for."""

    log: list[tuple[int, int]] = []
    stage_epoch = 0

    def __init__(self, params, labels, num_classes, seed, rank=0, world_size=1):
        self.n = labels.numel()

    def __len__(self):
        return self.n

    def epoch_indices(self, epoch):
        _EpochSampler.log.append((epoch, _EpochSampler.stage_epoch))
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch))


class _EpochPlugin:
    @hookimpl
    def ltframe_register(self, registry):
        registry.register("sampler", "epoch_recorder", _EpochSampler, NoParams)

    @hookimpl
    def ltframe_epoch_start(self, run, stage, epoch):
        _EpochSampler.stage_epoch = epoch


def test_sampler_epoch_is_the_stage_epoch_with_default_steps_per_epoch(tmp_path):
    _EpochSampler.log = []
    recipe = tiny_recipe(tmp_path, stage=[{"name": "t", "epochs": 3, "steps_per_epoch": 0,
                                           "sampler": "epoch_recorder", "eval_every": 0}])
    summary = start_run(recipe, plugins=[("epochs", _EpochPlugin())])
    rows = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").open()]
    start = next(r for r in rows if r["event"] == "stage_start")
    n_labeled = sum(summary["labeled_counts"])
    assert start["steps_per_epoch"] == -(-n_labeled // 8)  # ceil: the last batch is smaller
    assert _EpochSampler.log == [(0, 0), (1, 1), (2, 2)]


def test_eval_of_a_finished_run_with_other_eval_settings(tmp_path):
    run_dir = Path(start_run(tiny_recipe(tmp_path))["run_dir"])
    plain = evaluate_checkpoint(run_dir)
    many = evaluate_checkpoint(run_dir, ["eval.posthoc_tau=[0.0, 1.0, 2.0]"])
    assert [r["posthoc_tau"] for r in many["rows"]] == [0.0, 1.0, 2.0]
    assert many["rows"][0]["top1"] == plain["top1"] == many["top1"]
    adjusted = evaluate_checkpoint(run_dir, ["eval.posthoc_tau=2.0"])
    assert many["rows"][2]["top1"] == adjusted["top1"]
    with pytest.raises(RecipeError, match="only \\[eval\\] values"):
        evaluate_checkpoint(run_dir, ["optim.lr=0.1"])
    assert not (run_dir / "error.log").exists()


@pytest.mark.parametrize("over, message", [
    ({"data": {"batch_size": 0}}, "data.batch_size: 0 is out of range; it must be >= 1"),
    ({"run": {"log_every": 0}}, "run.log_every: 0 is out of range"),
    ({"data": {"longtail": {"ratio": 0.5}}}, "data.longtail.ratio: 0.5 is out of range"),
    ({"data": {"longtail": {"ratio": -3}}}, "data.longtail.ratio: -3 is out of range"),
    ({"data": {"val_per_class": -1}}, "data.val_per_class: -1 is out of range"),
    ({"stage": [{"epochs": -2}]}, r"stage\[0\].epochs: -2 is out of range"),
    ({"stage": [{"epochs": 1, "ema": 1.5}]}, r"stage\[0\].ema: 1.5 is out of range"),
    ({"eval": {"posthoc_tau": [1.0, -1.0]}}, "eval.posthoc_tau: -1 is out of range"),
    ({"run": {"name": "../x"}}, "run.name: '../x' is not a plain name"),
    ({"run": {"name": "/tmp/abs"}}, "run.name: '/tmp/abs' is not a plain name"),
    ({"model": {"backbone_args": {"checkpoint_path": "w.pth"}}},
     "model.backbone_args.checkpoint_path: ltframe does not hand file paths"),
])
def test_bad_values_are_caught_with_their_path_before_anything_is_written(tmp_path, over, message):
    _, registry = make_plugin_manager()
    with pytest.raises(RecipeError, match=message):
        load_recipe(tiny_recipe(tmp_path, **over), registry)
    with pytest.raises(RecipeError, match=message):
        start_run(tiny_recipe(tmp_path, **over))
    assert not (tmp_path / "runs").exists()


def test_plugin_params_get_the_same_bounds(tmp_path):
    from ltframe.config import params_help

    _, registry = make_plugin_manager()
    entry = registry.get("lr_schedule", "step")
    assert any("(>= 0)" in default for _, _, default in params_help(entry.params))


def test_empty_recipe_and_missing_extends_are_named(tmp_path):
    _, registry = make_plugin_manager()
    empty = tmp_path / "empty.toml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(RecipeError, match="empty.toml is empty"):
        load_recipe(empty, registry)
    child = tmp_path / "child.toml"
    child.write_text('extends = "nowhere.toml"\n[run]\nname = "x"\n')
    with pytest.raises(RecipeError, match="child.toml: extends = \"nowhere.toml\" but .* does not exist"):
        load_recipe(child, registry)


def test_frozen_bn_option_keeps_or_updates_statistics(tmp_path):
    from safetensors.torch import load_file

    moved = {}
    for mode in ("frozen", "update"):
        over = {"stage": [{"name": "rep", "steps": 2},
                          {"name": "cls", "steps": 2, "train": ["heads.main"], "frozen_bn": mode}]}
        run_dir = Path(start_run(tiny_recipe(tmp_path / mode, **over))["run_dir"])
        a = load_file(str(run_dir / "checkpoints/stage0-rep.safetensors"))
        b = load_file(str(run_dir / "checkpoints/stage1-cls.safetensors"))
        stats = [k for k in a if k.endswith("running_mean")]
        params = [k for k in a if k.startswith("model.backbone.") and k.endswith("weight")]
        assert all(torch.equal(a[k], b[k]) for k in params)
        moved[mode] = not all(torch.equal(a[k], b[k]) for k in stats)
    assert moved == {"frozen": False, "update": True}


def test_out_that_is_a_file_and_corrupt_run_json_are_named(tmp_path):
    from ltframe import resume_run
    from ltframe.errors import LtframeError

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LtframeError, match="is a file, not a folder"):
        start_run(tiny_recipe(tmp_path), out_dir=blocker)
    run_dir = Path(start_run(tiny_recipe(tmp_path))["run_dir"])
    (run_dir / "summary.json").unlink()
    (run_dir / "run.json").write_text("{broken")
    with pytest.raises(LtframeError, match="run.json is corrupt"):
        resume_run(run_dir)


def test_unwritable_out_dir_from_the_recipe_fails_before_data_is_loaded(tmp_path, monkeypatch):
    import os

    from ltframe.errors import LtframeError

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, m, *a, **k: False if Path(p) == locked else real(p, m))
    with pytest.raises(LtframeError, match="run.out_dir .*cannot write in the folder"):
        start_run(tiny_recipe(tmp_path), [f'run.out_dir="{locked / "runs"}"'])
    assert not (locked / "runs").exists()
