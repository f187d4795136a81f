"""Supervised long-tailed baselines (plugins/ltframe_ltbase, issue 21): each loss / head on fixed
inputs against the reference code's rule written out independently (small loops), state
checkpointed and restored, bad parameters refused, and mixes with other methods."""

import json
import math
from pathlib import Path

import pytest
import torch

from ltframe import start_run
from ltframe.engine.context import StepContext
from ltframe.errors import RecipeError
from ltframe.testing import tiny_recipe

ROOT = Path(__file__).parent.parent
COUNTS = (100, 10, 1)


def ctx_for(logits, targets, epoch=0, counts=COUNTS, step=0, **kw):
    parts = {"labeled": torch.zeros(len(targets), 2)}
    return StepContext(step=step, epoch=epoch, num_classes=logits.shape[1],
                       class_counts=torch.tensor(counts), targets=targets,
                       features_by_part=kw.pop("features", parts),
                       logits_by_part={"labeled": {"main": logits}}, **kw)


def build(registry, kind, table, counts=COUNTS, **ctx):
    return registry.build(registry.spec(kind, table, kind), num_classes=len(counts),
                          class_counts=torch.tensor(counts), **ctx)


def loop_ce(logits, targets, offsets, weights=None):
    """-log softmax(z + offset)_y, weighted mean sum w_y l / sum w_y, one sample at a time."""
    num, den = 0.0, 0.0
    for z, y in zip(logits.tolist(), targets.tolist(), strict=True):
        a = [zc + oc for zc, oc in zip(z, offsets, strict=True)]
        lse = math.log(sum(math.exp(v) for v in a))
        w = 1.0 if weights is None else weights[y]
        num += w * (lse - a[y])
        den += w
    return num / den


# --- balanced_softmax -----------------------------------------------------------------------
LOGITS = torch.tensor([[1.0, 0.5, -0.2], [0.1, 2.0, 0.3], [-1.0, 0.2, 0.4], [0.3, 0.3, 0.3]])
TARGETS = torch.tensor([0, 1, 2, 2])


def test_balanced_softmax_is_ce_of_logits_plus_log_counts(registry):
    got = build(registry, "loss", "balanced_softmax")(ctx_for(LOGITS, TARGETS))
    want = loop_ce(LOGITS, TARGETS, [math.log(n) for n in COUNTS])
    assert got.item() == pytest.approx(want, abs=1e-6)
    # log n_c and log pi_c differ by a constant: the same loss as logit adjustment with tau = 1
    la = build(registry, "loss", {"name": "la", "tau": 1.0})(ctx_for(LOGITS, TARGETS))
    assert got.item() == pytest.approx(la.item(), abs=1e-6)


def test_balanced_softmax_under_drw(registry):
    beta = 0.9999
    raw = [(1 - beta) / (1 - beta**n) for n in COUNTS]
    w = [r / sum(raw) * len(raw) for r in raw]
    loss = build(registry, "loss", {"name": "balanced_softmax", "reweight": "drw", "drw_epoch": 2})
    offsets = [math.log(n) for n in COUNTS]
    assert loss(ctx_for(LOGITS, TARGETS, epoch=1)).item() == pytest.approx(
        loop_ce(LOGITS, TARGETS, offsets), abs=1e-6)
    assert loss(ctx_for(LOGITS, TARGETS, epoch=2)).item() == pytest.approx(
        loop_ce(LOGITS, TARGETS, offsets, w), abs=1e-5)


