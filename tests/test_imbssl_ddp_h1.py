"""darp, saw and adsh under `torchrun --nproc_per_node=2` (gloo, CPU) equal one process with the
same global batch: DARP's pool tables and SAW's stored pseudo-labels take the whole global batch
on every rank (gather_batch), Adsh's scores come from the sharded pool pass (epoch_pool)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_ddp import _final, _torchrun

from ltframe import start_run
from ltframe.testing import tiny_recipe

pytestmark = pytest.mark.slow

VIEWS = {"labeled": ["none"], "unlabeled": ["none", "none"]}
STAGES = [
    {"name": "darp", "steps": 4, "steps_per_epoch": 2, "data": "labeled+unlabeled",
     "unlabeled_ratio": 2, "ema": 0.9, "views": VIEWS,
     "pseudo_labeler": {"name": "darp", "warmup": 0, "every": 1, "threshold": 0.3},
     "loss": [{"name": "saw", "on": "labeled"},
              {"name": "saw", "on": "unlabeled", "part": "unlabeled:none#1"}]},
    {"name": "adsh", "steps": 4, "steps_per_epoch": 2, "data": "labeled+unlabeled",
     "unlabeled_ratio": 2, "ema": 0.9, "views": VIEWS,
     "pseudo_labeler": {"name": "adsh", "tau_1": 0.5, "start_epoch": 0},
     "loss": [{"name": "ce"}, {"name": "fixmatch", "part": "unlabeled:none#1"}]},
]


def test_two_processes_equal_one(tmp_path):
    recipe = tiny_recipe(
        tmp_path,
        run={"name": "ddp", "seed": 0, "log_every": 2},
        data={"source": {"name": "synthetic", "num_classes": 4, "train_per_class": 12,
                         "test_per_class": 5, "image_size": 16},
              "longtail": {"name": "none"},
              "split": {"name": "fraction", "labeled_fraction": 0.5}, "batch_size": 8},
        model={"backbone": "vit_tiny_patch16_224",  # no BatchNorm (see tests/test_ddp.py)
               "backbone_args": {"img_size": 16, "patch_size": 4, "depth": 2, "embed_dim": 32,
                                 "num_heads": 2},
               "heads": {"main": {"name": "linear"}}},
        optim={"name": "sgd", "lr": 0.05, "momentum": 0.9, "schedule": {"name": "constant"}},
        stage=STAGES)
    single = Path(start_run(recipe, out_dir=tmp_path / "one")["run_dir"])
    _torchrun("run", str(recipe), "--out", str(tmp_path / "two"))
    (double,) = (tmp_path / "two").iterdir()
    a, b = _final(single), _final(double)
    keys = [k for k in a if k.startswith(("model.", "ema.", "component."))]
    assert any(k.endswith(".scores") for k in keys)  # the last stage's adsh state is compared
    assert set(keys) <= set(b)
    for k in keys:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=1e-4), k
