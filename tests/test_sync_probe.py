"""The CPU probes of issue 19: `SyncProbe` (host<->device syncs of "device tensors") and
`OpCounter` (kernel launches by range), alone and over real training steps (`probe_steps`)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from ltframe.hookspecs import hookimpl
from ltframe.probes import OpCounter, SyncError, SyncProbe, probe_steps
from ltframe.registry import NoParams
from ltframe.testing import tiny_recipe

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops under Python modes: one thread is several times faster on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _kinds(probe: SyncProbe) -> list[str]:
    return [r.kind for r in probe.records]


# --- SyncProbe on its own ------------------------------------------------------------------
def test_scalar_reads_of_derived_tensors_are_syncs():
    w = torch.randn(4, 3)
    with SyncProbe(w) as p:
        z = (w * 2).t().contiguous()[1:].sum()  # views and copies keep the tag
        z.item()
        z.tolist()
        bool(z > 0)
        int(z)
        float(z)
        f"{z}"
    assert _kinds(p) == ["item", "tolist", "scalar", "scalar", "scalar", "scalar"]
    assert all(r.where.startswith("tests/test_sync_probe.py:") for r in p.records)


def test_in_place_and_views_keep_the_tag():
    w = torch.randn(4, 3)
    with SyncProbe(w) as p:
        v = w.view(-1)[:2]
        v.add_(1)
        v.clone().max().item()
        torch.zeros_like(w).mul_(3).sum().item()
    assert _kinds(p) == ["item", "item"]


def test_host_work_and_python_scalars_are_not_flagged():
    w = torch.randn(4, 3)
    with SyncProbe(w) as p:
        h = torch.randn(5)
        h.sum().item()
        h.tolist()
        bool(h.max() > 0)
        h[h > 0]  # dynamic shapes on the host are fine
        torch.nonzero(h)
        y = w * 2.0 + 1  # Python scalars
        y = y * torch.tensor(0.5)  # a 0-dim host tensor is a scalar argument
        y = y + torch.ones(3, device=w.device)  # made on the device
        y = y[:, torch.arange(3, device=w.device)]
        torch.where(y > 0, y, torch.zeros((), device=w.device)).sum()
    assert p.records == []


def test_host_data_to_the_device():
    w = torch.randn(4, 3)
    mean = torch.ones(3)
    with SyncProbe(w) as p:
        torch.tensor([1.0, 2.0, 3.0], device=w.device)
        torch.as_tensor([1, 2], device=w.device)
        w.new_tensor([1.0])
        for _ in range(2):  # the host original stays a host tensor
            w + mean.to(w.device)
        w + mean.to(w.device, non_blocking=True)  # informational: pageable unless pinned
        w + mean  # mixed without a copy
        w.copy_(torch.zeros(4, 3))
    assert _kinds(p) == ["h2d_new", "h2d_new", "h2d_new", "h2d", "h2d", "h2d_async",
                         "h2d_mixed", "h2d"]
    assert [r.kind for r in p.syncs()].count("h2d_async") == 0


def test_device_to_host():
    w = torch.randn(4, 3)
    with SyncProbe(w) as p:
        c = w.cpu()
        c.sum().item()  # a host tensor now: not flagged again
        w.to("cpu")
        (w + 1).numpy()
        torch.empty(4, 3).copy_(w)
    assert _kinds(p) == ["d2h", "d2h", "d2h", "d2h"]


def test_data_dependent_shapes():
    w = torch.randn(6)
    with SyncProbe(w) as p:
        w[w > 0]
        torch.nonzero(w)
        torch.masked_select(w, w > 0)
        torch.unique(w)
        torch.arange(6, device=w.device).repeat_interleave((w > 0).long())
        x = w.clone()
        x[x < 0] = 0
        torch.where(w > 0)
    assert _kinds(p) == ["dynamic_shape"] * 7


def test_one_hot_syncs_only_without_num_classes():
    """On CUDA one_hot reads max() only to size its output; its CPU kernel also checks values."""
    y = torch.tensor([0, 2, 1])
    with SyncProbe(y) as p:
        torch.nn.functional.one_hot(y, 3)
        torch.nn.functional.one_hot(y)
    assert _kinds(p) == ["dynamic_shape"]


def test_backward_and_optimizer_stay_on_the_device():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with SyncProbe(model) as p:
        x = torch.randn(4, 3, device=torch.device("cpu"))
        for _ in range(2):
            loss = model(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert p.records == []
        model.weight.grad.abs().sum().item()
    assert _kinds(p) == ["item"]


def test_raise_on_sync_and_recording_switch():
    w = torch.randn(3)
    with SyncProbe(w, recording=False) as p:
        w.sum().item()  # tracked, not recorded
        p.recording = True
        with pytest.raises(SyncError, match="item"):
            p.raise_on_sync = True
            w.sum().item()
    assert _kinds(p) == ["item"]


# --- OpCounter -----------------------------------------------------------------------------
def test_op_counter_counts_kernels_by_range():
    x = torch.randn(4, 3)
    params = [torch.randn(3) for _ in range(5)]
    with OpCounter() as c:
        with c.range("data"):
            y = x.reshape(-1).view(3, 4).permute(1, 0).unsqueeze(0)[..., 1:]  # views only
            y = y + 1
        with c.range("ema"):
            torch._foreach_lerp_(params, [p * 0 for p in params], 0.1)
        (y * 2).sum()
    assert c.counts["data"] == Counter({"add": 1})
    with OpCounter() as c2:
        x.t().reshape(-1)  # a copy
    assert c2.total() == 1
    assert c.counts["ema"] == Counter({"mul": 5, "_foreach_lerp_": 1})
    assert c.totals() == {"data": 1, "ema": 6, "": 2}


# --- real training steps ---------------------------------------------------------------------
TINY = ["data.source.train_per_class=100", "data.source.test_per_class=4", "data.batch_size=8",
        "data.longtail.ratio=10", "run.log_every=1000"]
MULTIPLE = [*TINY, "data.source.train_per_class=120", "data.longtail.n_max=20",
            "data.split.multiple=1"]  # recipes with split = "multiple"
SSL = {"split": {"name": "fraction", "labeled_fraction": 0.3}}
SSL_STAGES = {
    "mixmatch": {"name": "mixmatch", "epochs": 1, "steps_per_epoch": 3,
                 "data": "labeled+unlabeled", "ema": 0.9,
                 "views": {"labeled": ["weak"], "unlabeled": ["weak", "weak"]},
                 "transform": "mixmatch", "loss": ["mixmatch"]},
    "mean_teacher": {"name": "mean_teacher", "epochs": 1, "steps_per_epoch": 3,
                     "data": "labeled+unlabeled", "ema": 0.9,
                     "views": {"labeled": ["weak"], "unlabeled": ["weak", "weak"]},
                     "loss": ["ce", {"name": "mean_teacher", "weight": 50.0, "warmup": 0.0}]},
}
#: name -> (recipe file or a tiny_recipe stage, overrides, steps per stage, stages)
RECIPES: dict[str, tuple[str, list[str], int, int]] = {
    "fixmatch": ("recipes/cpu/fixmatch.toml", TINY, 3, 1),
    # the FixMatch term and BMB's memory loss from the first step (recipe: after 100 steps)
    "bmb": ("recipes/cpu/bmb.toml", [*TINY, "stage.0.loss.1.start=0", "stage.0.loss.2.warmup=0"],
            3, 1),
    # generation 0 and generation 1 (trains on the pseudo-labels of generation 0)
    "crest_plus": ("recipes/cpu/crest_plus.toml",
                   [*TINY, "stage.0.epochs=1", "stage.0.steps_per_epoch=2",
                    "scheduler.generations=2"], 2, 2),
    "mixmatch": ("mixmatch", [], 3, 1),
    "mean_teacher": ("mean_teacher", [], 3, 1),
    # init, cls0 (class-balanced g), ft1 (f + g' with the consistency loss)
    "alternate": ("recipes/cifar10_sslt/alternate_cpu.toml",
                  [*MULTIPLE, "stage.0.epochs=1", "stage.0.steps_per_epoch=2",
                   "scheduler.loops=1", "scheduler.classifier_epochs=1",
                   "scheduler.finetune_epochs=1"], 2, 3),
    "supervised_ce": ("recipes/quickstart.toml", [*TINY, "data.source.num_classes=10"], 3, 1),
    # LDAM with DRW re-weighting on from the start, then the labeled+pseudo stage
    "ldam_drw": ("recipes/cpu/self_training_ldam_drw.toml",
                 [*MULTIPLE, "stage.0.epochs=1", "stage.0.steps_per_epoch=2",
                  "stage.0.loss.0.drw_epoch=0", "stage.1.loss.0.drw_epoch=0"], 2, 2),
}


class _Planted:
    """A loss with a sync of each kind, and a view without any."""

    def __init__(self, params, **kw) -> None:
        pass

    def __call__(self, ctx):
        logits = ctx.logits("labeled")
        if logits.max() > 1e9:  # scalar
            pass
        kept = logits[logits > 0]  # dynamic_shape
        scale = torch.tensor([1.0], device=logits.device)  # h2d_new
        return logits.mean() * scale.sum() + kept.sum() * 0 + logits.mean().item() * 0  # item


class _DeviceView:
    def __init__(self, params, mean, std) -> None:
        self.mean, self.std = mean, std

    def __call__(self, x, gen):
        return x.float() / 255


class _PlantedPlugin:
    @hookimpl
    def ltframe_register(self, registry):
        registry.register("loss", "test_planted", _Planted, NoParams)
        registry.register("view", "test_device", _DeviceView, NoParams)


def test_probe_steps_finds_planted_syncs_and_only_them(tmp_path):
    stage = {"name": "s", "epochs": 1, "steps_per_epoch": 3, "views": {"labeled": ["test_device"]},
             "loss": ["test_planted"]}
    path = tiny_recipe(tmp_path, stage=[stage], run={"log_every": 1000})
    res = probe_steps(path, out_dir=tmp_path / "runs", steps=2,
                      plugins=[("planted", _PlantedPlugin())])
    assert res.steps == 2
    kinds = Counter(r.kind for r in res.syncs(warmup=False))
    # the boolean mask syncs in the forward and again in its backward (index_put with a mask)
    assert kinds == {"scalar": 1, "dynamic_shape": 2, "h2d_new": 1, "item": 1}, describe(res)
    where = Counter((r.range.split("/", 1)[1], r.where.split(" ")[0])
                    for r in res.syncs(warmup=False))
    assert sum(n for (rng, w), n in where.items()
               if w.startswith("tests/test_sync_probe.py:") and rng == "loss:test_planted") == 4
    assert [rng for rng, w in where if not w.startswith("tests/")] == ["backward"]
    with pytest.raises(SyncError, match="scalar .*test_sync_probe.py"):  # the first planted
        probe_steps(path, out_dir=tmp_path / "runs2", steps=2, raise_on_sync=True,
                    plugins=[("planted", _PlantedPlugin())])


def run_probe(name: str, tmp_path: Path, **kw):
    """`probe_steps` over recipe `name` of RECIPES (tiny sizes)."""
    recipe, over, steps, stages = RECIPES[name]
    if recipe in SSL_STAGES:
        path = tiny_recipe(tmp_path, data=SSL, stage=[SSL_STAGES[recipe]],
                           run={"log_every": 1000})
    else:
        path = ROOT / recipe
    return probe_steps(path, over, out_dir=tmp_path / "runs", steps=steps, stages=stages, **kw)


def describe(res) -> str:
    """'count kind op location' lines of a probe result's syncs."""
    rows = sorted(res.by_location().items(), key=lambda kv: (kv[0][2], kv[0][1]))
    return "\n".join(f"{n:3d} {k:13s} {op:24s} {where}" for (k, op, where), n in rows)


def test_probe_steps_sees_every_range_of_a_fixmatch_step(tmp_path):
    res = run_probe("fixmatch", tmp_path)
    assert res.steps == 3 and res.stages == ["fixmatch"]
    per_step = res.totals(1)
    for rng in ("data", "forward", "pseudo_labeler", "loss:ce", "loss:fixmatch", "backward",
                "optimizer", "ema"):
        assert per_step.get(rng, 0) > 0, (rng, per_step)
    assert all(r.where.startswith(("ltframe/", "plugins/")) for r in res.records), describe(res)
    assert all(r.step in (0, 1, 2) for r in res.records)


@pytest.mark.parametrize("name", list(RECIPES))
def test_no_host_device_sync_in_a_training_step(name, tmp_path):
    res = run_probe(name, tmp_path)
    assert res.steps > 0
    syncs = res.syncs()
    print(f"\n{name}: {len(syncs)} syncs in {res.steps} steps ({', '.join(res.stages)})\n"
          f"{describe(res)}")
    assert not syncs, f"{name}: {len(syncs)} host<->device syncs in {res.steps} steps:\n" \
                      f"{describe(res)}"