def test_mixup_transform_and_mixed_balanced_softmax(registry):
    from ltframe_ltbase.mixup import draw

    x = torch.arange(4 * 3 * 2 * 2, dtype=torch.float32).view(4, 3, 2, 2)
    ctx = ctx_for(LOGITS, TARGETS, step=7, inputs_by_part={"labeled": x})
    mix = build(registry, "transform", {"name": "mixup", "alpha": 1.0}, seed=3)
    mix(ctx)
    lam, perm = draw(3, 7, 4, 1.0, False)  # the stage seed 3, params.seed 0
    assert sorted(perm.tolist()) == [0, 1, 2, 3] and 0 < lam < 1
    assert torch.allclose(ctx.inputs("labeled"), lam * x + (1 - lam) * x[perm])
    got = build(registry, "loss", "balanced_softmax")(ctx)
    offsets = [math.log(n) for n in COUNTS]
    want = lam * loop_ce(LOGITS, TARGETS, offsets) + (1 - lam) * loop_ce(LOGITS, TARGETS[perm], offsets)
    assert got.item() == pytest.approx(want, abs=1e-6)
    # the same (seed, step) draws the same mix; another step another one
    assert draw(3, 7, 4, 1.0, False)[0] == lam and draw(3, 8, 4, 1.0, False)[0] != lam
    assert draw(3, 7, 4, 1.0, True)[0] == max(lam, 1 - lam)


def test_bad_parameters_refused(registry):
    with pytest.raises(RecipeError, match="alpha"):
        registry.spec("transform", {"name": "mixup", "alpha": 0.0}, "t")
    with pytest.raises(RecipeError, match="beta"):
        registry.spec("loss", {"name": "balanced_softmax", "beta": 1.0}, "l")


# --- mixes with other methods -------------------------------------------------------------------
@pytest.mark.slow
def test_mix_balanced_softmax_drw_with_posthoc_la(tmp_path):
    """balanced_softmax under DRW (CB weights from stage epoch 1) with post-hoc LA rows."""
    over = {"stage": [{"name": "train", "epochs": 2, "steps_per_epoch": 2, "eval_every": 1,
                       "loss": [{"name": "balanced_softmax", "reweight": "drw", "drw_epoch": 1}]}],
            "eval": {"posthoc_tau": [0.0, 1.0]}}
    summary = start_run(tiny_recipe(tmp_path, **over))
    rows = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["event"] == "eval"]
    assert len(evals) == 2 and all(0 <= r["top1"] <= 100 for r in evals)
    assert [row["posthoc_tau"] for row in evals[-1]["rows"]] == [0.0, 1.0]
    train = [r for r in rows if r["event"] == "train"]
    assert all(math.isfinite(r["loss"]["balanced_softmax"]) for r in train)


@pytest.mark.slow
def test_mix_balanced_softmax_as_fixmatch_labeled_term(tmp_path):
    """balanced_softmax as the labeled term of a FixMatch stage (recipes/cpu/fixmatch.toml)."""
    summary = start_run(ROOT / "recipes/cpu/fixmatch.toml",
                        ['stage[0].loss[0]={name="balanced_softmax"}'], out_dir=tmp_path, smoke=True)
    run = Path(summary["run_dir"])
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["event"] == "train"]
    assert losses and {"balanced_softmax", "fixmatch"} <= set(losses[-1])
    assert any(r.get("mask_ratio") is not None for r in rows if r["event"] == "train")


# --- causal_norm (TDE) ----------------------------------------------------------------------
def loop_causal_norm(x, w, embed, k, tau, gamma, alpha, effect):
    """CausalNormClassifier.forward written out per sample, chunk and class."""
    d = x.shape[1] // k
    out = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float64)
    for i in range(x.shape[0]):
        for h in range(k):
            xs = x[i, h * d:(h + 1) * d].double()
            nx = xs / xs.norm()
            if effect:
                c = embed[h * d:(h + 1) * d].double()
                nc = c / c.norm()
                cos = (nx * nc).sum() / nx.norm() / nc.norm()
                nx = nx - cos * alpha * nc
            for j in range(w.shape[0]):
                ws = w[j, h * d:(h + 1) * d].double()
                out[i, j] += (tau / k) * (nx * (ws / (ws.norm() + gamma))).sum()
    return out


