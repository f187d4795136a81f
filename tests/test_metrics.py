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


def test_groups_by_rank_and_by_count():
    from ltframe.eval.metrics import group_classes

    counts = torch.tensor([500, 300, 180, 108, 65, 39, 24, 14, 9, 5])
    assert group_classes(counts, 100, 20, "rank", [3, 3]) == {
        "many": [0, 1, 2], "medium": [3, 4, 5], "few": [6, 7, 8, 9]}
    assert group_classes(counts, 100, 20) == {
        "many": [0, 1, 2, 3], "medium": [4, 5, 6], "few": [7, 8, 9]}
    shuffled = counts[torch.tensor([9, 0, 5, 1, 2, 3, 4, 6, 7, 8])]
    assert group_classes(shuffled, 100, 20, "rank", [3, 3])["many"] == [1, 3, 4]
    logits = torch.eye(10)[torch.arange(10).repeat(2)] * 5
    labels = torch.arange(10).repeat(2)
    logits[labels >= 6] = 0.0  # the last four classes are all wrong (predicted class 0)
    logits[labels >= 6, 0] = 1.0
    m = classification_metrics(logits, labels, counts, by="rank", rank_sizes=[3, 3])
    assert m["many"] == 100.0 and m["medium"] == 100.0 and m["few"] == 0.0


def test_rank_groups_in_a_run_summary(tmp_path):
    from ltframe import start_run
    from ltframe.testing import tiny_recipe

    s = start_run(tiny_recipe(tmp_path, eval={"groups": "rank", "rank_sizes": [1, 2]},
                              stage=[{"name": "t", "epochs": 1, "steps_per_epoch": 1}]))
    assert s["grouping"]["by"] == "rank" and s["grouping"]["classes"]["many"] == [0]
    assert s["grouping"]["classes"]["few"] == [3]


def test_bad_rank_sizes(tmp_path):
    from ltframe import start_run
    from ltframe.errors import RecipeError
    from ltframe.testing import tiny_recipe

    with pytest.raises(RecipeError, match="eval.rank_sizes"):
        start_run(tiny_recipe(tmp_path, eval={"groups": "rank", "rank_sizes": [3]}))
