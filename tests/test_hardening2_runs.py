"""Issue 18, run lifecycle: one writer per run directory, resume that keeps a run honest
(overrides, edited recipes, sealed and schema-checked sidecars, metrics, process count,
uninstalled blocked plugins), faults with clear messages, and no empty run directories left."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from ltframe import hookimpl, resume_run, start_run
from ltframe.cli import main
from ltframe.engine import checkpoint as ckpt
from ltframe.engine import dist
from ltframe.engine.report import Reporter
from ltframe.engine.runlock import RunLock, holder
from ltframe.errors import (
    CheckpointError,
    DiskWriteError,
    LtframeError,
    NonFiniteLossError,
    PeerDiedError,
    RecipeError,
    RunInterrupted,
    RunLockedError,
)
from ltframe.testing import StopAt, tiny_recipe

OVER = {"run": {"checkpoint_every": 2, "log_every": 1},
        "stage": [{"name": "a", "epochs": 2, "steps_per_epoch": 3}]}
TWO = {"run": {"checkpoint_every": 0, "log_every": 1},
       "stage": [{"name": "a", "epochs": 2, "steps_per_epoch": 3, "eval_every": 1},
                 {"name": "b", "epochs": 2, "steps_per_epoch": 3, "eval_every": 1,
                  "train": ["heads.main"]}]}


class _Messages(Reporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)


def _interrupted(tmp_path: Path, stop: int = 5, stage: int = 0, over: dict | None = None
                 ) -> Path:
    with pytest.raises(RunInterrupted):
        start_run(tiny_recipe(tmp_path, **(over or OVER)),
                  plugins=[("stop", StopAt(stop, stage))])
    return tmp_path / "runs" / "tiny"


def _files(run_dir: Path) -> dict:
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def _reseal(side: Path, edit) -> None:
    """Edit a sidecar's JSON and seal it again (a damaged file that passes its checksum)."""
    meta = json.loads(side.read_text())
    edit(meta)
    side.write_text(json.dumps(ckpt.seal(meta)))


# --- a run directory has one writer --------------------------------------------------------

def test_second_writer_is_refused_naming_the_pid_and_report_says_still_training(tmp_path):
    run_dir = _interrupted(tmp_path)
    lock = RunLock(run_dir).acquire()  # as if `ltframe run` were still training it
    try:
        before = _files(run_dir)
        with pytest.raises(RunLockedError, match=rf"being written by process {os.getpid()}"):
            resume_run(run_dir)
        assert _files(run_dir) == before
        res = CliRunner().invoke(main, ["resume", str(run_dir), "--quiet"])
        assert res.exit_code == 1 and f"process {os.getpid()}" in res.output
        assert len(res.output.strip().splitlines()) == 1
        assert holder(run_dir) == str(os.getpid())
        for cmd in (["report", str(run_dir), "--out", str(tmp_path / "rep")],
                    ["compare", str(run_dir)]):
            res = CliRunner().invoke(main, cmd)
            assert "still training" in res.output and "ltframe resume" not in res.output
        from ltframe.compare import load_summary  # the API says so too

        with pytest.raises(LtframeError, match="still training"):
            load_summary(run_dir)
    finally:
        lock.release()
    (run_dir / ".lock").write_text("999999999\n")  # a dead process's lock: taken over
    assert resume_run(run_dir)["top1"] is not None
    assert holder(run_dir) is None


def test_two_runs_started_at_once_never_share_a_directory(tmp_path):
    from ltframe.engine.setup import new_run_dir

    first, lock1 = new_run_dir(tmp_path, "x")
    second, lock2 = new_run_dir(tmp_path, "x")  # `first` is still empty but locked
    assert first == tmp_path / "x" and second == tmp_path / "x-1"
    lock1.release()
    lock2.release()


# --- resume that keeps a run honest --------------------------------------------------------

def test_override_making_a_stage_end_before_the_checkpoint_is_an_error(tmp_path):
    run_dir = _interrupted(tmp_path)  # latest checkpoint: step 4 of 6
    before = _files(run_dir)
    with pytest.raises(RecipeError, match=r"stage 'a' now has 3 steps but checkpoint "
                                          r"step-s0-00000004 is at step 4.*resume without it"):
        resume_run(run_dir, ["stage[0].epochs=1"])
    assert _files(run_dir) == before  # nothing changed: not the metrics, not run.json


def test_hand_edited_resolved_toml_is_refused_unless_accepted_and_recorded(tmp_path):
    run_dir = _interrupted(tmp_path)
    toml = run_dir / "resolved.toml"
    assert "lr = 0.05" in toml.read_text()
    toml.write_text(toml.read_text().replace("lr = 0.05", "lr = 0.02"))
    with pytest.raises(RecipeError, match=r"resolved.toml was edited after checkpoint "
                                          r"step-s0-00000004.*--set KEY=VALUE"):
        resume_run(run_dir)
    resume_run(run_dir, accept_edited_recipe=True)
    entry = json.loads((run_dir / "run.json").read_text())["resumes"][-1]
    assert entry["edited_recipe"] == hashlib.sha256(toml.read_bytes()).hexdigest()


