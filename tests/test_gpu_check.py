"""benchmarks/gpu_check.sh --dry-run: the GPU check's code path on a CPU with tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("workloads", "compile", "cifar10_lt", "usb")
WORKLOADS = ("fixmatch", "bmb", "supervised", "supervised_wrn", "crest_pass")


def _number_or_reason(row: dict, key: str) -> None:
    if "skipped" in row or "error" in row:
        assert str(row.get("skipped") or row.get("error")), row
    else:
        assert isinstance(row[key], int | float), (key, row)


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pip install" not in proc.stdout  # the dry run installs nothing
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert res["env"]["dry_run"] is True and res["env"]["device"] == "cpu"
    for s in SECTIONS:
        assert s in res, s
    for w in WORKLOADS:
        row = res["workloads"][w]
        _number_or_reason(row, "images_per_s")
        if w != "crest_pass" and "steps_per_s" in row:
            assert isinstance(row["syncs"], int)
            assert set(row["shares"]) >= {"data", "forward", "backward", "optimizer", "ema", "eval"}
    # on this CPU the step numbers are measured, not skipped
    assert res["workloads"]["fixmatch"]["steps_per_s"] > 0
    assert res["workloads"]["fixmatch"]["syncs"] == 0
    assert "skipped" in res["compile"] or "compile_steps_per_s" in res["compile"]
    _number_or_reason(res["cifar10_lt"], "top1")
    if "top1" in res["cifar10_lt"]:
        assert res["cifar10_lt"]["epochs_run"] >= 1
    _number_or_reason(res["usb"], "steps_per_s")
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| workload | steps/s | images/s | syncs |" in md
    assert "| fixmatch |" in md and "cifar10_lt" in md


def test_strict_steps_run_steady_steps_in_sync_error_mode(monkeypatch) -> None:
    """speed._strict_steps: steps before `warmup` run as they are; later steps run under sync
    debug mode "error" (restored after each), and CUDA's sync error becomes SyncInStep naming
    the step and stage. CUDA's mode switch is recorded instead of set (no GPU here)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import speed

    modes: list = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    calls: list = []

    def fake_step(self, st, i, epoch):
        calls.append((i, modes[-1] if modes else None))
        if i == 3:
            raise RuntimeError("called a synchronizing CUDA operation")
        return i

    monkeypatch.setattr(speed.trainer_mod.Trainer, "_step", fake_step)
    _, strict = speed._strict_steps(warmup=2)
    st = type("St", (), {"plan": type("P", (), {"name": "s0"})()})()
    assert [strict(None, st, i, 0) for i in range(3)] == [0, 1, 2]
    assert calls == [(0, None), (1, None), (2, "error")] and modes == ["error", "default"]
    with pytest.raises(speed.SyncInStep, match="step 3 of stage 's0'"):
        strict(None, st, 3, 0)
    assert modes[-1] == "default"
