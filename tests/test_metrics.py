"""Known-value tests for metrics and lr schedules."""

import math

import pytest
import torch

from ltframe.eval.metrics import classification_metrics, pseudo_label_metrics


def test_classification_metrics_known_values():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 1, 0, 0, 0])  # recalls: 100, 50, 0
    logits = torch.nn.functional.one_hot(pred, 3).float()
    m = classification_metrics(logits, labels, torch.tensor([500, 50, 5]))
    assert m["top1"] == pytest.approx(50.0) and m["balanced_acc"] == pytest.approx(50.0)
    assert m["per_class"] == [100.0, 50.0, 0.0]
    assert (m["many"], m["medium"], m["few"]) == (100.0, 50.0, 0.0)
    assert "top5" not in m
    m = classification_metrics(logits, labels, torch.tensor([500, 400, 300]))
    assert m["medium"] is None and m["few"] is None  # no class in the group
    m = classification_metrics(logits, labels, torch.tensor([500, 50, 5]), many=40, few=10)
    assert m["many"] == pytest.approx(75.0) and m["medium"] is None


def test_top5_for_100_classes():
    labels = torch.arange(100)
    logits = torch.zeros(100, 100)
    logits[torch.arange(100), (labels + 1) % 100] = 2.0  # top-1 wrong
    logits[torch.arange(100), labels] = 1.0  # second best: in the top 5
    m = classification_metrics(logits, labels, torch.full((100,), 50))
    assert m["top1"] == 0.0 and m["top5"] == 100.0


def test_pseudo_label_precision_recall():
    conf = torch.tensor([[3.0, 1.0], [0.0, 2.0]])  # rows: true, cols: pseudo
    m = pseudo_label_metrics(conf)
    assert m["pl_count"] == 6 and m["pl_accuracy"] == pytest.approx(500 / 6)
    assert m["pl_precision"] == [100.0, pytest.approx(200 / 3, abs=1e-3)]
    assert m["pl_recall"] == [75.0, 100.0]
    assert m["pl_predicted"] == [3, 3]


def test_lr_schedules_known_values(registry):
    def f(name, **p):
        return registry.build(registry.spec("lr_schedule", {"name": name, **p}, "s"),
                              steps_per_epoch=10, total_steps=2000)

    step = f("step", milestones=[160, 180], gamma=0.01, warmup_epochs=5)
    assert step(0) == pytest.approx(1 / 50) and step(49) == 1.0
    assert step(1599) == 1.0 and step(1600) == pytest.approx(0.01)
    assert step(1800) == pytest.approx(1e-4)
    cos = f("cosine")
    assert cos(0) == 1.0 and cos(1000) == pytest.approx(0.5) and cos(1999) < 1e-5
    fm = f("cosine", form="truncated")
    assert fm(1000) == pytest.approx(math.cos(7 * math.pi / 32))


def test_posthoc_logit_adjustment_flips_towards_the_tail():
    from ltframe.eval.evaluate import evaluate_logits

    logits = torch.tensor([[1.0, 0.5]])  # head class wins by 0.5
    labels = torch.tensor([1])
    counts = torch.tensor([90, 10])
    assert evaluate_logits(logits, labels, counts, 100, 20)["top1"] == 0.0
    # log(0.9) - log(0.1) = 2.2 > 0.5: after adjustment the tail class wins
    assert evaluate_logits(logits, labels, counts, 100, 20, posthoc_tau=1.0)["top1"] == 100.0
