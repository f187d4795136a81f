"""Multi-process training: `torchrun --nproc_per_node=2 -m ltframe run` on gloo (CPU) equals one
process with the same global batch, and `ltframe resume` continues a DDP run.

The model has no BatchNorm (a 2-block ViT): per-rank BatchNorm statistics are the one thing
DDP legitimately changes. Views are deterministic ("none"), since every rank draws its own
augmentation. The stage exercises what must be gathered across ranks: distribution alignment
statistics, the BMB memory and its class estimate, evaluation and whole-pool labelling.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ltframe import start_run
from ltframe.engine import checkpoint as ckpt
from ltframe.engine.dist import gather_batch, shard, unshard
from ltframe.testing import ddp_recipe

pytestmark = pytest.mark.slow

STAGE = {
    "name": "ssl", "steps": 6, "steps_per_epoch": 3, "eval_every": 1,
    "data": "labeled+unlabeled", "unlabeled_ratio": 2, "ema": 0.9,
    "views": {"labeled": ["none"], "unlabeled": ["none", "none"]},
    "pseudo_labeler": {"name": "align", "threshold": 0.3},
    "loss": [{"name": "ce"}, {"name": "fixmatch", "part": "unlabeled:none#1"},
             {"name": "bmb", "head": "aux", "weak": "unlabeled", "strong": "unlabeled:none#1",
              "threshold": 0.3, "size": 16, "get": 8}],
    "label": {"name": "threshold", "threshold": 0.3},
}


def _recipe(tmp_path: Path) -> Path:
    return ddp_recipe(tmp_path, [STAGE])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", "-m", "ltframe", *args, "--quiet"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors, _, _ = ckpt.load(run_dir)
    return tensors


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    recipe = _recipe(tmp_path)
    single = Path(start_run(recipe, out_dir=tmp_path / "one")["run_dir"])
    _torchrun("run", str(recipe), "--out", str(tmp_path / "two"))
    (double,) = (tmp_path / "two").iterdir()
    a, b = _final(single), _final(double)
    keys = [k for k in a if k.startswith(("model.", "ema.", "component."))]
    assert any(k.startswith("component.loss.bmb") for k in keys)  # the memory is compared
    assert set(keys) <= set(b)
    for k in keys:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=1e-4), k
    sa = json.loads((single / "summary.json").read_text())
    sb = json.loads((double / "summary.json").read_text())
    assert sa["top1"] == pytest.approx(sb["top1"], abs=1e-6)
    for f in sorted((single / "splits").iterdir()):
        assert f.read_bytes() == (double / "splits" / f.name).read_bytes(), f.name
    rows = [[line.split(",") for line in (run / "pseudo_labels" / "stage0-ssl.csv").open()][1:]
            for run in (single, double)]
    assert rows[0] and [r[:3] for r in rows[0]] == [r[:3] for r in rows[1]]  # index, label, weight
    conf = torch.tensor([[float(r[3]) for r in rs] for rs in rows])
    assert torch.allclose(conf[0], conf[1], atol=1e-5)
    # only rank 0 wrote: one line per event
    records = [json.loads(x) for x in (double / "metrics.jsonl").open()]
    events = [r["event"] for r in records]
    assert events.count("stage_start") == 1 and events.count("eval") == 2
    # both heads feed a loss from step 0 (ce, fixmatch: main; bmb: aux): DDP without the
    # per-step search for unused parameters, and still equal to one process (above)
    (start,) = (r for r in records if r["event"] == "stage_start")
    assert start["ddp_find_unused_parameters"] is False


def test_resume_continues_a_ddp_run(tmp_path):
    recipe = _recipe(tmp_path)
    _torchrun("run", str(recipe), "--out", str(tmp_path / "runs"))
    (run_dir,) = (tmp_path / "runs").iterdir()
    full = _final(run_dir)
    # as if it had stopped after epoch 1: keep that checkpoint only
    (run_dir / "summary.json").unlink()
    stems = sorted(p.stem for p in (run_dir / "checkpoints").glob("step-*.json"))
    assert stems, "no mid-stage checkpoint"
    mid = run_dir / "checkpoints" / f"{stems[0]}.safetensors"
    backup = tmp_path / "mid"
    shutil.copytree(run_dir / "checkpoints", backup)
    _torchrun("resume", str(run_dir), "--from", str(mid))
    again = _final(run_dir)
    for k in (k for k in full if k.startswith(("model.", "ema.", "component."))):
        assert torch.allclose(full[k].float(), again[k].float(), atol=1e-6), k
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["world_size"] == 2 and meta["resumes"][-1]["world_size"] == 2


def test_shard_and_gather_are_identity_in_one_process():
    x = torch.arange(10)
    local, n = shard(x)
    assert torch.equal(local, x) and n == 10
    assert torch.equal(unshard(local, n), x) and gather_batch(x) is x
