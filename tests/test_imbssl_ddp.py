"""The components of issue 20 part 2 under `torchrun --nproc_per_node=2` (gloo, CPU) equal one
process with the same global batch: ABC's masks (drawn for the global batch), ACR's estimate
(gathered histogram), SimPro's priors (epoch sums all-reduced), DASO's queue and pseudo-label
distribution. A BatchNorm-free model and deterministic views, as tests/test_ddp.py."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ltframe import start_run
from ltframe.testing import ddp_recipe

pytestmark = pytest.mark.slow

VIEWS = {"labeled": ["none"], "unlabeled": ["none", "none"]}
STAGES = [
    {"name": "simpro_acr_abc", "steps": 6, "steps_per_epoch": 2, "data": "labeled+unlabeled",
     "unlabeled_ratio": 2, "ema": 0.9, "views": VIEWS,
     "pseudo_labeler": {"name": "simpro", "threshold": 0.3},
     "loss": [{"name": "simpro"}, {"name": "acr", "est_epoch": 0, "threshold": 0.3},
              {"name": "abc", "threshold": 0.3, "horizon": 3}]},
    {"name": "daso", "steps": 6, "steps_per_epoch": 2, "data": "labeled+unlabeled",
     "unlabeled_ratio": 2, "ema": 0.9, "teacher_bn": "batch", "views": VIEWS,
     "pseudo_labeler": {"name": "daso", "threshold": 0.3, "warmup": 2, "period": 2,
                        "queue_size": 4, "blend": "usb"},
     "loss": ["ce", "daso"]},
]


def _recipe(tmp_path: Path) -> Path:
    return ddp_recipe(tmp_path, STAGES)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    recipe = _recipe(tmp_path)
    single = Path(start_run(recipe, out_dir=tmp_path / "one")["run_dir"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", "-m", "ltframe", "run", str(recipe), "--out",
           str(tmp_path / "two"), "--quiet"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (double,) = (tmp_path / "two").iterdir()
    for stem, state in (("stage0-simpro_acr_abc", ("pi_u", "u", "tau")),
                        ("stage1-daso", ("queue.bank", "pl_dist", "prev_q"))):
        a, b = (load_file(run / "checkpoints" / f"{stem}.safetensors") for run in (single, double))
        keys = [k for k in a if k.startswith(("model.", "component."))]
        assert all(any(k.endswith(f".{s}") for k in keys) for s in state), (stem, keys)
        assert set(keys) <= set(b)
        for k in keys:
            assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=1e-4), k