def test_resume_with_set_then_falling_back_to_an_older_checkpoint_is_not_an_edit(tmp_path):
    run_dir = _interrupted(tmp_path, stop=2, stage=1, over=TWO)  # stage0-a: recipe hash h1
    with pytest.raises(RunInterrupted):  # resumed with --set (h2), checkpoint at b's step 3
        resume_run(run_dir, ["optim.lr=0.01"], plugins=[("stop", StopAt(5, 1))])
    (run_dir / "checkpoints" / "step-s1-00000003.safetensors").write_bytes(b"damaged")
    rep = _Messages()
    resume_run(run_dir, reporter=rep)  # h2 was written by ltframe (recorded): accepted
    assert any("from stage0-a" in m for m in rep.lines)


def test_forged_sidecar_fails_its_checksum_and_resume_falls_back_saying_which(tmp_path):
    run_dir = _interrupted(tmp_path)
    side = run_dir / "checkpoints" / "step-s0-00000004.json"
    meta = json.loads(side.read_text())
    meta["history"] = [{"stage": "a", "index": 0, "steps": 6, "top1": 99.9}]
    side.write_text(json.dumps(meta))  # edited, not sealed again
    with pytest.raises(CheckpointError, match="sidecar_sha256"):
        ckpt.load(side)
    rep = _Messages()
    summary = resume_run(run_dir, reporter=rep)
    assert any("skipped checkpoint step-s0-00000004.json" in m and "corrupt" in m
               for m in rep.lines)
    assert any("from step-s0-00000003" in m for m in rep.lines)
    assert all(s.get("top1") != 99.9 for s in summary["stages"])


@pytest.mark.parametrize("edit, why", [
    (lambda m: m.update(step=None), "step = null"),
    (lambda m: m.update(step="3"), "step"),
    (lambda m: m.update(stage_index=-1), "stage_index"),
    (lambda m: m.update(history=[{"stage": "a", "index": 0, "top1": "high"}]), r"history\[0\]"),
    (lambda m: m.update(history={"a": 1}), "history"),
    (lambda m: m.update(streams={"labeled": {"epoch": 0}}), "streams"),
    (lambda m: m.update(extra=json.loads("[" * 200 + "]" * 200)), "it is nested deeper"),
    (lambda m: m.update(tensors="../../../victim.safetensors"), "tensors"),
])
def test_sidecar_against_its_schema(tmp_path, edit, why):
    run_dir = _interrupted(tmp_path, stop=4)  # checkpoints at steps 2 and 3
    side = run_dir / "checkpoints" / "step-s0-00000003.json"
    (tmp_path / "victim.safetensors").write_bytes(
        (run_dir / "checkpoints" / "step-s0-00000003.safetensors").read_bytes())
    _reseal(side, edit)
    with pytest.raises(CheckpointError, match=rf"corrupt \({why}"):
        ckpt.load(side)
    rep = _Messages()
    resume_run(run_dir, reporter=rep)
    assert any("from step-s0-00000002" in m for m in rep.lines)