def test_causal_norm_training_logits_direction_and_tde(registry):
    torch.manual_seed(0)
    spec = registry.spec("head", {"name": "causal_norm", "num_head": 2, "alpha": 1.5, "mu": 0.9}, "h")
    head = registry.build(spec, in_features=6, num_classes=3)
    x1, x2 = torch.randn(4, 6), torch.randn(5, 6)
    head.train()
    z = head(x1)
    assert torch.allclose(z.double(), loop_causal_norm(x1, head.weight.detach(), None, 2, 16.0,
                                                       1 / 32, 0.0, False), atol=1e-5)
    head(x2)  # d = 0.9 (0.9 * 0 + mean x1) + mean x2: accumulated, no (1 - mu)
    assert torch.allclose(head.embed, 0.9 * x1.mean(0) + x2.mean(0), atol=1e-6)
    with torch.no_grad():  # a no-grad forward (teacher, label guess) leaves d alone
        head(x2)
    assert torch.allclose(head.embed, 0.9 * x1.mean(0) + x2.mean(0), atol=1e-6)
    head.eval()
    got = head(x1)
    want = loop_causal_norm(x1, head.weight.detach(), head.embed, 2, 16.0, 1 / 32, 1.5, True)
    assert torch.allclose(got.double(), want, atol=1e-5)
    assert not torch.allclose(got, z, atol=1e-3)  # the counterfactual moved the logits
    # d is part of the head's state (checkpoints, EMA, export): a round trip is bit-exact
    other = registry.build(spec, in_features=6, num_classes=3)
    other.load_state_dict(head.state_dict())
    other.eval()
    assert torch.equal(other.embed, head.embed) and torch.equal(other(x1), got)


def test_causal_norm_refuses_bad_parameters(registry):
    with pytest.raises(RecipeError, match="divide"):
        registry.build(registry.spec("head", {"name": "causal_norm", "num_head": 4}, "h"),
                       in_features=6, num_classes=3)
    with pytest.raises(RecipeError, match="mu"):
        registry.spec("head", {"name": "causal_norm", "mu": 1.5}, "h")


@pytest.mark.slow
def test_causal_norm_direction_survives_resume(tmp_path):
    from ltframe import resume_run
    from ltframe.errors import LtframeError
    from ltframe.testing import StopAt

    over = {"run": {"log_every": 1}, "model": {"heads": {"main": {"name": "causal_norm"}}},
            "stage": [{"name": "train", "epochs": 2, "steps_per_epoch": 3, "eval_every": 1}]}
    full = start_run(tiny_recipe(tmp_path / "a", **over))
    with pytest.raises(LtframeError, match="interrupted"):
        start_run(tiny_recipe(tmp_path / "b", **over), plugins=[("stop", StopAt(4, 0))])
    resumed = resume_run(next((tmp_path / "b" / "runs").iterdir()))
    assert _evals(full) == _evals(resumed)
    a, b = _latest(full), _latest(resumed)
    assert a["model.heads.main.embed"].abs().sum() > 0
    assert torch.equal(a["model.heads.main.embed"], b["model.heads.main.embed"])


def _evals(summary):
    rows = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows
            if r["event"] in ("train", "eval")]


def _latest(summary):
    from safetensors.torch import load_file

    ckpt = Path(summary["run_dir"]) / "checkpoints"
    return load_file(ckpt / f"{(ckpt / 'latest').read_text().strip()}.safetensors")


