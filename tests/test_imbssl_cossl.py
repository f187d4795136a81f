"""CoSSL (`cossl` pseudo-labeler, plugins/ltframe_imbssl/cossl.py) against rules written here
from the authors' YUE-FAN/CoSSL code: TFE's synthetic features (utils/tfe_init.py TFE), the
online mixing of train_cifar_fix_cossl.py, the teacher step and its EMA, pseudo-labels from the
teacher before its update, the copies into the model's and the EMA model's head, state
restored bit for bit, bounds and recipe checks."""

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ltframe import resume_run, start_run
from ltframe.engine import checkpoint as ckpt
from ltframe.engine.context import StepContext
from ltframe.engine.forward import forward_no_grad
from ltframe.errors import LtframeError, RecipeError
from ltframe.models import LTModel
from ltframe.plugins import make_plugin_manager
from ltframe.testing import StopAt, tiny_recipe
from ltframe_imbssl.cossl import (
    CosslLabeler,
    CosslParams,
    imprint_weights,
    mix_features,
    mix_probability,
    tfe_synthesize,
    train_head,
)

_, REGISTRY = make_plugin_manager()


# --- the rules on fixed inputs ----------------------------------------------------------------
def test_mix_probability_is_the_missing_share_of_the_largest_class():
    counts = torch.tensor([50, 10, 1, 0])
    ref = [(max(counts.tolist()) - n) / max(counts.tolist()) for n in counts.tolist()]
    assert torch.allclose(mix_probability(counts), torch.tensor(ref))
    assert mix_probability(counts).tolist()[0] == 0.0


def _mix_loop(fx, fu, y, counts, u_mix, u_lam, max_lam):
    """train_cifar_fix_cossl.py: `if random.random() < tfe_prob[label]: lam ~ U(max_lam, 1)`."""
    tfe_prob = [(max(counts) - n) / max(counts) for n in counts]
    rows, mixed = [], []
    for i in range(fx.shape[0]):
        if float(u_mix[i]) < tfe_prob[int(y[i])]:
            lam = max_lam + (1 - max_lam) * float(u_lam[i])
            rows.append(lam * fx[i] + (1 - lam) * fu[i])
            mixed.append(i)
        else:
            rows.append(fx[i])
    return torch.stack(rows), mixed


def test_online_mixing_matches_the_reference_loop():
    g = torch.Generator().manual_seed(0)
    fx, fu = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    y = torch.tensor([0, 1, 2, 3, 1, 2])
    counts = [50, 10, 1, 0]  # mixing probability 0, 0.8, 0.98, 1
    u_mix = torch.tensor([0.5, 0.5, 0.97, 0.99, 0.9, 0.99])
    u_lam = torch.rand(6, generator=g)
    prob = mix_probability(torch.tensor(counts))
    out = mix_features(fx, fu, prob[y], u_mix, u_lam, 0.6)
    ref, mixed = _mix_loop(fx, fu, y, counts, u_mix, u_lam, 0.6)
    assert mixed == [1, 2, 3]
    assert torch.allclose(out, ref, atol=1e-6)
    assert torch.equal(out[[0, 4, 5]], fx[[0, 4, 5]])
    # USB's rule: the probability of class 0 (0 here) for every sample: nothing mixes
    usb = mix_features(fx, fu, prob[0].expand(6), u_mix, u_lam, 0.6)
    assert torch.equal(usb, fx)


def test_imprinted_weights_are_normalised_class_means():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(7, 3, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 1, 0, 1])
    w = imprint_weights(feats, labels, 3)
    for c in range(2):
        m = feats[labels == c].mean(0)
        assert torch.allclose(w[c], m / m.norm(), atol=1e-6)
    assert torch.equal(w[2], torch.zeros(3))  # a class without labeled images


def _tfe_loop(feats_l, labels_l, probs_l, feats_u, probs_u, counts, seed, beta):
    """utils/tfe_init.py TFE, written out: per class c < n_max, anchors of class c, partners
    = other classes' labeled features (grouped by class) + unlabeled ones, ranked by p_c."""
    rng = np.random.default_rng(seed)
    labels = labels_l.numpy()
    per_cls = [np.where(labels == c)[0] for c in range(len(counts))]
    feats, targets = list(feats_l), labels.tolist()
    for c, n_c in enumerate(counts):
        if n_c >= max(counts):
            continue
        m = max(counts) - n_c
        cur = feats_l[torch.as_tensor(per_cls[c])]
        other = np.concatenate(per_cls[:c] + per_cls[c + 1:])
        other_f = torch.cat([feats_l[torch.as_tensor(other)], feats_u])
        other_p = torch.cat([probs_l[torch.as_tensor(other)], probs_u])[:, c].tolist()
        order = sorted(range(len(other_p)), key=lambda i: -other_p[i])  # stable
        a = rng.integers(0, len(cur), size=m)
        lam = rng.beta(beta, beta, size=m)
        for k in range(m):
            feats.append(float(lam[k]) * cur[a[k]] + (1 - float(lam[k])) * other_f[order[k]])
            targets.append(c)
    return torch.stack(feats), torch.tensor(targets)


