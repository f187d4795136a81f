"""BMB (paper 002): the memory's admission, removal and draw probabilities equal the formulas,
the memory rebalances an imbalanced stream, and the loss state survives a round trip."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ltframe import resume_run, start_run
from ltframe.engine.context import StepContext
from ltframe.errors import LtframeError
from ltframe.plugins import make_plugin_manager
from ltframe.testing import StopAt, tiny_recipe
from ltframe_bmb.loss import adaptive_weights
from ltframe_bmb.memory import BalancedMemory, admission_prob


def _memory(labels, dim=2, classes=3):
    m = BalancedMemory(len(labels), dim, classes)
    m.labels = torch.tensor(labels)
    m.feats = torch.arange(len(labels) * dim, dtype=torch.float32).view(len(labels), dim)
    return m


def test_admission_probability_is_the_formula():
    counts = torch.tensor([4.0, 2.0, 1.0])
    got = admission_prob(torch.tensor([0, 1, 2, 0]), counts, 2.0)
    assert torch.allclose(got, torch.tensor([(1 / 4) ** 2, (1 / 2) ** 2, 1.0, (1 / 4) ** 2]))
    # an absent class counts 1e-3: it is always admitted, present classes almost never
    got = admission_prob(torch.tensor([0, 2]), torch.tensor([5.0, 0.0, 1.0]), 1.0)
    assert torch.allclose(got, torch.tensor([1e-3 / 5, 1e-3 / 1]))


def test_overflow_removal_follows_one_minus_p_in():
    # full memory [0, 0, 0, 1, 1] + one admitted item of class 2 (absent, p_in = 1): one item
    # leaves; counts after admission [3, 2, 1] -> removal weights 1 - p_in = [2/3, 1/2, 0]
    trials, removed = 3000, torch.zeros(3)
    for t in range(trials):
        m = _memory([0, 0, 0, 1, 1])
        admitted = m.enqueue(torch.full((1, 2), -1.0), torch.tensor([2]), torch.tensor([True]),
                             1.0, torch.Generator().manual_seed(t))
        assert admitted.all() and (m.labels == 2).sum() == 1
        removed += torch.tensor([3.0, 2.0, 1.0]) - m.counts()
    freq = removed / trials
    assert abs(freq[0] - 2 / 3) < 0.03 and abs(freq[1] - 1 / 3) < 0.03 and freq[2] == 0


def test_get_draws_in_proportion_to_inverse_estimate():
    m = _memory([0, 0, 1, 2])  # draw 1 item: weights (1 / N^_c)^beta_get per item
    est, beta = torch.tensor([8.0, 2.0, 1.0]), 1.5
    w = est.reciprocal().pow(beta)[m.labels]
    want = w / w.sum()
    hits = torch.zeros(4)
    for t in range(4000):
        feats, labels, valid = m.get(1, est, beta, torch.Generator().manual_seed(t))
        hits[int(feats[0, 0]) // 2] += 1
        assert valid.all() and labels[0] == m.labels[int(feats[0, 0]) // 2]
    assert torch.allclose(hits / 4000, want, atol=0.025)
    # fewer stored items than m: the extra draws are marked invalid, no item twice
    half = _memory([0, -1, 1, -1])
    feats, labels, valid = half.get(4, est, beta, torch.Generator().manual_seed(0))
    assert valid.sum() == 2 and set(labels[valid].tolist()) == {0, 1}


def test_memory_histogram_moves_toward_uniform_on_an_imbalanced_stream():
    probs = torch.tensor([0.55, 0.25, 0.12, 0.06, 0.02])  # ratio 27.5

    def run(beta_in):
        g = torch.Generator().manual_seed(0)
        m = BalancedMemory(100, 4, 5)
        for _ in range(300):
            labels = torch.multinomial(probs, 32, replacement=True, generator=g)
            m.enqueue(torch.randn(32, 4, generator=g), labels, torch.ones(32, dtype=torch.bool),
                      beta_in, g)
        return m.counts()

    random_fill, balanced = run(0.0), run(2.0)
    assert random_fill.sum() == balanced.sum() == 100
    assert random_fill.max() / random_fill.min().clamp_min(1) > 8  # follows the stream
    assert balanced.max() / balanced.min() < 2.5  # rebalanced (Fig. 6's behaviour)


def test_adaptive_weights():
    assert torch.allclose(adaptive_weights(torch.tensor([100.0, 10.0, 1.0]), 1.5),
                          torch.tensor([0.01 ** 1.5, 0.1 ** 1.5, 1.0]))


def _registry():
    return make_plugin_manager()[1]


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(6, 4)
        self.heads = torch.nn.ModuleDict({"main": torch.nn.Linear(4, 3), "aux": torch.nn.Linear(4, 3)})


def _ctx(model, step, g):
    xl, xw = torch.randn(8, 6, generator=g), torch.randn(16, 6, generator=g)
    xs = xw + 0.1 * torch.randn(16, 6, generator=g)
    feats = {"labeled": model.body(xl), "unlabeled": model.body(xw), "unlabeled:strong": model.body(xs)}
    logits = {k: {h: 5 * model.heads[h](f) for h in ("main", "aux")} for k, f in feats.items()}
    return StepContext(step=step, epoch=0, num_classes=3, class_counts=torch.tensor([20, 5, 1]),
                       targets=torch.randint(0, 3, (8,), generator=g), features_by_part=feats,
                       logits_by_part=logits, model=model)


def test_loss_terms_and_state_round_trip_bit_exact():
    reg = _registry()

    def build(**kw):
        spec = reg.spec("loss", {"name": "bmb", "threshold": 0.5, "size": 8, "get": 4, **kw}, "loss")
        return reg.build(spec, num_classes=3, class_counts=torch.tensor([20, 5, 1]), seed=3)

    model = _Model()
    a = build()
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        a(_ctx(model, step, g))
    assert a.memory is not None and (a.memory.labels >= 0).any() and a.estimate.sum() > 0
    b = build()
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()})
    ga, gb = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for step in range(5, 8):
        assert torch.equal(a(_ctx(model, step, ga)), b(_ctx(model, step, gb)))
    assert torch.equal(a.memory.feats, b.memory.feats) and torch.equal(a.estimate, b.estimate)
    # warm-up: only the weighted labeled CE of the auxiliary head
    w = build(warmup=100)
    ctx = _ctx(model, 0, torch.Generator().manual_seed(2))
    want = (adaptive_weights(torch.tensor([20.0, 5.0, 1.0]), 1.5)[ctx.targets]
            * F.cross_entropy(ctx.logits("labeled", "aux"), ctx.targets, reduction="none")).mean()
    assert torch.allclose(w(ctx), want) and w.memory is None


@pytest.mark.slow
def test_memory_and_estimate_survive_resume(tmp_path):
    stage = {"name": "bmb", "epochs": 3, "steps_per_epoch": 2, "data": "labeled+unlabeled",
             "ema": 0.9, "views": {"unlabeled": ["weak", "strong"]},
             "pseudo_labeler": {"name": "threshold", "threshold": 0.0},
             "loss": ["ce", "fixmatch", {"name": "bmb", "threshold": 0.0, "size": 8, "get": 4}]}
    over = {"run": {"log_every": 1}, "data": {"split": {"name": "fraction", "labeled_fraction": 0.3}},
            "model": {"heads": {"main": {"name": "linear"}, "aux": {"name": "linear"}},
                      "eval_head": "aux"},
            "stage": [stage]}
    full = start_run(tiny_recipe(tmp_path / "a", **over))
    with pytest.raises(LtframeError, match="interrupted"):
        start_run(tiny_recipe(tmp_path / "b", **over), plugins=[("stop", StopAt(5, 0))])
    resumed = resume_run(next((tmp_path / "b" / "runs").iterdir()))

    def lines(run_dir):
        rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows
                if r["event"] in ("train", "eval")]

    assert lines(full["run_dir"]) == lines(resumed["run_dir"])
    assert any(r["loss"].get("bmb") for r in lines(full["run_dir"]) if r["event"] == "train")

    def memory(run_dir):
        ckpt = Path(run_dir) / "checkpoints"
        state = load_file(ckpt / f"{(ckpt / 'latest').read_text().strip()}.safetensors")
        return {k: v for k, v in state.items() if "memory" in k or "estimate" in k}

    a, b = memory(full["run_dir"]), memory(resumed["run_dir"])
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