# --- weight balancing ---------------------------------------------------------------------
class _Heads(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.heads = torch.nn.ModuleDict({"main": torch.nn.Linear(w.shape[1], w.shape[0])})
        with torch.no_grad():
            self.heads["main"].weight.copy_(w)


def test_weight_balancing_loss_is_weighted_bce_on_softmax(registry):
    beta = 0.9999
    raw = [(1 - beta) / (1 - beta**n) for n in COUNTS]
    w = [r / sum(raw) * len(raw) for r in raw]
    total = 0.0
    for z, y in zip(LOGITS.tolist(), TARGETS.tolist(), strict=True):
        e = [math.exp(v) for v in z]
        p = [v / sum(e) for v in e]
        for c, pc in enumerate(p):
            total += w[y] * -(math.log(pc) if c == y else math.log(1 - pc))
    want = total / (LOGITS.shape[0] * LOGITS.shape[1])
    model = _Heads(torch.randn(3, 2))
    loss = build(registry, "loss", {"name": "weight_balancing", "max_norm": 0.0})
    got = loss(ctx_for(LOGITS, TARGETS, model=model))
    assert got.item() == pytest.approx(want, abs=1e-6)


def test_max_norm_threshold_projection_and_schedule():
    from ltframe_ltbase.weight_balancing import MaxNorm, MaxNormParams

    w0 = torch.tensor([[3.0, 4.0], [0.6, 0.8], [1.0, 0.0], [0.0, 2.0]])  # norms 5, 1, 1, 2
    model = _Heads(w0)
    mn = MaxNorm(MaxNormParams(thresh=0.25))
    ctx = ctx_for(LOGITS, TARGETS, model=model, total_steps=7, steps_per_epoch=3)
    mn.start(model)
    thresh = 1 + 0.25 * (5 - 1)  # min + t (max - min) = 2
    assert mn.threshold.item() == pytest.approx(thresh)
    with torch.no_grad():
        model.heads["main"].weight.mul_(2.0)  # an update: norms 10, 2, 2, 4
    due = [s for s in range(7) if mn.due(ctx_for(LOGITS, TARGETS, step=s, total_steps=7,
                                                   steps_per_epoch=3))]
    assert due == [2, 5, 6]  # the last step of each epoch, and of the stage
    mn.ltframe_step_end(None, None, 0, ctx)  # step 0: not an epoch's end, nothing projected
    assert torch.equal(model.heads["main"].weight, 2 * w0)
    mn.ltframe_step_end(None, None, 2, ctx_for(LOGITS, TARGETS, step=2, model=model,
                                               total_steps=7, steps_per_epoch=3))
    want = []
    for row in (2 * w0).tolist():
        n = math.hypot(*row)
        want.append([v * thresh / n for v in row] if n > thresh else row)
    assert torch.allclose(model.heads["main"].weight, torch.tensor(want), atol=1e-6)
    mn.start(model)  # the threshold stays the one of the stage start
    assert mn.threshold.item() == pytest.approx(thresh)
    state = mn.state_dict()
    other = MaxNorm(MaxNormParams())
    other.load_state_dict(state)
    assert torch.equal(other.threshold, mn.threshold)


def test_max_norm_refuses_bad_parameters(registry):
    with pytest.raises(RecipeError, match="max_norm"):
        registry.spec("loss", {"name": "weight_balancing", "max_norm": 2.0}, "l")
    wb = build(registry, "loss", {"name": "weight_balancing", "parameter": "fc.weight"})
    with pytest.raises(RecipeError, match="no parameter"):
        wb(ctx_for(LOGITS, TARGETS, model=_Heads(torch.ones(3, 2))))


@pytest.mark.slow
def test_weight_balancing_stage_resumes_bit_exact(tmp_path):
    from ltframe import resume_run
    from ltframe.errors import LtframeError
    from ltframe.testing import StopAt

    over = {"run": {"log_every": 1},
            "stage": [{"name": "ce", "epochs": 1, "steps_per_epoch": 2, "eval_every": 1},
                      {"name": "wb", "epochs": 2, "steps_per_epoch": 3, "eval_every": 1,
                       "train": ["heads.main"], "frozen_bn": "update",
                       "optim": {"weight_decay": 0.1},
                       "loss": [{"name": "weight_balancing", "max_norm": 0.1}]}]}
    full = start_run(tiny_recipe(tmp_path / "a", **over))
    with pytest.raises(LtframeError, match="interrupted"):
        start_run(tiny_recipe(tmp_path / "b", **over), plugins=[("stop", StopAt(4, 1))])
    resumed = resume_run(next((tmp_path / "b" / "runs").iterdir()))
    assert _evals(full) == _evals(resumed)
    a, b = _latest(full), _latest(resumed)
    assert torch.equal(a["model.heads.main.weight"], b["model.heads.main.weight"])
    # the final rows respect the cap fixed at the start of stage "wb" (stage-1 checkpoint rows)
    ckpt = Path(full["run_dir"]) / "checkpoints"
    from safetensors.torch import load_file

    start = load_file(next(ckpt.glob("stage0-*.safetensors")))["model.heads.main.weight"].norm(dim=1)
    cap = start.min() + 0.1 * (start.max() - start.min())
    assert (a["model.heads.main.weight"].norm(dim=1) <= cap + 1e-5).all()


# --- MiSLAS ---------------------------------------------------------------------------------
def test_label_aware_smoothing_matches_the_rule(registry):
    counts = (500, 120, 30, 5)
    n1, nk = max(counts), min(counts)
    eps = [0.1 + (0.4 - 0.1) * math.sin((n - nk) * math.pi / (2 * (n1 - nk))) for n in counts]
    loss = build(registry, "loss", {"name": "mislas", "smooth_head": 0.4, "smooth_tail": 0.1},
                 counts=counts)
    assert torch.allclose(loss.eps.double(), torch.tensor(eps, dtype=torch.float64), atol=1e-6)
    logits = torch.tensor([[1.0, 0.5, -0.2, 0.0], [0.1, 2.0, 0.3, -1.0], [-1.0, 0.2, 0.4, 0.9]])
    y = torch.tensor([0, 2, 3])
    total = 0.0
    for z, t in zip(logits.tolist(), y.tolist(), strict=True):
        lse = math.log(sum(math.exp(v) for v in z))
        logp = [v - lse for v in z]
        total += (1 - eps[t]) * -logp[t] + eps[t] * -sum(logp) / len(logp)
    got = loss(ctx_for(logits, y, counts=counts))
    assert got.item() == pytest.approx(total / 3, abs=1e-6)
    linear = build(registry, "loss", {"name": "mislas", "smooth_head": 0.4, "smooth_tail": 0.1,
                                      "shape": "linear"}, counts=counts)
    want = [0.1 + 0.3 * (n - nk) / (n1 - nk) for n in counts]
    assert torch.allclose(linear.eps.double(), torch.tensor(want, dtype=torch.float64), atol=1e-6)


def test_mislas_without_smoothing_is_mixup_ce(registry):
    import torch.nn.functional as F

    x = torch.randn(4, 3, 2, 2)
    ctx = ctx_for(LOGITS, TARGETS, step=2, inputs_by_part={"labeled": x})
    build(registry, "transform", {"name": "mixup"}, seed=1)(ctx)
    perm, lam = ctx.extras["mixup"]["labeled"]
    got = build(registry, "loss", {"name": "mislas", "smooth_head": 0.0, "smooth_tail": 0.0})(ctx)
    want = lam * F.cross_entropy(LOGITS, TARGETS) + (1 - lam) * F.cross_entropy(LOGITS, TARGETS[perm])
    assert got.item() == pytest.approx(want.item(), abs=1e-6)


def test_scaled_linear_head_and_sgd_scaled_groups(registry):
    head = registry.build(registry.spec("head", {"name": "scaled_linear", "linear_lr_scale": 0.2}, "h"),
                          in_features=5, num_classes=3)
    x = torch.randn(2, 5)
    with torch.no_grad():
        head.scale.copy_(torch.tensor([1.0, 2.0, 0.5]))
    assert torch.allclose(head(x), head.fc(x) * torch.tensor([1.0, 2.0, 0.5]))
    opt = registry.build(registry.spec("optimizer", {"name": "sgd_scaled", "lr": 0.1}, "optim"),
                         params=list(head.parameters()))
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(head.fc.weight)] == lr_of[id(head.fc.bias)] == pytest.approx(0.02)
    assert lr_of[id(head.scale)] == pytest.approx(0.1)
    by_group = sorted((g["lr"], len(g["params"])) for g in opt.param_groups)
    assert by_group == [(pytest.approx(0.02), 2), (pytest.approx(0.1), 1)]  # fc weight+bias, scale