def test_tfe_synthetic_features_match_the_reference_loop():
    g = torch.Generator().manual_seed(2)
    labels = torch.tensor([0, 0, 1, 0, 1, 2, 0])  # counts 4, 2, 1
    feats_l, feats_u = torch.randn(7, 4, generator=g), torch.randn(5, 4, generator=g)
    probs_l = torch.randn(7, 3, generator=g).softmax(1)
    probs_u = torch.randn(5, 3, generator=g).softmax(1)
    probs_u[1] = probs_u[3]  # a tie in the ranking keeps the reference order
    counts = [4, 2, 1]
    feats, targets = tfe_synthesize(feats_l, labels, probs_l, feats_u, probs_u, counts,
                                    np.random.default_rng(5), 0.75)
    ref_f, ref_t = _tfe_loop(feats_l, labels, probs_l, feats_u, probs_u, counts, 5, 0.75)
    assert torch.equal(targets, ref_t)
    assert torch.allclose(feats, ref_f, atol=1e-6)
    assert torch.bincount(targets).tolist() == [4, 4, 4]  # balanced at n_max
    assert torch.equal(feats[:7], feats_l)


def test_warm_up_head_learns_and_repeats_with_its_generator():
    g = torch.Generator().manual_seed(3)
    y = torch.arange(40) % 2
    feats = torch.randn(40, 6, generator=g) * 0.3 + (2 * y[:, None] - 1).float()
    runs = [train_head(feats, y, 2, 2, 15, 8, 0.05, 5e-4, 0.9, torch.Generator().manual_seed(0))
            for _ in range(2)]
    (head, ema), (head2, ema2) = runs
    assert all(torch.equal(a, b) for a, b in zip(head + ema, head2 + ema2, strict=True))
    assert (F.linear(feats, *head).argmax(1) == y).float().mean() > 0.9
    assert not torch.equal(head[0], ema[0])


# --- the labeler, set up on a hand-made stage ---------------------------------------------
C, D = 4, 6


class _Store:
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return self.images.shape[0]

    def get(self, idx, idx_device=None):
        return self.images[idx]


class _Backbone(torch.nn.Module):
    num_features = D

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 4 * 4, D)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _model():
    torch.manual_seed(0)
    return LTModel(_Backbone(), {"main": torch.nn.Linear(D, C), "tfe": torch.nn.Linear(D, C)})


def _stage_and_run(params: CosslParams):
    g = torch.Generator().manual_seed(4)
    n = 40
    images = torch.randint(0, 256, (n, 3, 4, 4), generator=g, dtype=torch.uint8)
    labeled = torch.arange(15)
    labels = torch.tensor([0] * 8 + [1] * 4 + [2] * 2 + [3])
    data = SimpleNamespace(train=_Store(images), source=SimpleNamespace(mean=(0.5,) * 3, std=(0.25,) * 3),
                           splits=SimpleNamespace(labeled=labeled, unlabeled=torch.arange(15, n)),
                           labeled_labels=labels)
    recipe = SimpleNamespace(run=SimpleNamespace(precision="fp32", channels_last=False),
                             data=SimpleNamespace(batch_size=4), eval=SimpleNamespace(batch_size=16))
    run = SimpleNamespace(data=data, registry=REGISTRY, device=torch.device("cpu"), recipe=recipe,
                          smoke=False, model=_model())
    none = REGISTRY.spec("view", "none", "v")
    cfg = SimpleNamespace(views=SimpleNamespace(labeled=[none], unlabeled=[none]), batch_size=0)
    counts = torch.bincount(labels, minlength=C)
    lab = CosslLabeler(params, num_classes=C, class_counts=counts, labeled_counts=counts, seed=7,
                       unlabeled_index=torch.arange(15, n))
    return lab, run, SimpleNamespace(cfg=cfg, index=0), labels


