"""Generic engine work for a GPU run (issue 19), checked on a CPU: cuDNN autotuning only on CUDA,
DDP's `find_unused_parameters` only where a trainable head gets no gradient, evaluation with
its outputs kept on the device (one copy to the host)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

import ltframe.eval.evaluate as ev
from ltframe import hookimpl, start_run
from ltframe.data.bundle import ImageStore
from ltframe.engine.setup import set_cudnn_benchmark
from ltframe.engine.trainer import needs_find_unused
from ltframe.eval.evaluate import extract_features, predict
from ltframe.models.model import LTModel
from ltframe.probes import SyncProbe
from ltframe.recipe import EvalCfg, RunCfg
from ltframe.testing import tiny_recipe


# --- cuDNN autotuning ----------------------------------------------------------------------
def test_cudnn_benchmark_is_set_for_cuda_only(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert not set_cudnn_benchmark(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    assert not set_cudnn_benchmark(torch.device("cuda"), enabled=False)  # run.cudnn_benchmark
    assert torch.backends.cudnn.benchmark is False
    assert set_cudnn_benchmark(torch.device("cuda", 0))
    assert torch.backends.cudnn.benchmark is True


def test_a_cpu_run_leaves_cudnn_benchmark_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    recipe = tiny_recipe(tmp_path, stage=[{"name": "s", "steps": 1, "eval_every": 1}])
    assert RunCfg().cudnn_benchmark is True  # the default
    start_run(recipe, out_dir=tmp_path / "runs")
    assert torch.backends.cudnn.benchmark is False


# --- channels-last ----------------------------------------------------------------------------
class _Layouts:
    """Records the memory layout of the model's first conv weight and of the step's batch."""

    def __init__(self):
        self.seen = []

    @hookimpl
    def ltframe_step_end(self, run, stage, step, ctx):
        w = next(p for p in run.model.parameters() if p.dim() == 4)
        x = next(iter(ctx.inputs_by_part.values()))
        cl = torch.channels_last
        self.seen.append((w.is_contiguous(memory_format=cl) and not w.is_contiguous(),
                          x.is_contiguous(memory_format=cl) and not x.is_contiguous()))


def test_channels_last_applies_on_the_cpu_unless_switched_off(tmp_path):
    """`run.channels_last` (default on) puts the model and the step's batch channels-last on the
    CPU as on CUDA (faster convolutions there); off, both stay NCHW."""
    for on in (True, False):
        layouts = _Layouts()
        recipe = tiny_recipe(tmp_path / str(on), stage=[{"name": "s", "steps": 1}],
                             run={"channels_last": on})
        start_run(recipe, out_dir=tmp_path / str(on) / "runs", plugins=[("layouts", layouts)])
        assert layouts.seen == [(on, on)]


# --- DDP: find_unused_parameters ------------------------------------------------------------
@dataclass
class _Head:
    head: str = "main"


@dataclass
class _NoHead:
    part: str = "labeled"


def _loss(params, start: int = 0):
    return SimpleNamespace(params=params, start=start)


def _model(*heads: str) -> LTModel:
    return LTModel(nn.Linear(3, 4), {h: nn.Linear(4, 2) for h in heads})


def test_find_unused_only_where_a_trainable_head_is_left_out():
    one = _model("main")
    assert not needs_find_unused(one, [_loss(_Head())])
    two = _model("main", "aux")
    assert needs_find_unused(two, [_loss(_Head())])  # aux: trainable, in no loss
    assert not needs_find_unused(two, [_loss(_Head()), _loss(_Head("aux"))])
    # a term that starts later leaves its head without gradient until then
    assert needs_find_unused(two, [_loss(_Head()), _loss(_Head("aux"), start=5)])
    # a frozen head needs no gradient
    two.heads["aux"].requires_grad_(False)
    assert not needs_find_unused(two, [_loss(_Head())])
    # no loss names a head: unknown, so the safe choice
    assert needs_find_unused(one, [_loss(_NoHead())])
    assert needs_find_unused(one, [])


# --- evaluation: outputs stay on the device --------------------------------------------------
def _store(n: int = 21) -> ImageStore:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    return ImageStore(images, torch.device("cpu"), on_device=True, workers=0)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.heads = nn.ModuleDict({"main": nn.Linear(4, 5)})

    def features(self, x):
        return self.bn(self.conv(x)).mean((2, 3))

    def forward(self, x):
        f = self.features(x)
        return f, {"main": self.heads["main"](f)}


def test_eval_results_do_not_depend_on_the_batch_size():
    torch.manual_seed(0)
    net, store = _Net(), _store()
    net.train()
    idx = torch.arange(21).flip(0)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    whole = predict(net, store, idx, mean, std, 1024, "main")
    assert whole.device.type == "cpu" and whole.dtype == torch.float32 and whole.shape == (21, 5)
    for bs in (1, 4, 20):
        assert torch.allclose(predict(net, store, idx, mean, std, bs, "main"), whole, atol=1e-6)
    assert net.training  # modes restored
    feats = extract_features(net, store, idx, mean, std, 8)
    assert feats.shape == (21, 4)
    assert predict(net, store, torch.arange(0), mean, std, 8, "main").numel() == 0


def test_eval_copies_to_the_host_once(monkeypatch):
    net, store = _Net(), _store()
    idx = torch.arange(21)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    predict(net, store, idx, mean, std, 4, "main")  # the view's constants, once
    view = ev._view(mean, std)
    consts = [t for d in (view._on, view._affine_on) for pair in d.values() for t in pair]  # on the device
    with SyncProbe(net, store.images, consts) as probe:
        out = predict(net, store, idx, mean, std, 4, "main")  # 6 batches
    assert [r.kind for r in probe.syncs()] == ["d2h"], probe.syncs()
    assert out.shape == (21, 5)
    monkeypatch.setattr(ev, "HOLD_BYTES", 4 * 5 * 8)  # hand over every 8 rows
    with SyncProbe(net, store.images, consts) as probe:
        again = predict(net, store, idx, mean, std, 4, "main")
    assert [r.kind for r in probe.syncs()] == ["d2h"] * 3
    assert torch.equal(again, out)


def test_eval_batch_size_default():
    assert EvalCfg().batch_size >= 1024


def test_stage_start_has_no_ddp_flag_in_one_process(tmp_path):
    recipe = tiny_recipe(tmp_path, stage=[{"name": "s", "steps": 1, "eval_every": 1}])
    run_dir = Path(start_run(recipe, out_dir=tmp_path / "runs")["run_dir"])
    rec = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    start = next(r for r in rec if r["event"] == "stage_start")
    assert "ddp_find_unused_parameters" not in start
