"""The stateful components of issue 20 part 2 (acr, simpro, daso) continue bit for bit after an
interruption: the resumed run's train/eval lines and its components' checkpointed state equal
those of an uninterrupted run."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ltframe import resume_run, start_run
from ltframe.errors import LtframeError
from ltframe.testing import StopAt, tiny_recipe

TWO = {"main": {"name": "linear"}, "aux": {"name": "linear"}}
STAGES = {
    "acr": ({"heads": TWO, "eval_head": "aux"},
            {"views": {"unlabeled": ["weak", "strong", "strong"]},
             "loss": ["ce", {"name": "acr", "est_epoch": 0, "threshold": 0.3}]}),
    "simpro": ({}, {"views": {"labeled": ["weak", "strong"], "unlabeled": ["weak", "strong"]},
                    "pseudo_labeler": {"name": "simpro", "threshold": 0.3}, "loss": ["simpro"]}),
    "daso": ({}, {"teacher_bn": "batch", "views": {"unlabeled": ["weak", "strong"]},
                  "pseudo_labeler": {"name": "daso", "warmup": 2, "period": 2, "queue_size": 4,
                                     "threshold": 0.3},
                  "loss": ["ce", "daso"]}),
}


def _lines(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows
            if r["event"] in ("train", "eval")]


def _state(run_dir):
    ckpt = Path(run_dir) / "checkpoints"
    state = load_file(ckpt / f"{(ckpt / 'latest').read_text().strip()}.safetensors")
    return {k: v for k, v in state.items() if k.startswith("component")}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STAGES))
def test_resume_is_bit_exact(name, tmp_path):
    model, extra = STAGES[name]
    stage = {"name": name, "epochs": 3, "steps_per_epoch": 2, "data": "labeled+unlabeled",
             "ema": 0.9, **extra}
    over = {"run": {"log_every": 1}, "data": {"split": {"name": "fraction", "labeled_fraction": 0.3}},
            "stage": [stage]}
    if model:
        over["model"] = model
    full = start_run(tiny_recipe(tmp_path / "a", **over))
    with pytest.raises(LtframeError, match="interrupted"):
        start_run(tiny_recipe(tmp_path / "b", **over), plugins=[("stop", StopAt(3, 0))])
    resumed = resume_run(next((tmp_path / "b" / "runs").iterdir()))
    assert _lines(full["run_dir"]) == _lines(resumed["run_dir"])
    a, b = _state(full["run_dir"]), _state(resumed["run_dir"])
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