def _ctx(run, teacher):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, 4, 4, generator=g)
    feats, logits = run.model(x)
    parts = {"unlabeled": x, "unlabeled:none": x}
    return StepContext(step=0, epoch=0, num_classes=C, class_counts=torch.tensor([8, 4, 2, 1]),
                       targets=None, features_by_part={p: feats for p in parts},
                       logits_by_part={p: logits for p in parts}, model=run.model,
                       steps_per_epoch=2, inputs_by_part=parts, teacher_model=teacher,
                       _teacher=lambda part: forward_no_grad(teacher, parts[part], False, False),
                       _teacher_on=lambda xb: forward_no_grad(teacher, xb, False, False))


def _teacher(run):
    teacher = copy.deepcopy(run.model).eval().requires_grad_(False)
    with torch.no_grad():
        teacher.backbone.fc.weight.add_(0.1)
    return teacher


def test_teacher_labels_then_one_step_of_the_reference_update():
    p = CosslParams(threshold=0.3, view="none", weak_view="none", warm_epochs=0, lr=0.01, ema=0.9)
    lab, run, stage, labels = _stage_and_run(p)
    lab.ltframe_stage_start(run, stage)
    teacher = _teacher(run)
    ctx = _ctx(run, teacher)
    w0 = [t.detach().clone() for t in lab.head]
    e0 = [t.clone() for t in lab.ema_head]
    streams, gen = copy.deepcopy(lab.streams), torch.Generator().set_state(lab.gen.get_state())

    out = lab(ctx)

    # pseudo-labels: the teacher as it was before its update, on the EMA features of the weak view
    probs = F.linear(forward_no_grad(teacher, ctx.inputs("unlabeled"), False, False)[0], *w0).softmax(1)
    assert torch.equal(out.targets, probs.argmax(1))
    assert torch.equal(out.mask, (probs.max(1).values >= 0.3).float())
    # the update, written out: class-balanced labeled batch + partners, EMA features, mixing
    ix, iu = streams["x"].next(), streams["u"].next()
    assert ix.numel() == iu.numel() == 4 and bool((ix < 15).all())
    view = REGISTRY.build(REGISTRY.spec("view", "none", "v"), mean=(0.5,) * 3, std=(0.25,) * 3)
    f = forward_no_grad(teacher, view(run.data.train.images[torch.cat([ix, iu])]), False, False)[0]
    u = torch.rand(2, 4, generator=gen)
    y = labels[ix]
    mixed, _ = _mix_loop(f[:4], f[4:], y, [8, 4, 2, 1], u[0], u[1], 0.6)
    head = [t.clone().requires_grad_() for t in w0]
    opt = torch.optim.Adam([{"params": [head[0]], "weight_decay": 5e-4},
                            {"params": [head[1]], "weight_decay": 0.0}], lr=0.01)
    loss = -(F.one_hot(y, C) * F.log_softmax(F.linear(mixed, *head), 1)).sum(1).mean()
    loss.backward()
    opt.step()
    assert torch.allclose(lab.head[0], head[0], atol=1e-6)
    assert torch.allclose(lab.head[1], head[1], atol=1e-6)
    for e, h, new in zip(e0, head, lab.ema_head, strict=True):
        assert torch.allclose(new, 0.9 * e + 0.1 * h.detach(), atol=1e-6)
    assert torch.allclose(ctx.extras["cossl"]["teacher_loss"], loss.detach(), atol=1e-6)
    # after the step: the teacher in the model's head, the EMA teacher in the EMA model's head
    lab.ltframe_step_end(run, stage, 0, ctx)
    assert torch.equal(run.model.heads["tfe"].weight, lab.head[0].detach())
    assert torch.equal(teacher.heads["tfe"].bias, lab.ema_head[1])


def test_usb_labels_come_from_the_student_head():
    p = CosslParams(threshold=0.0, labels="usb", view="none", weak_view="none", warm_epochs=0)
    lab, run, stage, _ = _stage_and_run(p)
    lab.ltframe_stage_start(run, stage)
    ctx = _ctx(run, _teacher(run))
    out = lab(ctx)
    assert torch.equal(out.targets, ctx.logits("unlabeled", "main").argmax(1))


def test_class_balanced_teacher_batches():
    p = CosslParams(view="none", weak_view="none", warm_epochs=0, batch_size=16)
    lab, run, stage, labels = _stage_and_run(p)
    lab.ltframe_stage_start(run, stage)
    drawn = torch.cat([labels[lab.streams["x"].next()] for _ in range(200)])
    freq = torch.bincount(drawn, minlength=C).float() / drawn.numel()
    assert torch.allclose(freq, torch.full((C,), 0.25), atol=0.03)  # counts are 8, 4, 2, 1


