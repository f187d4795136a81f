"""Recovery works as the messages say: fallback to a valid checkpoint, --from, finished runs,
finite checkpoints after a NaN, no duplicated metric lines, overrides recorded."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ltframe import hookimpl, resume_run, start_run
from ltframe.engine import checkpoint as ckpt
from ltframe.engine.report import Reporter
from ltframe.errors import CheckpointError, NonFiniteLossError, RunInterrupted
from ltframe.testing import StopAt, tiny_recipe

OVER = {"run": {"checkpoint_every": 2, "log_every": 1},
        "stage": [{"name": "a", "epochs": 2, "steps_per_epoch": 3}]}


class _Messages(Reporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)


def _interrupted(tmp_path: Path, stop: int = 5, **over) -> Path:
    with pytest.raises(RunInterrupted):
        start_run(tiny_recipe(tmp_path, **{**OVER, **over}), plugins=[("stop", StopAt(stop))])
    return tmp_path / "runs" / "tiny"


def _final(run_dir: Path) -> dict:
    return load_file(str(run_dir / "checkpoints" / "stage0-a.safetensors"))


def _files(run_dir: Path) -> dict:
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def test_resume_falls_back_to_the_newest_valid_checkpoint(tmp_path):
    full = _final(Path(start_run(tiny_recipe(tmp_path / "full", **OVER))["run_dir"]))
    run_dir = _interrupted(tmp_path / "b")
    latest = (run_dir / "checkpoints/latest").read_text().strip()
    assert latest == "step-s0-00000004"
    tfile = run_dir / "checkpoints" / f"{latest}.safetensors"
    tfile.write_bytes(tfile.read_bytes()[:100])  # truncated by a crash
    rep = _Messages()
    resume_run(run_dir, reporter=rep)
    assert any("skipped checkpoint step-s0-00000004" in m and "corrupt" in m for m in rep.lines)
    assert any("from step-s0-00000003" in m for m in rep.lines)
    resumed = _final(run_dir)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_a_sidecar_missing_a_key_is_named_and_skipped(tmp_path):
    run_dir = _interrupted(tmp_path)
    side = run_dir / "checkpoints" / "step-s0-00000004.json"
    meta = json.loads(side.read_text())
    del meta["step"]
    side.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="lacks 'step'"):
        ckpt.load(side)
    rep = _Messages()
    resume_run(run_dir, reporter=rep)
    assert any("from step-s0-00000003" in m for m in rep.lines)


def test_resume_from_an_explicit_checkpoint(tmp_path):
    run_dir = _interrupted(tmp_path)
    other = _interrupted(tmp_path / "other")
    with pytest.raises(CheckpointError, match="is not a checkpoint of"):
        resume_run(run_dir, from_checkpoint=other / "checkpoints" / "step-s0-00000004.json")
    rep = _Messages()
    resume_run(run_dir, from_checkpoint=run_dir / "checkpoints" / "step-s0-00000003.safetensors",
               reporter=rep)
    assert any("from step-s0-00000003" in m for m in rep.lines)


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    run_dir = Path(start_run(tiny_recipe(tmp_path, **OVER))["run_dir"])
    before = _files(run_dir)
    rep = _Messages()
    summary = resume_run(run_dir, ["optim.lr=0.5"], reporter=rep)
    assert any("is finished" in m for m in rep.lines)
    assert summary == json.loads((run_dir / "summary.json").read_text())
    assert _files(run_dir) == before


def test_metrics_have_no_duplicated_steps_after_a_kill(tmp_path):
    # checkpoints at the epoch ends only (steps 3, 6); the kill comes after step 4 was logged
    run_dir = _interrupted(tmp_path, stop=6, run={"checkpoint_every": 0, "log_every": 1})
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").open())
             if r["event"] == "train"]
    assert steps == [1, 2, 3, 4, 5]
    resume_run(run_dir)
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").open())
             if r["event"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_overrides_at_resume_reach_the_stage_and_are_recorded(tmp_path):
    run_dir = _interrupted(tmp_path)
    resume_run(run_dir, ["optim.lr=0.01"])
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["overrides"] == []
    assert meta["resumes"][0]["overrides"] == ["optim.lr=0.01"]
    assert meta["resumes"][0]["checkpoint"] == "step-s0-00000004"
    lrs = [r["lr"] for r in map(json.loads, (run_dir / "metrics.jsonl").open())
           if r["event"] == "train"]
    assert lrs[:4] == [0.05] * 4 and lrs[4:] == [0.01, 0.01]


class _PoisonWeights:
    """Sets one backbone weight to NaN after step `n` while the loss of that step was finite."""

    def __init__(self, n: int) -> None:
        self.n = n

    @hookimpl
    def ltframe_step_end(self, run, stage, step, ctx):
        if step + 1 == self.n:
            with torch.no_grad():
                p = next(run.model.backbone.parameters())  # a conv weight (may be channels-last)
                p[(0,) * p.dim()] = float("nan")


def test_nonfinite_weights_are_never_checkpointed_and_resume_continues(tmp_path):
    recipe = tiny_recipe(tmp_path, **OVER)
    with pytest.raises(NonFiniteLossError, match="weights became non-finite.*last good checkpoint"
                                                 r".*ltframe resume .*--set optim.lr"):
        start_run(recipe, plugins=[("poison", _PoisonWeights(4))])
    run_dir = tmp_path / "runs" / "tiny"
    tensors, side, _ = ckpt.load(run_dir)
    assert side["step"] == 3 and not ckpt.nonfinite(tensors)  # not step 4, the poisoned one
    summary = resume_run(run_dir, ["optim.lr=0.01"])
    assert summary["top1"] is not None