def test_deeply_nested_oversized_and_misdirected_sidecars_are_corrupt(tmp_path):
    run_dir = _interrupted(tmp_path, stop=4)
    ck = run_dir / "checkpoints"
    side = ck / "step-s0-00000003.json"
    side.write_text('{"format": 2, "x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(CheckpointError, match="corrupt .*nested too deeply"):
        ckpt.load(side)
    side.write_bytes((ck / "step-s0-00000002.json").read_bytes() + b" " * (17 * 2**20))
    with pytest.raises(CheckpointError, match=r"corrupt \(17 MB"):
        ckpt.load(side)
    (ck / "latest").write_text("../../elsewhere/step\n")
    with pytest.raises(CheckpointError, match="latest is corrupt"):
        ckpt.load(run_dir)
    rep = _Messages()
    resume_run(run_dir, reporter=rep)  # falls back to step 2 past both
    assert any("from step-s0-00000002" in m for m in rep.lines)


def _rehash(run_dir: Path, stem: str, change) -> None:
    """Change a checkpoint's tensors and make its sidecar agree (checksums pass)."""
    tfile = run_dir / "checkpoints" / f"{stem}.safetensors"
    tensors = load_file(str(tfile))
    change(tensors)
    save_file(tensors, str(tfile))
    digest = hashlib.sha256(tfile.read_bytes()).hexdigest()
    _reseal(tfile.with_suffix(".json"), lambda m: m.update(sha256=digest))


def test_optimizer_state_of_the_wrong_shape_is_a_named_corrupt_checkpoint(tmp_path):
    run_dir = _interrupted(tmp_path)
    key = "optim.state.0.momentum_buffer"

    def change(t):
        assert key in t
        t[key] = torch.zeros(3)

    _rehash(run_dir, "step-s0-00000004", change)
    with pytest.raises(CheckpointError, match=r"step-s0-00000004 is corrupt \(optimizer "
                                              r"'momentum_buffer' of parameter 0 has shape \(3,\)"):
        resume_run(run_dir)


def test_model_tensor_of_the_wrong_shape_is_corrupt_and_skipped(tmp_path):
    run_dir = _interrupted(tmp_path)

    def change(t):
        name = next(k for k in t if k.startswith("model.") and k.endswith("weight"))
        t[name] = torch.zeros(2, 2)

    _rehash(run_dir, "step-s0-00000004", change)
    rep = _Messages()
    resume_run(run_dir, reporter=rep)
    assert any("skipped checkpoint step-s0-00000004" in m and "checkpoint is corrupt" in m
               for m in rep.lines)
    assert any("from step-s0-00000003" in m for m in rep.lines)


def _records(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    for r in rows:
        r.pop("images_per_s", None)
    return rows


def test_resume_from_a_stage_end_checkpoint_keeps_the_stage_end_record(tmp_path):
    full = Path(start_run(tiny_recipe(tmp_path / "full", **TWO))["run_dir"])
    run_dir = _interrupted(tmp_path / "cut", stop=2, stage=1, over=TWO)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "stage0-a"
    resume_run(run_dir)
    resumed = _records(run_dir)
    assert [r["event"] for r in resumed].count("stage_end") == 2
    assert resumed == _records(full)


def test_resuming_with_another_process_count_is_said_and_recorded(tmp_path):
    run_dir = _interrupted(tmp_path)
    _reseal(run_dir / "checkpoints" / "step-s0-00000004.json", lambda m: m.update(world_size=2))
    rep = _Messages()
    resume_run(run_dir, reporter=rep)
    assert any("written by 2 process(es), this resume runs 1" in m and "differ" in m
               for m in rep.lines)
    entry = json.loads((run_dir / "run.json").read_text())["resumes"][-1]
    assert entry["world_size_changed"] == [2, 1]


def test_a_blocked_plugin_uninstalled_since_does_not_stop_resume(tmp_path):
    run_dir = _interrupted(tmp_path)
    meta = json.loads((run_dir / "run.json").read_text())
    meta["blocked"] = ["ltframe_gone"]  # blocked at start, uninstalled since
    (run_dir / "run.json").write_text(json.dumps(meta))
    rep = _Messages()
    assert resume_run(run_dir, reporter=rep)["top1"] is not None
    assert any("ltframe_gone (blocked when the run started) is no longer installed" in m
               for m in rep.lines)


# --- faults with clear messages ------------------------------------------------------------

def test_full_disk_names_the_file_and_the_intact_checkpoint(tmp_path, monkeypatch):
    real, calls = ckpt.save_file, []

    def full(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(DiskWriteError, match=r"^no space left while writing \S*step-s0-00000003"
                                             r".safetensors; checkpoint step-s0-00000002 is "
                                             r"intact; free space and run `ltframe resume "):
        start_run(tiny_recipe(tmp_path, **OVER))
    run_dir = tmp_path / "runs" / "tiny"
    assert not list(run_dir.rglob("*.tmp")) and not (run_dir / "error.log").exists()
    monkeypatch.setattr(ckpt, "save_file", real)
    assert resume_run(run_dir)["top1"] is not None


def test_read_only_run_directory_names_the_file_not_error_log(tmp_path, monkeypatch):
    import tempfile

    real = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).name == "checkpoints":
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(ckpt.tempfile, "mkstemp", read_only)
    with pytest.raises(DiskWriteError) as err:
        start_run(tiny_recipe(tmp_path, **OVER))
    msg = str(err.value)
    assert msg.startswith("the file system is read-only while writing ")
    assert "step-s0-00000002.safetensors" in msg and "error.log" not in msg
    assert "no complete checkpoint was written" in msg


def test_unwritable_error_log_keeps_the_original_exception(tmp_path):
    from ltframe.engine.run import _guarded

    class _Run:
        run_dir = tmp_path / "gone"  # error.log cannot be written here

    def body():
        raise ValueError("the real problem")

    with pytest.raises(ValueError, match="the real problem"):
        _guarded(_Run(), body)


def test_stale_tmp_files_are_removed_at_resume(tmp_path):
    run_dir = _interrupted(tmp_path)
    stale = [run_dir / "checkpoints" / ".step-s0-00000005.k2j3.tmp", run_dir / ".run.json.x.tmp"]
    for p in stale:
        p.write_bytes(b"half")
    rep = _Messages()
    resume_run(run_dir, reporter=rep)
    assert not any(p.exists() for p in stale)
    assert any("removed 2 unfinished temporary file(s)" in m for m in rep.lines)


def test_run_stopped_before_its_first_checkpoint_says_so(tmp_path):
    run_dir = _interrupted(tmp_path, stop=1)  # first checkpoint would be at step 2
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    (run_dir / "checkpoints" / ".step-s0-00000002.abc.tmp").write_bytes(b"half")
    with pytest.raises(CheckpointError) as err:
        resume_run(run_dir)
    msg = str(err.value)
    assert "before its first checkpoint was complete" in msg and "ltframe run " in msg
    assert "recipe.toml" in msg and "never finished an epoch" not in msg


class _PoisonWeights:
    @hookimpl
    def ltframe_step_end(self, run, stage, step, ctx):
        if step == 0:
            with torch.no_grad():
                p = next(run.model.backbone.parameters())  # a conv weight (may be channels-last)
                p[(0,) * p.dim()] = float("nan")


def test_nonfinite_loss_without_a_checkpoint_does_not_advise_resume(tmp_path):
    with pytest.raises(NonFiniteLossError) as err:
        start_run(tiny_recipe(tmp_path, **OVER), plugins=[("poison", _PoisonWeights())])
    msg = str(err.value)
    assert "no checkpoint had been written yet" in msg
    assert "ltframe resume" not in msg and "start the run again" in msg
    assert (tmp_path / "runs" / "tiny" / "metrics.jsonl").is_file()  # it trained: kept


def test_a_dead_peer_is_said_with_the_resume_command(tmp_path, monkeypatch):
    from ltframe.engine.run import _guarded

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")

    class _Run:
        run_dir = tmp_path

    def body():
        raise RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] "
                           "Connection closed by peer [127.0.0.1]:29500")

    with pytest.raises(PeerDiedError, match=r"a peer process died, so rank 1 stops too .*"
                                            r"torchrun --nproc_per_node=2 -m ltframe resume"):
        _guarded(_Run(), body)
    assert not (tmp_path / "error.log").exists()
    assert dist.peer_failure(ValueError("x"), tmp_path) is None


