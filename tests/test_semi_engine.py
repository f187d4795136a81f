"""The semi-supervised engine: target table, whole-pool labelling, indices, teacher, transform."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ltframe import hookimpl, resume_run, start_run
from ltframe.engine.context import PoolLabels, PseudoLabels
from ltframe.engine.targets import TargetTable
from ltframe.errors import LtframeError, RecipeError
from ltframe.testing import StopAt, tiny_recipe


class _Confident:
    """Online: hard argmax of the weak view where p >= 0.3; offline: argmax where p >= 0.3."""

    def __init__(self, params=None, **_):
        pass

    def __call__(self, ctx):
        p = ctx.logits("unlabeled").detach().softmax(1)
        conf, y = p.max(1)
        return PseudoLabels(y, (conf >= 0.3).float())

    def label_pool(self, pool):
        conf, y = pool.probs.max(1)
        keep = conf >= 0.3
        return PoolLabels(pool.index[keep], y[keep], torch.full((int(keep.sum()),), 0.5), conf[keep])


class _UnlabeledCE:
    """Test loss: CE of the strong view to the pseudo-labels; records what it saw."""

    seen: list = []

    def __init__(self, params=None, **_):
        pass

    def __call__(self, ctx):
        _UnlabeledCE.seen.append((ctx.indices("unlabeled").clone(), ctx.weights))
        logits = ctx.logits("unlabeled:strong")
        return (F.cross_entropy(logits, ctx.pseudo.targets, reduction="none") * ctx.pseudo.mask).mean()


class _Register:
    @hookimpl
    def ltframe_register(self, registry):
        registry.register("pseudo_labeler", "t_confident", _Confident)
        registry.register("loss", "t_unl_ce", _UnlabeledCE)


class _Relabel:
    """Replaces the hidden labels of the unlabeled pool after the splits are made."""

    def __init__(self, seed):
        self.seed = seed

    @hookimpl
    def ltframe_run_start(self, run):
        if self.seed is None:
            return
        u = run.data.splits.unlabeled
        g = torch.Generator().manual_seed(self.seed)
        run.data.source.train_labels[u] = torch.randint(0, run.data.num_classes, (u.numel(),),
                                                        generator=g)


SEMI = {
    "data": {"split": {"name": "fraction", "labeled_fraction": 0.3}},
    "stage": [
        {"name": "g0", "epochs": 2, "steps_per_epoch": 3, "data": "labeled+unlabeled",
         "unlabeled_ratio": 2, "ema": 0.9, "pseudo_labeler": "t_confident",
         "views": {"unlabeled": ["weak", "strong"]},
         "loss": ["ce", {"name": "t_unl_ce"}], "label": "t_confident"},
        {"name": "g1", "epochs": 2, "steps_per_epoch": 3, "data": "labeled+pseudo+unlabeled",
         "unlabeled_ratio": 2, "ema": 0.9, "pseudo_labeler": "t_confident", "reset": ["backbone"],
         "views": {"unlabeled": ["weak", "strong"]},
         "loss": ["ce", {"name": "t_unl_ce"}]},
    ],
}


def _run(tmp_path, relabel=None, plugins=(), **over):
    merged = {**SEMI, **over}
    return start_run(tiny_recipe(tmp_path, **merged),
                     plugins=[("reg", _Register()), ("relabel", _Relabel(relabel)), *plugins])


def _train_lines(run_dir, diagnostics=False):
    events = ("train", "eval", *(("pseudo_labels", "pool_labels") if diagnostics else ()))
    out = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e["event"] in events:
            e.pop("images_per_s", None)
            out.append(e)
    return out


def test_target_table_apply_and_state():
    t = TargetTable(10, 3, torch.tensor([0, 1, 2]), torch.tensor([2, 1, 0]))
    assert t.labels.tolist() == [2, 1, 0] + [-1] * 7
    t.apply(torch.tensor([1, 5, 7]), torch.tensor([0, 2, 1]), torch.tensor([1.0, 0.5, 0.25]))
    assert t.labels[1] == 1  # a labeled sample keeps its true label
    assert t.labels[5] == 2 and t.labels[7] == 1 and t.pseudo.tolist() == [5, 7]
    assert t.index(["labeled", "pseudo"]).tolist() == [0, 1, 2, 5, 7]
    assert not t.unit_weights(t.index(["pseudo"]))
    t.apply(torch.tensor([6]), torch.tensor([[0.1, 0.7, 0.2]]), torch.tensor([1.0]))
    assert t.labels[5] == -1 and t.labels[6] == 1  # replaced, soft -> argmax label
    assert t.has_soft(torch.tensor([0, 6])) and not t.has_soft(torch.tensor([0, 1]))
    u = TargetTable(10, 3, torch.tensor([0, 1, 2]), torch.tensor([2, 1, 0]))
    u.load_state_dict(t.state_dict())
    for a, b in zip(u.on(torch.device("cpu")), t.on(torch.device("cpu")), strict=True):
        assert torch.equal(a, b)
    assert u.generation == t.generation == 2


@pytest.mark.slow
def test_hidden_labels_never_reach_training(tmp_path):
    _UnlabeledCE.seen = []
    a = _run(tmp_path / "a", relabel=None)
    seen_a = list(_UnlabeledCE.seen)
    b = _run(tmp_path / "b", relabel=7)
    # every training number and selection is bit-identical ...
    assert _train_lines(a["run_dir"]) == _train_lines(b["run_dir"])
    csv_a = (Path(a["run_dir"]) / "pseudo_labels" / "stage0-g0.csv").read_text()
    assert csv_a == (Path(b["run_dir"]) / "pseudo_labels" / "stage0-g0.csv").read_text()
    assert csv_a.count("\n") > 1
    # ... only the diagnostics against the hidden labels change
    assert a["pseudo_labels"][0]["pl_precision"] != b["pseudo_labels"][0]["pl_precision"]
    assert a["stages"][0]["online_pseudo_labels"] != b["stages"][0]["online_pseudo_labels"]
    # the second stage trained on labeled + selected samples with their weights (0.5)
    assert any(w is not None and (w == 0.5).any() for _, w in seen_a)
    assert a["pseudo_labels"][0]["pl_count"] == sum(a["pseudo_labels"][0]["pl_selected"])


@pytest.mark.slow
def test_resume_after_labelling_equals_uninterrupted(tmp_path):
    # checkpoints every step: the resumed epoch's online pseudo-label counts continue too
    full = _run(tmp_path / "a", run={"checkpoint_every": 1})
    with pytest.raises(LtframeError, match="interrupted"):
        _run(tmp_path / "b", plugins=[("stop", StopAt(2, stage_index=1))],
             run={"checkpoint_every": 1})
    run_dir = next((tmp_path / "b" / "runs").iterdir())
    resumed = resume_run(run_dir, plugins=[("reg", _Register()), ("relabel", _Relabel(None))])
    assert _train_lines(full["run_dir"], True) == _train_lines(resumed["run_dir"], True)
    assert full["top1"] == resumed["top1"]


class _KillInLabelling:
    calls = 0

    def __init__(self, params=None, **_):
        pass

    def __call__(self, ctx):
        return _Confident()(ctx)

    def label_pool(self, pool):
        _KillInLabelling.calls += 1
        if _KillInLabelling.calls == 1:
            raise KeyboardInterrupt
        return _Confident().label_pool(pool)


class _RegisterKill:
    @hookimpl
    def ltframe_register(self, registry):
        registry.register("pseudo_labeler", "t_kill", _KillInLabelling)


@pytest.mark.slow
def test_killed_during_labelling_resumes(tmp_path):
    stages = [dict(SEMI["stage"][0], label="t_kill"), SEMI["stage"][1]]
    full = _run(tmp_path / "a", stage=[dict(SEMI["stage"][0]), SEMI["stage"][1]])
    _KillInLabelling.calls = 0
    with pytest.raises(LtframeError, match="interrupted"):
        _run(tmp_path / "b", plugins=[("kill", _RegisterKill())], stage=stages)
    run_dir = next((tmp_path / "b" / "runs").iterdir())
    resumed = resume_run(run_dir, plugins=[("reg", _Register()), ("kill", _RegisterKill()),
                                           ("relabel", _Relabel(None))])
    assert resumed["pseudo_labels"][0]["pl_selected"] == full["pseudo_labels"][0]["pl_selected"]
    assert resumed["top1"] == full["top1"]


def test_bad_semi_stages(tmp_path):
    with pytest.raises(RecipeError, match="pseudo-labelled samples but no earlier stage"):
        _run(tmp_path / "a", stage=[dict(SEMI["stage"][1], reset=[])])
    with pytest.raises(RecipeError, match="pseudo_labeler: an online pseudo-labeler needs"):
        _run(tmp_path / "b", stage=[{"name": "s", "epochs": 1, "steps_per_epoch": 1,
                                     "pseudo_labeler": "t_confident"}])
    with pytest.raises(RecipeError, match="uses unlabeled data but the split has none"):
        start_run(tiny_recipe(tmp_path / "c", stage=[dict(SEMI["stage"][0])]),
                  plugins=[("reg", _Register())])


class _ModeProbe:
    def __init__(self):
        self.modes = []

    @hookimpl
    def ltframe_step_end(self, run, stage, step, ctx):
        self.modes.append(run.model.backbone.training)


def test_frozen_parts_stay_in_eval_mode_after_evaluation(tmp_path):
    probe = _ModeProbe()
    start_run(tiny_recipe(tmp_path, stage=[{"name": "head", "epochs": 3, "steps_per_epoch": 2,
                                            "train": ["heads.main"], "eval_every": 1}]),
              plugins=[("probe", probe)])
    assert len(probe.modes) == 6 and not any(probe.modes)


class _TeacherProbe:
    """Loss that checks indices and the teacher against a manual forward."""

    checked = 0

    def __init__(self, params=None, **_):
        pass

    def __call__(self, ctx):
        t = ctx.teacher_logits("unlabeled")
        assert not t.requires_grad and t.shape == ctx.logits("unlabeled").shape
        idx = ctx.indices("unlabeled:strong")
        assert idx.shape[0] == ctx.logits("unlabeled:strong").shape[0]
        assert ctx.teacher_logits("unlabeled") is t  # computed once per step
        _TeacherProbe.checked += 1
        return ctx.logits("unlabeled").sum() * 0


class _RegisterProbe:
    @hookimpl
    def ltframe_register(self, registry):
        registry.register("loss", "t_probe", _TeacherProbe)


def test_teacher_and_indices_in_step(tmp_path):
    _TeacherProbe.checked = 0
    stage = {"name": "s", "epochs": 1, "steps_per_epoch": 2, "data": "labeled+unlabeled",
             "ema": 0.5, "views": {"unlabeled": ["weak", "strong"]},
             "loss": ["ce", {"name": "t_probe"}]}
    start_run(tiny_recipe(tmp_path / "a", data={"split": {"name": "fraction",
                                                          "labeled_fraction": 0.5}},
                          stage=[stage]), plugins=[("p", _RegisterProbe())])
    assert _TeacherProbe.checked == 2
    with pytest.raises(LtframeError, match="no teacher model"):
        start_run(tiny_recipe(tmp_path / "b", data={"split": {"name": "fraction",
                                                              "labeled_fraction": 0.5}},
                              stage=[dict(stage, ema=0.0)]), plugins=[("p", _RegisterProbe())])


class _SoftProbe:
    """Loss checking that labeled rows carry one-hot and selected rows soft targets."""

    seen = 0

    def __init__(self, params=None, **_):
        pass

    def __call__(self, ctx):
        s = ctx.soft_targets
        assert s is not None and torch.allclose(s.sum(1), torch.ones(s.shape[0]))
        assert torch.equal(s.argmax(1), ctx.targets)
        _SoftProbe.seen += int(((s > 0) & (s < 1)).any(1).sum())
        return ctx.logits("labeled").sum() * 0


def test_soft_pool_labels_reach_a_mixed_stage(tmp_path):
    class _Reg:
        @hookimpl
        def ltframe_register(self, registry):
            registry.register("loss", "t_soft", _SoftProbe)

    _SoftProbe.seen = 0
    stages = [{"name": "a", "epochs": 1, "steps_per_epoch": 2,
               "label": {"name": "threshold", "threshold": 0.0, "hard": False}},
              {"name": "b", "epochs": 1, "steps_per_epoch": 6, "data": "labeled+pseudo",
               "loss": ["ce", {"name": "t_soft"}]}]
    start_run(tiny_recipe(tmp_path, data={"split": {"name": "fraction", "labeled_fraction": 0.3}},
                          stage=stages), plugins=[("r", _Reg())])
    assert _SoftProbe.seen > 0


def test_pool_group_accuracy_is_the_argmax_accuracy_per_class_group():
    from types import SimpleNamespace

    from ltframe.engine.context import PoolLabels, PoolPredictions
    from ltframe.engine.labelling import diagnostics
    from ltframe.eval.metrics import group_masks

    hidden = torch.tensor([0, 1, 2, 0, 0, 1, 2, 2, 2])  # samples 0-2 labeled, 3-8 the pool
    pred = torch.tensor([0, 1, 2, 2, 1, 2])  # argmax for samples 3..8
    index = torch.arange(3, 9)
    probs = torch.nn.functional.one_hot(pred, 3).float()
    table = SimpleNamespace(pseudo=index, labels=torch.cat([hidden[:3], pred]),
                            labeled=torch.arange(3))
    pool = PoolPredictions(index=index, probs=probs, num_classes=3, class_counts=torch.ones(3),
                           stage_index=0, stage_name="s", logits=probs)
    sel = PoolLabels(index=index, targets=pred, weight=torch.ones(6))
    groups = group_masks(torch.tensor([5, 3, 1]), 0, 0, "rank", [1, 1])  # many {0} medium {1} few {2}
    out = diagnostics(sel, hidden, table, 3, pool, groups)
    # class 0: samples 3, 4 -> 1 of 2 right; class 1: sample 5 wrong; class 2: 6, 7, 8 -> 2 of 3
    assert out["pool_accuracy"] == round(100 * 3 / 6, 4)
    assert out["pool_group_accuracy"] == {"many": 50.0, "medium": 0.0, "few": round(200 / 3, 4)}