# --- RIDE -----------------------------------------------------------------------------------
def loop_ride(experts, y, counts, lam, s, max_m, temp_c, weights):
    """RIDELoss.forward, sample by sample: sum_k LDAM(z_k) + lam T_mean^2 KL(p_bar || q_k)."""
    k, b, c = len(experts), len(y), len(counts)
    mean = [[sum(experts[e][i][j] for e in range(k)) / k for j in range(c)] for i in range(b)]
    m = [n ** -0.25 for n in counts]
    m = [v * max_m / max(m) for v in m]
    t_mean = sum(temp_c) / c
    total = 0.0
    for e in range(k):
        num = den = 0.0
        for i in range(b):
            z = list(experts[e][i])
            z[y[i]] -= s * m[y[i]]
            lse = math.log(sum(math.exp(v) for v in z))
            w = 1.0 if weights is None else weights[y[i]]
            num += w * (lse - z[y[i]])
            den += w
        total += num / den
        kl = 0.0
        for i in range(b):
            pz = [math.exp(mean[i][j] / temp_c[j]) for j in range(c)]
            p = [v / sum(pz) for v in pz]
            qz = [experts[e][i][j] / temp_c[j] for j in range(c)]
            lq = [v - math.log(sum(math.exp(u) for u in qz)) for v in qz]
            kl += sum(p[j] * (math.log(p[j]) - lq[j]) for j in range(c))
        total += lam * t_mean * t_mean * kl / b
    return total


