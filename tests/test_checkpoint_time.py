"""Checkpoints by time (`run.checkpoint_minutes`) written on a background thread (issue 19)."""

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ltframe import resume_run, start_run
from ltframe.engine import checkpoint as ckpt
from ltframe.engine import ckpt_writer
from ltframe.engine.ckpt_writer import CheckpointWriter
from ltframe.errors import DiskWriteError, RunInterrupted
from ltframe.testing import StopAt, tiny_recipe

STAGE = {"stage": [{"name": "a", "epochs": 3, "steps_per_epoch": 4}]}


def _stems(run_dir: Path) -> list[str]:
    return sorted(p.stem for p in (run_dir / "checkpoints").glob("*.json"))


def _final(run_dir: Path) -> dict:
    return load_file(str(run_dir / "checkpoints" / "stage0-a.safetensors"))


def test_minutes_not_yet_passed_means_only_the_stage_checkpoint(tmp_path):
    res = start_run(tiny_recipe(tmp_path, run={"checkpoint_minutes": 10, "log_every": 1}, **STAGE))
    assert _stems(Path(res["run_dir"])) == ["stage0-a"]  # 12 steps, 3 epoch ends: none due


def test_every_epoch_end_with_zero_minutes(tmp_path):
    res = start_run(tiny_recipe(tmp_path, run={"checkpoint_minutes": 0, "log_every": 1}, **STAGE))
    # keep = 2 step checkpoints: epochs ending at steps 4 and 8 (the last epoch is the stage's)
    assert _stems(Path(res["run_dir"])) == ["stage0-a", "step-s0-00000004", "step-s0-00000008"]


def test_due_minutes_checkpoint_at_log_steps_and_resume_exactly(tmp_path):
    over = {"run": {"checkpoint_minutes": 1e-9, "log_every": 3}, **STAGE}
    full = _final(Path(start_run(tiny_recipe(tmp_path / "full", **over))["run_dir"]))
    with pytest.raises(RunInterrupted):
        start_run(tiny_recipe(tmp_path / "b", **over), plugins=[("stop", StopAt(7))])
    run_dir = tmp_path / "b" / "runs" / "tiny"
    # due at every log step (3, 6) and epoch end (4): the newest two are kept
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-s0-00000006"
    assert _stems(run_dir) == ["step-s0-00000004", "step-s0-00000006"]
    resume_run(run_dir)
    resumed = _final(run_dir)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def _slow_save(monkeypatch, gate: threading.Event, started: threading.Event):
    real = ckpt.save

    def save(*a, **k):
        started.set()
        assert gate.wait(10)
        return real(*a, **k)

    monkeypatch.setattr(ckpt_writer.ckpt, "save", save)


def test_submit_returns_before_the_files_are_written_from_a_snapshot(tmp_path, monkeypatch):
    gate, started = threading.Event(), threading.Event()
    _slow_save(monkeypatch, gate, started)
    w = CheckpointWriter()
    weight = torch.arange(6.0)
    w.submit(tmp_path, "step-s0-00000001", {"model.w": weight}, {"step": 1})
    assert started.wait(10) and w.in_flight  # returned while the thread waits to write
    assert not (tmp_path / "step-s0-00000001.safetensors").exists()
    weight.add_(100)  # training goes on and changes the weights in place
    gate.set()
    assert w.last == tmp_path / "step-s0-00000001.safetensors"  # waits for the write
    meta = json.loads(w.last.with_suffix(".json").read_text())
    assert torch.equal(load_file(str(w.last))["model.w"], torch.arange(6.0)) and meta["step"] == 1
    assert (tmp_path / "latest").read_text().strip() == "step-s0-00000001"


def test_meta_is_frozen_at_submit(tmp_path, monkeypatch):
    gate, started = threading.Event(), threading.Event()
    _slow_save(monkeypatch, gate, started)
    w = CheckpointWriter()
    history = [{"stage": "a"}]
    w.submit(tmp_path, "step-s0-00000002", {"model.w": torch.ones(2)}, {"history": history})
    history.append({"stage": "b"})  # the trainer's history grows while the thread writes
    gate.set()
    meta = json.loads(w.last.with_suffix(".json").read_text())
    assert meta["history"] == [{"stage": "a"}]


def test_a_failed_background_write_is_raised_by_the_next_submit(tmp_path, monkeypatch):
    def full_disk(ckpt_dir, stem, *a, **k):
        raise ckpt.write_failed(ckpt_dir / f"{stem}.safetensors", OSError(28, "No space left"))

    monkeypatch.setattr(ckpt_writer.ckpt, "save", full_disk)
    w = CheckpointWriter()
    w.submit(tmp_path, "step-s0-00000001", {"model.w": torch.ones(2)}, {})
    with pytest.raises(DiskWriteError, match="no space left while writing .*step-s0-00000001"):
        w.submit(tmp_path, "step-s0-00000002", {"model.w": torch.ones(2)}, {})
    w.wait()  # raised once
    assert w.last is None


def test_a_failed_write_during_training_stops_the_run_naming_the_file(tmp_path, monkeypatch):
    real = ckpt.save

    def failing(ckpt_dir, stem, *a, **k):
        if stem.startswith("step-"):
            raise ckpt.write_failed(ckpt_dir / f"{stem}.safetensors", OSError(28, "No space left"))
        return real(ckpt_dir, stem, *a, **k)

    monkeypatch.setattr(ckpt_writer.ckpt, "save", failing)
    with pytest.raises(DiskWriteError, match="no space left while writing .*step-s0-00000004"):
        start_run(tiny_recipe(tmp_path, run={"checkpoint_minutes": 0}, **STAGE))


def test_checkpoint_minutes_is_bounded(tmp_path):
    from ltframe.errors import RecipeError

    with pytest.raises(RecipeError, match="checkpoint_minutes"):
        start_run(tiny_recipe(tmp_path, run={"checkpoint_minutes": -1}))
