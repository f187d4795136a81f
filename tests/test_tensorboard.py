"""The `tensorboard` logger: a short real run's metrics.jsonl records read back from the event
files; loggers come from `run.loggers` and see every record through `ltframe_log`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ltframe import start_run
from ltframe.errors import RecipeError
from ltframe.testing import tiny_recipe

pytest.importorskip("tensorboard")


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_equal_the_metrics_file(tmp_path):
    stages = [{"name": "a", "epochs": 2, "steps_per_epoch": 3},
              {"name": "b", "epochs": 1, "steps_per_epoch": 3, "train": ["heads"]}]
    recipe = tiny_recipe(tmp_path, run={"name": "tb", "log_every": 3,
                                        "loggers": [{"name": "tensorboard"}]}, stage=stages)
    run_dir = Path(start_run(recipe)["run_dir"])
    tb = _scalars(run_dir / "tensorboard")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    evals = [r for r in rows if r["event"] == "eval"]
    offsets = {"a": 0, "b": 6}  # stage b starts where stage a's 6 steps end
    assert [v for _, v in tb["eval/top1"]] == pytest.approx([r["top1"] for r in evals])
    assert [s for s, _ in tb["eval/top1"]] == [offsets[r["stage"]] + r["step"] for r in evals]
    trains = [r for r in rows if r["event"] == "train"]
    assert [v for _, v in tb["loss/ce"]] == pytest.approx([r["loss"]["ce"] for r in trains])
    assert [v for _, v in tb["train/lr"]] == pytest.approx([r["lr"] for r in trains])


def test_unknown_logger_is_a_recipe_error(tmp_path):
    recipe = tiny_recipe(tmp_path, run={"name": "x", "loggers": [{"name": "tensorbord"}]})
    with pytest.raises(RecipeError, match="tensorboard"):
        start_run(recipe)
    assert not (tmp_path / "runs" / "x").exists()


def test_mask_ratio_reaches_tensorboard(tmp_path):
    from types import SimpleNamespace

    from ltframe.plugins import make_plugin_manager

    registry = make_plugin_manager()[1]
    logger = registry.build(registry.spec("logger", {"name": "tensorboard"}, "run.loggers[0]"))
    run = SimpleNamespace(run_dir=tmp_path, is_main=True)
    logger.ltframe_run_start(run=run)
    logger.ltframe_log(run=run, event="stage_start", data={"stage": "s", "total_steps": 4})
    for step, ratio in ((2, 0.25), (4, 0.5)):
        logger.ltframe_log(run=run, event="train", data={"stage": "s", "step": step, "lr": 0.1,
                                                         "loss": {"total": 1.0}, "mask_ratio": ratio})
    logger.close()
    assert _scalars(tmp_path / "tensorboard")["train/mask_ratio"] == [(2, 0.25), (4, 0.5)]