def test_experts_head_and_ride_loss_match_the_reference_rule(registry):
    torch.manual_seed(1)
    head = registry.build(registry.spec("head", {"name": "experts", "num_experts": 2}, "h"),
                          in_features=6, num_classes=3)
    feats = torch.randn(4, 6)
    experts = head.expert_logits(feats)
    for e in range(2):  # NormedLinear per expert on its chunk, times s = 30
        x = torch.nn.functional.normalize(feats[:, 3 * e:3 * e + 3], dim=1)
        w = torch.nn.functional.normalize(head.weight[e], dim=0)
        assert torch.allclose(experts[e], 30 * x @ w, atol=1e-5)
    assert torch.allclose(head(feats), experts.mean(0), atol=1e-6)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = torch.nn.ModuleDict({"main": head})

    y = torch.tensor([0, 1, 2, 0])
    ctx = ctx_for(head(feats), y, features={"labeled": feats}, model=M())
    spec = {"name": "ride", "diversity_factor": -0.45, "drw_epoch": 3}
    loss = build(registry, "loss", spec)
    ex = experts.detach().tolist()
    early = loop_ride(ex, y.tolist(), COUNTS, -0.45, 30.0, 0.5, [1.0] * 3, None)
    assert loss(ctx).item() == pytest.approx(early, rel=1e-5)
    pi = [n / sum(COUNTS) for n in COUNTS]
    tw = [3 * p * 0.05 + 0.95 for p in pi]
    tw = [v / max(tw) for v in tw]
    raw = [(1 - 0.9999) / (1 - 0.9999**n) for n in COUNTS]
    cbw = [r / sum(raw) * 3 for r in raw]
    late = loop_ride(ex, y.tolist(), COUNTS, -0.45, 30.0, 0.5, tw, cbw)
    ctx.epoch = 3
    assert loss(ctx).item() == pytest.approx(late, rel=1e-5)
    # the diversity term has a gradient for each expert (mean without gradient in the target)
    loss(ctx).backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_ride_refuses_bad_parameters(registry):
    with pytest.raises(RecipeError, match="divide"):
        registry.build(registry.spec("head", {"name": "experts", "num_experts": 4}, "h"),
                       in_features=6, num_classes=3)
    with pytest.raises(RecipeError, match="reweight_factor"):
        registry.spec("loss", {"name": "ride", "reweight_factor": 1.0}, "l")


