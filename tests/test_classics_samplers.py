"""Sampler distributions (class frequencies) and structure."""

import pytest
import torch

LABELS = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)


def build(registry, table, epoch=0, labels=LABELS):
    s = registry.build(registry.spec("sampler", table, "s"), labels=labels, num_classes=3,
                       seed=0, rank=0, world_size=1)
    return s, labels[s.epoch_indices(epoch)]


def freq(y):
    return torch.bincount(y, minlength=3).double() / y.numel()


def test_random_is_a_permutation(registry):
    s, y = build(registry, "random")
    assert torch.equal(torch.sort(s.epoch_indices(0)).values, torch.arange(1000))


def test_class_balanced_and_deferred(registry):
    _, y = build(registry, "class_balanced")
    assert torch.allclose(freq(y), torch.full((3,), 1 / 3, dtype=torch.double), atol=0.05)
    s, y0 = build(registry, {"name": "class_balanced", "start_epoch": 2}, epoch=1)
    assert torch.equal(torch.sort(s.epoch_indices(1)).values, torch.arange(1000))  # DRS: before
    y2 = LABELS[s.epoch_indices(2)]
    assert freq(y2)[2] > 0.25  # after the switch: balanced


def test_sqrt_sampler(registry):
    _, y = build(registry, "sqrt")
    q = torch.tensor([900, 90, 10], dtype=torch.double).sqrt()
    assert torch.allclose(freq(y), q / q.sum(), atol=0.04)


def test_progressive_moves_from_instance_to_class_balanced(registry):
    _, y0 = build(registry, {"name": "progressive", "epochs": 10}, epoch=0)
    _, y10 = build(registry, {"name": "progressive", "epochs": 10}, epoch=10)
    assert torch.allclose(freq(y0), torch.tensor([0.9, 0.09, 0.01], dtype=torch.double), atol=0.03)
    assert torch.allclose(freq(y10), torch.full((3,), 1 / 3, dtype=torch.double), atol=0.05)


def test_class_aware_groups_k_per_class(registry):
    s, y = build(registry, {"name": "class_aware", "per_class": 4})
    groups = y.view(-1, 4)
    assert (groups == groups[:, :1]).all()  # each group of 4 shares a class
    first = groups[:3, 0].tolist()
    assert sorted(first) == [0, 1, 2]  # one shuffled round visits every class once


@pytest.mark.parametrize("name", ["class_balanced", "class_aware", "sqrt", "progressive"])
def test_label_needing_samplers_refuse_unlabeled_data(registry, name):
    from ltframe.errors import DataError

    with pytest.raises(DataError, match="needs labels"):
        build(registry, name, labels=torch.full((10,), -1))