def _json_round_trip(state):
    tensors = {}
    tree = json.loads(json.dumps(ckpt.flatten_state(state, "component", tensors)))
    return ckpt.unflatten_state(tree, {k: v.clone() for k, v in tensors.items()})


def test_state_restored_bit_exact():
    p = CosslParams(view="none", weak_view="none", warm_epochs=1, warm_iters=3, warm_batch=4)
    lab, run, stage, _ = _stage_and_run(p)
    lab.ltframe_stage_start(run, stage)  # with the warm-up
    teacher = _teacher(run)
    lab(_ctx(run, teacher))
    fresh, _, _, _ = _stage_and_run(p)
    fresh.load_state_dict(_json_round_trip(lab.state_dict()))
    fresh.ltframe_stage_start(run, stage)  # resumed: no second warm-up
    for _ in range(2):
        a, b = lab(_ctx(run, teacher)), fresh(_ctx(run, teacher))
        assert torch.equal(a.targets, b.targets) and torch.equal(a.mask, b.mask)
    sa, sb = lab.state_dict(), fresh.state_dict()
    assert sa["warmed"] and sb["warmed"] and sa["streams"] == sb["streams"]
    for key in ("head", "ema_head"):
        assert all(torch.equal(sa[key][k], sb[key][k]) for k in ("weight", "bias"))
    assert torch.equal(sa["gen"], sb["gen"])
    for k, v in sa["optim"]["state"]["0"].items():
        assert torch.equal(v, sb["optim"]["state"]["0"][k])


@pytest.mark.parametrize("field,value", [("max_lam", 1.5), ("threshold", -0.1), ("lr", 0.0),
                                         ("warm_iters", 0), ("ema", 1.0), ("labels", "student"),
                                         ("mix", "never"), ("beta", 0.0)])
def test_bad_parameters_refused(field, value):
    with pytest.raises(RecipeError, match=field):
        REGISTRY.spec("pseudo_labeler", {"name": "cossl", field: value}, "stage[0].pseudo_labeler")


def _cossl_stage(**over):
    stage = {"name": "cossl", "epochs": 3, "steps_per_epoch": 2, "data": "labeled+unlabeled",
             "ema": 0.9, "train": ["backbone", "heads.main"], "eval_head": "tfe",
             "views": {"unlabeled": ["weak", "strong"]},
             "pseudo_labeler": {"name": "cossl", "threshold": 0.3, "warm_epochs": 1,
                                "warm_iters": 3, "warm_batch": 8},
             "loss": ["ce", "fixmatch"]}
    return {**stage, **over}


def _over(**stage):
    return {"run": {"log_every": 1},
            "data": {"split": {"name": "fraction", "labeled_fraction": 0.3}},
            "model": {"heads": {"main": {"name": "linear"}, "tfe": {"name": "linear"}}},
            "stage": [_cossl_stage(**stage)]}


@pytest.mark.parametrize("stage,match", [({"train": ["backbone", "heads"]}, "leave it out"),
                                         ({"ema": 0.0}, "ema"),
                                         ({"pseudo_labeler": {"name": "cossl", "view": "solarize"}},
                                          "solarize")])
def test_recipe_checks(tmp_path, stage, match):
    with pytest.raises(LtframeError, match=match):
        start_run(tiny_recipe(tmp_path, **_over(**stage)))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def _lines(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows
            if r["event"] in ("train", "eval")]


def _latest(run_dir):
    d = Path(run_dir) / "checkpoints"
    return load_file(d / f"{(d / 'latest').read_text().strip()}.safetensors")


@pytest.mark.slow
def test_resume_is_bit_exact_and_the_ema_teacher_is_evaluated(tmp_path):
    full = start_run(tiny_recipe(tmp_path / "a", **_over()))
    with pytest.raises(LtframeError, match="interrupted"):
        start_run(tiny_recipe(tmp_path / "b", **_over()), plugins=[("stop", StopAt(3, 0))])
    resumed = resume_run(next((tmp_path / "b" / "runs").iterdir()))
    assert _lines(full["run_dir"]) == _lines(resumed["run_dir"])
    a, b = _latest(full["run_dir"]), _latest(resumed["run_dir"])
    comp = [k for k in a if k.startswith("component")]
    assert comp and all(torch.equal(a[k], b[k]) for k in comp)
    # the stage-end checkpoint: model = EMA model, whose tfe head is the EMA teacher
    assert torch.equal(a["model.heads.tfe.weight"], a["component.pseudo_labeler.ema_head.weight"])