def test_ride_preflight_refuses_expert_mismatch(tmp_path):
    over = {"model": {"backbone": "resnet32_experts", "backbone_args": {"num_experts": 2},
                      "heads": {"main": {"name": "experts", "num_experts": 1}}},
            "stage": [{"name": "train", "epochs": 1, "steps_per_epoch": 1, "loss": ["ride"]}]}
    with pytest.raises(RecipeError, match="num_experts = 1 but the backbone has 2"):
        start_run(tiny_recipe(tmp_path, **over))


# --- BBN ------------------------------------------------------------------------------------
def test_bilateral_sampler_pairs_and_reversed_class_rate(registry):
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    spec = registry.spec("sampler", "bilateral", "sampler")
    s = registry.build(spec, labels=labels, num_classes=3, seed=5)
    pos = s.epoch_indices(0)
    assert len(s) == pos.numel() == 200
    assert sorted(pos[0::2].tolist()) == list(range(100))  # one pass over the samples
    # class k ~ n_max / n_k: 1, 2, 6 -> 1/9, 2/9, 6/9 (the reference's sample_class_index_by_weight)
    want = torch.tensor([1.0, 2.0, 6.0]) / 9
    assert torch.allclose(s.class_probs.float(), want, atol=1e-6)
    draws = torch.cat([s.epoch_indices(e)[1::2] for e in range(30)])
    freq = torch.bincount(labels[draws], minlength=3).double() / draws.numel()
    assert torch.allclose(freq, want.double(), atol=0.03)
    assert torch.equal(pos, s.epoch_indices(0))  # a pure function of (seed, epoch)
    # DDP: every rank takes whole pairs, the ranks together the single-process pairs
    r0 = registry.build(spec, labels=labels, num_classes=3, seed=5, rank=0, world_size=2).epoch_indices(0)
    r1 = registry.build(spec, labels=labels, num_classes=3, seed=5, rank=1, world_size=2).epoch_indices(0)
    pairs = pos.view(-1, 2)
    assert torch.equal(r0.view(-1, 2), pairs[0::2]) and torch.equal(r1.view(-1, 2), pairs[1::2])


def test_bbn_alpha_and_loss_match_the_combiner(registry):
    from ltframe_ltbase.bbn import cumulative_alpha

    assert cumulative_alpha(0, 200) == 1.0
    assert cumulative_alpha(100, 200) == pytest.approx(1 - 0.25)
    assert cumulative_alpha(45, 90) == pytest.approx(1 - (45 / 100) ** 2)  # 90 -> 100
    torch.manual_seed(2)
    head = torch.nn.Linear(4, 3)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = torch.nn.ModuleDict({"main": head})

    feats = torch.randn(6, 4)  # rows 0, 2, 4 uniform; 1, 3, 5 re-balanced; columns [f_c | f_r]
    y = torch.tensor([0, 2, 1, 2, 0, 1])
    ctx = ctx_for(head(feats), y, epoch=50, features={"labeled": feats}, model=M(),
                  total_steps=200 * 7, steps_per_epoch=7)
    got = build(registry, "loss", "bbn")(ctx)
    a = 1 - (50 / 200) ** 2
    total = 0.0
    for i in range(3):
        u, r = feats[2 * i], feats[2 * i + 1]
        mixed = torch.cat([2 * a * u[:2], 2 * (1 - a) * r[2:]])
        z = (head.weight @ mixed + head.bias).tolist()
        lse = math.log(sum(math.exp(v) for v in z))
        total += a * (lse - z[y[2 * i]]) + (1 - a) * (lse - z[y[2 * i + 1]])
    assert got.item() == pytest.approx(total / 3, abs=1e-5)


