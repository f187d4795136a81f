"""The ltframe_ssl plugin: threshold / align pseudo-labelers, FixMatch, Pseudo-Label, Mean
Teacher and MixMatch, on fixed tensors and in tiny end-to-end runs."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ltframe import resume_run, start_run
from ltframe.engine.context import PoolPredictions, PseudoLabels, StepContext
from ltframe.errors import LtframeError
from ltframe.testing import StopAt, tiny_recipe
from ltframe_ssl.labelers import Align, AlignParams, Threshold, ThresholdParams, align_target
from ltframe_ssl.losses import (
    FixMatchLoss,
    FixMatchParams,
    MeanTeacherLoss,
    MeanTeacherParams,
    PseudoLabelLoss,
    PseudoLabelParams,
)
from ltframe_ssl.mixmatch import MixMatchLoss, MixMatchLossParams, MixMatchParams, MixMatchTransform

C = 3


def ctx_with(logits: dict, step=0, total_steps=0, pseudo=None, targets=None, inputs=None,
             teacher=None, student_no_grad=None) -> StepContext:
    """A StepContext whose parts carry the given logits (head "main")."""
    return StepContext(step=step, epoch=0, num_classes=C, class_counts=torch.tensor([6, 3, 1]),
                       targets=targets, features_by_part={p: v for p, v in logits.items()},
                       logits_by_part={p: {"main": v} for p, v in logits.items()},
                       pseudo=pseudo, total_steps=total_steps, inputs_by_part=inputs or {},
                       _teacher=teacher, _student_no_grad=student_no_grad)


LOGITS = torch.log(torch.tensor([[0.97, 0.02, 0.01],
                                 [0.50, 0.30, 0.20],
                                 [0.01, 0.01, 0.98],
                                 [0.20, 0.70, 0.10]]))


# --- threshold ------------------------------------------------------------------------------
def test_threshold_online_hard_and_soft():
    ctx = ctx_with({"unlabeled": LOGITS.clone().requires_grad_()})
    pl = Threshold(ThresholdParams(), C)(ctx)
    assert pl.targets.tolist() == [0, 0, 2, 1] and pl.targets.dtype == torch.long
    assert pl.mask.tolist() == [1.0, 0.0, 1.0, 0.0] and pl.mask.dtype == torch.float32
    assert not pl.targets.requires_grad and not pl.mask.requires_grad
    soft = Threshold(ThresholdParams(threshold=0.6, hard=False), C)(ctx)
    assert torch.allclose(soft.targets, LOGITS.softmax(1)) and not soft.targets.requires_grad
    assert soft.mask.tolist() == [1.0, 0.0, 1.0, 1.0]
    # temperature: softmax(logits / 2) of [0.2, 0.7, 0.1] has max < 0.6
    warm = Threshold(ThresholdParams(threshold=0.6, temperature=2.0), C)(ctx)
    assert warm.mask.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_threshold_reads_the_configured_part():
    other = torch.tensor([[0.0, 9.0, 0.0]] * 4)
    ctx = ctx_with({"unlabeled": LOGITS, "unlabeled:strong": other})
    pl = Threshold(ThresholdParams(part="unlabeled:strong"), C)(ctx)
    assert pl.targets.tolist() == [1, 1, 1, 1] and pl.mask.tolist() == [1.0] * 4


def _pool(probs, logits=None):
    n = probs.shape[0]
    return PoolPredictions(index=torch.arange(100, 100 + n), probs=probs, num_classes=C,
                           class_counts=torch.tensor([6, 3, 1]), stage_index=0, stage_name="s",
                           logits=logits)


def test_threshold_offline():
    probs = LOGITS.softmax(1)
    sel = Threshold(ThresholdParams(), C).label_pool(_pool(probs))
    assert sel.index.tolist() == [100, 102] and sel.targets.tolist() == [0, 2]
    assert sel.weight.tolist() == [1.0, 1.0]
    assert torch.allclose(sel.confidence, torch.tensor([0.97, 0.98]))
    everything = Threshold(ThresholdParams(threshold=0.0, hard=False), C).label_pool(_pool(probs))
    assert everything.index.tolist() == [100, 101, 102, 103]
    assert everything.targets.shape == (4, C) and torch.allclose(everything.targets, probs)
    # temperature uses the pool's logits
    sharp = Threshold(ThresholdParams(threshold=0.6, temperature=0.5), C).label_pool(
        _pool(probs, LOGITS))
    assert sharp.index.tolist() == [100, 101, 102, 103]  # 0.5,0.3,0.2 sharpened -> 0.658


# --- align ----------------------------------------------------------------------------------
def _expected_align(p, target, p_model):
    a = p * (target + 1e-6) / (p_model + 1e-6)
    return a / a.sum(1, keepdim=True)


def test_align_target():
    t1 = align_target(torch.tensor([6, 3, 1]), 1.0)
    assert torch.allclose(t1, torch.tensor([0.6, 0.3, 0.1]))
    t_half = align_target(torch.tensor([4, 1, 0]), 0.5)
    assert torch.allclose(t_half, torch.tensor([2 / 3, 1 / 3, 0.0]))
    assert torch.allclose(align_target(torch.tensor([6, 3, 1]), 0.0), torch.full((3,), 1 / 3))
    # analytic profile ratio^(-rank/(C-1)), ranks from the counts (class 2 is the head here)
    prof = align_target(torch.tensor([3, 1, 9]), 1.0, ratio=4.0)
    assert torch.allclose(prof, torch.tensor([0.5, 0.25, 1.0]) / 1.75)


def test_align_window_formula_and_update_after_use():
    params = AlignParams(threshold=0.0, hard=False, window=2)
    lab = Align(params, C, torch.tensor([6, 3, 1]))
    target = torch.tensor([0.6, 0.3, 0.1])
    p1 = LOGITS.softmax(1)
    out1 = lab(ctx_with({"unlabeled": LOGITS}))
    # first batch: the window holds uniform rows, the batch's own mean is not used yet
    assert torch.allclose(out1.targets, _expected_align(p1, target, torch.full((C,), 1 / 3)))
    l2 = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    out2 = lab(ctx_with({"unlabeled": l2}))
    p_model = (p1.mean(0) + torch.full((C,), 1 / 3)) / 2  # one batch mean + one uniform row
    assert torch.allclose(out2.targets, _expected_align(l2.softmax(1), target, p_model))
    out3 = lab(ctx_with({"unlabeled": l2}))
    p_model = (p1.mean(0) + l2.softmax(1).mean(0)) / 2  # window of 2: uniform row dropped
    assert torch.allclose(out3.targets, _expected_align(l2.softmax(1), target, p_model))


def test_align_ema_formula():
    params = AlignParams(threshold=0.0, hard=False, p_model="ema", momentum=0.9)
    lab = Align(params, C, torch.tensor([6, 3, 1]))
    target = torch.tensor([0.6, 0.3, 0.1])
    p1 = LOGITS.softmax(1)
    out1 = lab(ctx_with({"unlabeled": LOGITS}))
    # first batch: p_model = its own mean (USB DistAlignEMAHook), used after the update
    assert torch.allclose(out1.targets, _expected_align(p1, target, p1.mean(0)))
    l2 = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    out2 = lab(ctx_with({"unlabeled": l2}))
    p_model = 0.9 * p1.mean(0) + 0.1 * l2.softmax(1).mean(0)
    assert torch.allclose(out2.targets, _expected_align(l2.softmax(1), target, p_model))


def test_align_thresholds_the_aligned_probabilities():
    logits = torch.log(torch.tensor([[0.5, 0.45, 0.05]]))
    lab = Align(AlignParams(threshold=0.6), C, torch.tensor([1, 10, 1]))
    pl = lab(ctx_with({"unlabeled": logits}))
    # raw max 0.5 < 0.6, but the target favours class 1: p~ = [.5/12, 4.5/12, .05/12] / sum
    assert pl.targets.tolist() == [1] and pl.mask.tolist() == [1.0]


@pytest.mark.parametrize("mode", ["window", "ema"])
def test_align_moves_skewed_predictions_toward_the_target(mode):
    g = torch.Generator().manual_seed(0)
    lab = Align(AlignParams(threshold=0.0, p_model=mode, window=8, momentum=0.8), C,
                torch.tensor([1, 1, 1]))  # target: uniform
    raw_hist, aligned_hist = torch.zeros(C), torch.zeros(C)
    for step in range(30):
        logits = torch.randn(64, C, generator=g) + torch.tensor([1.5, 0.0, -0.5])  # skewed to 0
        pl = lab(ctx_with({"unlabeled": logits}))
        if step >= 10:  # once p_model has followed the skew
            raw_hist += torch.bincount(logits.argmax(1), minlength=C)
            aligned_hist += torch.bincount(pl.targets, minlength=C)
    uniform = torch.full((C,), 1 / 3)
    raw_gap = (raw_hist / raw_hist.sum() - uniform).abs().sum()
    aligned_gap = (aligned_hist / aligned_hist.sum() - uniform).abs().sum()
    assert raw_gap > 0.5 and aligned_gap < raw_gap / 3


@pytest.mark.parametrize("mode", ["window", "ema"])
def test_align_state_dict_round_trip(mode):
    g = torch.Generator().manual_seed(1)
    params = AlignParams(threshold=0.5, p_model=mode, window=4, hard=False)
    a = Align(params, C, torch.tensor([6, 3, 1]))
    batches = [torch.randn(8, C, generator=g) for _ in range(7)]
    for x in batches[:5]:
        a(ctx_with({"unlabeled": x}))
    state = a.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    b = Align(params, C, torch.tensor([6, 3, 1]))
    b.load_state_dict({k: v.clone() for k, v in state.items()})
    for x in batches[5:]:
        pa, pb = a(ctx_with({"unlabeled": x})), b(ctx_with({"unlabeled": x}))
        assert torch.equal(pa.targets, pb.targets) and torch.equal(pa.mask, pb.mask)
    fresh = Align(params, C, torch.tensor([6, 3, 1]))
    assert not torch.equal(fresh(ctx_with({"unlabeled": batches[6]})).targets,
                           a(ctx_with({"unlabeled": batches[6]})).targets)


def test_align_offline_uses_the_current_p_model():
    probs = LOGITS.softmax(1)
    target = torch.tensor([0.6, 0.3, 0.1])
    fresh = Align(AlignParams(threshold=0.0, hard=False), C, torch.tensor([6, 3, 1]))
    sel = fresh.label_pool(_pool(probs))
    assert torch.allclose(sel.targets, _expected_align(probs, target, torch.full((C,), 1 / 3)))
    ema = Align(AlignParams(threshold=0.0, hard=False, p_model="ema"), C, torch.tensor([6, 3, 1]))
    sel = ema.label_pool(_pool(probs))  # no batch seen: the pool's own mean
    assert torch.allclose(sel.targets, _expected_align(probs, target, probs.mean(0)))
    ema(ctx_with({"unlabeled": torch.zeros(2, C)}))  # p_model := uniform
    sel = ema.label_pool(_pool(probs))
    assert torch.allclose(sel.targets, _expected_align(probs, target, torch.full((C,), 1 / 3)))
    assert torch.allclose(sel.confidence, sel.targets.max(1).values)


# --- fixmatch / pseudo_label / mean_teacher -------------------------------------------------
def test_fixmatch_loss_is_the_masked_mean_over_all_unlabeled_samples():
    strong = torch.randn(4, C, requires_grad=True)
    targets, mask = torch.tensor([0, 1, 2, 1]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    ctx = ctx_with({"unlabeled": LOGITS, "unlabeled:strong": strong},
                   pseudo=PseudoLabels(targets, mask))
    value = FixMatchLoss(FixMatchParams())(ctx)
    ls = strong.log_softmax(1)
    expected = -(ls[0, 0] + ls[2, 2]) / 4  # masked samples count in the denominator
    assert torch.allclose(value, expected)
    value.backward()
    assert strong.grad[1].abs().sum() == 0 and strong.grad[0].abs().sum() > 0
    soft = torch.softmax(torch.randn(4, C), 1)
    ctx.pseudo = PseudoLabels(soft, mask)
    expected = -((soft * ls).sum(1) * mask).sum() / 4
    assert torch.allclose(FixMatchLoss(FixMatchParams())(ctx), expected)


def test_fixmatch_without_pseudo_labeler_is_explained():
    ctx = ctx_with({"unlabeled:strong": torch.randn(4, C)})
    with pytest.raises(LtframeError, match=r"stage\.pseudo_labeler.*threshold"):
        FixMatchLoss(FixMatchParams())(ctx)


def test_pseudo_label_ramp():
    logits = torch.randn(4, C)
    pl = PseudoLabels(torch.tensor([0, 1, 2, 0]), torch.tensor([1.0, 1.0, 0.0, 1.0]))
    base = (F.cross_entropy(logits, pl.targets, reduction="none") * pl.mask).mean()
    loss = PseudoLabelLoss(PseudoLabelParams())  # warmup 0.4 (USB)
    values = [float(loss(ctx_with({"unlabeled": logits}, step=s, total_steps=100, pseudo=pl)))
              for s in (0, 20, 40, 99)]
    assert values[0] == 0.0
    assert values[1] == pytest.approx(0.5 * float(base))
    assert values[2] == pytest.approx(float(base)) and values[3] == pytest.approx(float(base))
    no_ramp = PseudoLabelLoss(PseudoLabelParams(warmup=0.0))
    assert float(no_ramp(ctx_with({"unlabeled": logits}, step=0, total_steps=100, pseudo=pl))) \
        == pytest.approx(float(base))


def test_mean_teacher_uses_the_teacher_and_trains_the_student_only():
    student_w = torch.randn(4, C, requires_grad=True)
    teacher_w = torch.randn(4, C, requires_grad=True)
    asked = []

    def teacher(part):
        asked.append(part)
        return None, {"main": teacher_w * 1.0}

    weak = torch.randn(4, C)
    logits = {"unlabeled:weak": weak, "unlabeled:weak#1": student_w, "unlabeled": weak}
    inputs = {"unlabeled:weak": weak, "unlabeled:weak#1": weak, "unlabeled": weak}
    ctx = ctx_with(logits, inputs=inputs, teacher=teacher, step=50, total_steps=100)
    value = MeanTeacherLoss(MeanTeacherParams())(ctx)  # student: the second unlabeled view
    expected = ((student_w.softmax(1) - teacher_w.softmax(1)) ** 2).mean()
    assert torch.allclose(value, expected) and asked == ["unlabeled"]
    value.backward()
    assert student_w.grad is not None and student_w.grad.abs().sum() > 0
    assert teacher_w.grad is None
    # linear ramp over 0.4 of the stage (USB); the paper's sigmoid ramp
    early = ctx_with(logits, inputs=inputs, teacher=teacher, step=10, total_steps=100)
    lin = MeanTeacherLoss(MeanTeacherParams())(early)
    sig = MeanTeacherLoss(MeanTeacherParams(ramp="sigmoid"))(early)
    assert torch.allclose(lin, expected * 0.25)
    assert torch.allclose(sig, expected * torch.exp(torch.tensor(-5 * 0.75 ** 2)))


def test_mean_teacher_needs_two_views_or_a_part():
    x = torch.randn(4, C)
    ctx = ctx_with({"unlabeled:weak": x, "unlabeled": x}, inputs={"unlabeled": x},
                   teacher=lambda part: (None, {"main": x}))
    with pytest.raises(LtframeError, match=r"views\.unlabeled = \[\"weak\", \"weak\"\]"):
        MeanTeacherLoss(MeanTeacherParams())(ctx)
    no_teacher = ctx_with({"unlabeled:weak": x, "unlabeled:weak#1": x, "unlabeled": x},
                          inputs={"unlabeled": x})
    with pytest.raises(LtframeError, match="stage.ema > 0"):
        MeanTeacherLoss(MeanTeacherParams())(no_teacher)


# --- mixmatch -------------------------------------------------------------------------------
def _mix_ctx(step=0, b=4, mu=1):
    g = torch.Generator().manual_seed(3)
    xl = torch.randn(b, 3, 4, 4, generator=g)
    xu1, xu2 = torch.randn(2, b * mu, 3, 4, 4, generator=g)
    inputs = {"labeled:weak": xl, "unlabeled:weak": xu1, "unlabeled:weak#1": xu2,
              "labeled": xl, "unlabeled": xu1}
    proj = torch.randn(48, C, generator=g)
    return StepContext(step=step, epoch=0, num_classes=C, class_counts=torch.tensor([6, 3, 1]),
                       targets=torch.arange(b) % C, features_by_part={}, logits_by_part={},
                       inputs_by_part=dict(inputs),
                       _student_no_grad=lambda x: (None, {"main": x.flatten(1) @ proj}))


def test_mixmatch_transform_shapes_targets_and_lambda():
    ctx = _mix_ctx(b=4, mu=2)
    before = {k: v.clone() for k, v in ctx.inputs_by_part.items()}
    t = MixMatchTransform(MixMatchParams(), C)
    t(ctx)
    mixed = ctx.extras["mixmatch"]
    assert set(mixed) == {"labeled:weak", "unlabeled:weak", "unlabeled:weak#1"}
    for part, y in mixed.items():
        assert ctx.inputs_by_part[part].shape == before[part].shape
        assert not torch.equal(ctx.inputs_by_part[part], before[part])
        assert y.shape == (before[part].shape[0], C)
        assert torch.allclose(y.sum(1), torch.ones(y.shape[0])) and (y >= 0).all()
    assert t.last_lam >= 0.5
    # every mixed input is lam * own + (1 - lam) * another row of the concatenation
    lam = t.last_lam
    x_all = torch.cat([before[p] for p in mixed])
    x_mix = torch.cat([ctx.inputs_by_part[p] for p in mixed])
    partner = (x_mix - lam * x_all) / (1 - lam)
    dist = torch.cdist(partner.flatten(1), x_all.flatten(1))
    assert dist.min(1).values.max() < 1e-3
    assert sorted(dist.argmin(1).tolist()) == list(range(x_all.shape[0]))  # a permutation
    # the labeled targets start from one-hot labels; guesses are sharpened (T = 0.5)
    y_l = F.one_hot(ctx.targets, C).float()
    y_lab_part = mixed["labeled:weak"]
    assert torch.all((y_lab_part - lam * y_l) >= -1e-6)


def test_mixmatch_transform_is_deterministic_per_step():
    outs = []
    for step in (5, 5, 6):
        ctx = _mix_ctx(step=step)
        t = MixMatchTransform(MixMatchParams(seed=1), C)
        t(ctx)
        outs.append((t.last_lam, ctx.inputs_by_part["unlabeled:weak#1"],
                     ctx.extras["mixmatch"]["unlabeled:weak"]))
    assert outs[0][0] == outs[1][0]
    assert torch.equal(outs[0][1], outs[1][1]) and torch.equal(outs[0][2], outs[1][2])
    assert outs[0][0] != outs[2][0] and not torch.equal(outs[0][1], outs[2][1])


def test_mixmatch_guess_is_the_sharpened_mean_over_views():
    ctx = _mix_ctx()
    t = MixMatchTransform(MixMatchParams(), C)
    parts = ["unlabeled:weak", "unlabeled:weak#1"]
    probs = [ctx.predict_no_grad(ctx.inputs(p)).softmax(1) for p in parts]
    mean = (probs[0] + probs[1]) / 2
    expected = mean ** 2 / (mean ** 2).sum(1, keepdim=True)
    assert torch.allclose(t.guess(ctx, parts), expected)


def test_mixmatch_loss_hand_computation():
    g = torch.Generator().manual_seed(4)
    logits = {p: torch.randn(4, C, generator=g, requires_grad=True)
              for p in ("labeled:weak", "unlabeled:weak", "unlabeled:weak#1")}
    ctx = ctx_with(logits, step=10, total_steps=100)
    ctx.extras["mixmatch"] = {p: torch.softmax(torch.randn(4, C, generator=g), 1) for p in logits}
    y = ctx.extras["mixmatch"]
    sup = -(y["labeled:weak"] * logits["labeled:weak"].log_softmax(1)).sum(1).mean()
    pu = torch.cat([logits["unlabeled:weak"], logits["unlabeled:weak#1"]]).softmax(1)
    mse = ((pu - torch.cat([y["unlabeled:weak"], y["unlabeled:weak#1"]])) ** 2).mean()
    value = MixMatchLoss(MixMatchLossParams())(ctx)  # lambda_u 100, ramp 10 / 40
    assert torch.allclose(value, sup + 100 * 0.25 * mse)
    with pytest.raises(LtframeError, match='stage.transform = "mixmatch"'):
        MixMatchLoss(MixMatchLossParams())(ctx_with(logits))


# --- end to end -----------------------------------------------------------------------------
SSL_STAGES = [
    {"name": "fixmatch", "epochs": 1, "steps_per_epoch": 2, "data": "labeled+unlabeled",
     "unlabeled_ratio": 2, "ema": 0.9, "views": {"unlabeled": ["weak", "strong"]},
     "pseudo_labeler": {"name": "threshold", "threshold": 0.3},
     "loss": ["ce", {"name": "fixmatch", "weight": 1.0}]},
    {"name": "mixmatch", "epochs": 1, "steps_per_epoch": 2, "data": "labeled+unlabeled",
     "ema": 0.9, "views": {"unlabeled": ["weak", "weak"]}, "transform": "mixmatch",
     "loss": ["mixmatch"]},
    {"name": "mean_teacher", "epochs": 1, "steps_per_epoch": 2, "data": "labeled+unlabeled",
     "ema": 0.9, "views": {"unlabeled": ["weak", "weak"]},
     "loss": ["ce", {"name": "mean_teacher", "weight": 50.0, "warmup": 0.0}]},
]
SPLIT = {"split": {"name": "fraction", "labeled_fraction": 0.3}}


def _events(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").open()]


@pytest.mark.slow
def test_fixmatch_mixmatch_mean_teacher_stages_run(tmp_path):
    summary = start_run(tiny_recipe(tmp_path, data=SPLIT, stage=SSL_STAGES))
    rows = _events(summary["run_dir"])
    train = {r["stage"]: r["loss"] for r in rows if r["event"] == "train"}
    assert {"ce", "fixmatch", "total"} <= set(train["fixmatch"])
    assert {"mixmatch", "total"} <= set(train["mixmatch"])
    assert {"ce", "mean_teacher", "total"} <= set(train["mean_teacher"])
    assert train["mean_teacher"]["mean_teacher"] > 0  # the student is pulled to the teacher
    for losses in train.values():
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    pl = [r for r in rows if r["event"] == "pseudo_labels"]
    assert [r["stage"] for r in pl] == ["fixmatch"]
    assert 0 < pl[0]["pl_count"] <= 2 * 2 * 8 and len(pl[0]["pl_precision"]) == 4
    assert len(summary["stages"]) == 3


@pytest.mark.slow
def test_align_state_and_mixmatch_resume_bit_identical(tmp_path):
    """Interrupted in the align stage's second epoch, resumed from the epoch-0 checkpoint: the
    labeler's p_model window comes back from the checkpoint (soft targets: any difference in
    p_model changes the loss), and the MixMatch stage after it draws the same mixes."""
    stages = [
        {"name": "crest_plus", "epochs": 2, "steps_per_epoch": 2, "data": "labeled+unlabeled",
         "ema": 0.9, "views": {"unlabeled": ["weak", "strong"]},
         "pseudo_labeler": {"name": "align", "threshold": 0.3, "window": 4, "t": 0.5,
                            "hard": False},
         "loss": ["ce", "fixmatch"]},
        {"name": "mixmatch", "epochs": 1, "steps_per_epoch": 2, "data": "labeled+unlabeled",
         "views": {"unlabeled": ["weak", "weak"]}, "transform": {"name": "mixmatch", "seed": 3},
         "loss": ["mixmatch"]},
    ]
    over = {"run": {"log_every": 1}, "data": SPLIT, "stage": stages}
    full = start_run(tiny_recipe(tmp_path / "a", **over))
    with pytest.raises(LtframeError, match="interrupted"):
        start_run(tiny_recipe(tmp_path / "b", **over), plugins=[("stop", StopAt(4, 0))])
    resumed = resume_run(next((tmp_path / "b" / "runs").iterdir()))

    def lines(run_dir):
        out = []
        for r in _events(run_dir):
            if r["event"] in ("train", "eval", "pseudo_labels"):
                r.pop("images_per_s", None)
                out.append(r)
        return out

    assert lines(full["run_dir"]) == lines(resumed["run_dir"])
    assert full["top1"] == resumed["top1"]


def test_mixmatch_draws_depend_on_the_stage_seed():
    from ltframe_ssl.mixmatch import MixMatchParams, MixMatchTransform

    a = MixMatchTransform(MixMatchParams(), 4, seed=0)
    b = MixMatchTransform(MixMatchParams(), 4, seed=1001)
    assert a.seed != b.seed
    assert MixMatchTransform(MixMatchParams(), 4, seed=0).seed == a.seed