_KILL_RANK1 = """
import os, signal, sys
from ltframe import hookimpl, start_run
from ltframe.cli import handle_error

class Kill:
    @hookimpl
    def ltframe_step_end(self, run, stage, step, ctx):
        if run.rank == 1 and step == 2:
            os.kill(os.getpid(), signal.SIGKILL)

try:
    start_run(sys.argv[1], plugins=[("kill", Kill())])
except BaseException as exc:
    handle_error(exc, False)
"""


@pytest.mark.slow
def test_ddp_rank_killed_the_other_says_a_peer_died(tmp_path):
    import subprocess
    import sys

    from test_ddp import _free_port, _recipe

    (tmp_path / "drive.py").write_text(_KILL_RANK1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", "--monitor-interval=5", str(tmp_path / "drive.py"),
           str(_recipe(tmp_path))]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    out = res.stdout + res.stderr
    assert "error: a peer process died, so rank 0 stops too" in out, out[-3000:]
    assert "torchrun --nproc_per_node=2 -m ltframe resume" in out
    assert "internal error" not in out


def test_workers_stop_when_the_torchrun_agent_died(tmp_path, monkeypatch):
    monkeypatch.setattr(dist, "_AGENT_PID", os.getppid() + 100_000)
    with pytest.raises(PeerDiedError, match="torchrun agent died, so this worker stops"):
        start_run(tiny_recipe(tmp_path, **OVER))


# --- an error found later removes an empty run directory -----------------------------------

class _FailAtStart:
    @hookimpl
    def ltframe_run_start(self, run):
        raise RecipeError("found late")


def test_an_error_before_training_removes_the_new_run_directory(tmp_path):
    with pytest.raises(RecipeError, match="found late"):
        start_run(tiny_recipe(tmp_path, **OVER), plugins=[("late", _FailAtStart())])
    assert not (tmp_path / "runs" / "tiny").exists()


def test_report_out_that_is_a_file_is_named(tmp_path):
    run_dir = Path(start_run(tiny_recipe(tmp_path))["run_dir"])
    blocker = tmp_path / "report.md"
    blocker.write_text("x")
    from ltframe.report import write_report

    with pytest.raises(LtframeError, match="report.md: is a file, not a folder"):
        write_report([run_dir], blocker)


def test_resume_with_overrides_gets_the_checks_a_new_run_gets(tmp_path):
    run_dir = _interrupted(tmp_path)
    before = _files(run_dir)
    with pytest.raises(RecipeError, match=r"train\[0\]: unknown model part 'heads\.nope'"):
        resume_run(run_dir, ['stage.0.train=["heads.nope"]'])
    assert _files(run_dir) == before  # refused before anything was written