def test_bbn_needs_its_sampler(tmp_path):
    over = {"model": {"backbone": "resnet32_two_branch"},
            "stage": [{"name": "train", "epochs": 1, "steps_per_epoch": 1, "loss": ["bbn"]}]}
    with pytest.raises(RecipeError, match="bilateral"):
        start_run(tiny_recipe(tmp_path, **over))


# --- no host <-> device sync inside a training step -------------------------------------------
PROBED = {  # name -> (model table, stages), tiny synthetic data
    "balanced_softmax": ({}, [{"loss": [{"name": "balanced_softmax", "reweight": "drw", "drw_epoch": 0}]}]),
    "causal_norm": ({"heads": {"main": {"name": "causal_norm"}}}, [{"loss": ["ce"]}]),
    "weight_balancing": ({}, [{"train": ["heads.main"], "frozen_bn": "update",
                               "loss": [{"name": "weight_balancing", "every": "step"}]}]),
    "mislas": ({"heads": {"main": {"name": "scaled_linear", "linear_lr_scale": 0.5}}},
               [{"transform": "mixup", "train": ["backbone", "heads.main.fc"],
                 "loss": [{"name": "mislas", "smooth_head": 0.0, "smooth_tail": 0.0}]},
                {"train": ["heads.main"], "frozen_bn": "update", "sampler": "class_aware",
                 "optim": {"name": "sgd_scaled", "lr": 0.05}, "loss": ["mislas"]}]),
    "ride": ({"backbone": "resnet32_experts", "backbone_args": {"num_experts": 2},
              "heads": {"main": {"name": "experts", "num_experts": 2}}},
             [{"loss": [{"name": "ride", "drw_epoch": 0}]}]),
    "bbn": ({"backbone": "resnet32_two_branch"}, [{"sampler": "bilateral", "loss": ["bbn"]}]),
    "lade": ({}, [{"loss": ["lade"]}]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PROBED))
def test_no_host_device_sync_in_a_step(name, tmp_path):
    from ltframe.probes import probe_steps

    model, stages = PROBED[name]
    stages = [{"name": f"s{i}", "epochs": 1, "steps_per_epoch": 3, **s} for i, s in enumerate(stages)]
    path = tiny_recipe(tmp_path, model=model, stage=stages, run={"log_every": 1000})
    res = probe_steps(path, out_dir=tmp_path / "runs", steps=3, stages=len(stages))
    assert res.steps > 0 and len(res.stages) == len(stages)
    syncs = res.syncs()
    assert not syncs, "\n".join(f"{r.kind} {r.op} {r.where}" for r in syncs)


# --- LADE -----------------------------------------------------------------------------------
def test_lade_is_prior_ce_plus_remine_regulariser(registry):
    alpha, lam = 0.1, 0.01
    n = sum(COUNTS)
    pi = [c / n for c in COUNTS]
    prior_ce = loop_ce(LOGITS, TARGETS, [math.log(p) for p in pi])
    z, y = LOGITS.tolist(), TARGETS.tolist()
    b, c = len(y), len(COUNTS)
    reg = 0.0
    for k in range(c):
        members = [z[i][k] for i in range(b) if y[i] == k]
        first = sum(members) / (len(members) + 1e-8)
        q = [z[i][k] - math.log(pi[k]) + math.log(1 / c) for i in range(b)]
        second = math.log(sum(math.exp(v) for v in q)) - math.log(b)
        reg -= pi[k] * (first - second - lam * second**2)
    got = build(registry, "loss", {"name": "lade", "alpha": alpha, "remine_lambda": lam})
    assert got(ctx_for(LOGITS, TARGETS)).item() == pytest.approx(prior_ce + alpha * reg, abs=1e-5)
    plain = build(registry, "loss", {"name": "lade", "alpha": 0.0})
    assert plain(ctx_for(LOGITS, TARGETS)).item() == pytest.approx(prior_ce, abs=1e-6)
