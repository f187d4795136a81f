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


def _effective_number_class_probs(counts, beta):
    # the 'Resample' rule of kaidic/LDAM-DRW and YyzHarry/imbalanced-semi-self (utils.py,
    # ImbalancedDatasetSampler): sample weight (1 - beta) / (1 - beta^n_c), so class mass n_c * w_c
    mass = [n * (1 - beta) / (1 - beta**n) if beta > 0 else n for n in counts]
    return torch.tensor([m / sum(mass) for m in mass], dtype=torch.double)


def test_class_balanced_effective_number_weighting(registry):
    table = {"name": "class_balanced", "weighting": "effective_number", "beta": 0.999,
             "num_samples": 40000}
    s, y = build(registry, table)
    expected = _effective_number_class_probs((900, 90, 10), 0.999)  # ~ [0.43, 0.29, 0.28]
    q = s.class_probs(0)
    assert torch.allclose(q / q.sum(), expected, atol=1e-9)
    assert torch.allclose(freq(y), expected, atol=0.01)
    assert len(s) == 40000
    _, y0 = build(registry, {**table, "beta": 0.0})  # beta 0: instance sampling
    assert torch.allclose(freq(y0), torch.tensor([0.9, 0.09, 0.01], dtype=torch.double),
                          atol=0.01)
    _, yu = build(registry, {"name": "class_balanced", "num_samples": 40000})  # default: uniform
    assert torch.allclose(freq(yu), torch.full((3,), 1 / 3, dtype=torch.double), atol=0.01)


def test_drs_with_effective_number_weights_defers_to_start_epoch(registry):
    table = {"name": "class_balanced", "weighting": "effective_number", "start_epoch": 160}
    s, _ = build(registry, table)
    assert torch.equal(torch.sort(s.epoch_indices(159)).values, torch.arange(1000))
    y = torch.cat([LABELS[s.epoch_indices(e)] for e in range(160, 180)])
    assert torch.allclose(freq(y), _effective_number_class_probs((900, 90, 10), 0.9999),
                          atol=0.015)


@pytest.mark.parametrize("table", [
    {"name": "class_balanced", "beta": 1.0}, {"name": "class_balanced", "num_samples": -1},
    {"name": "class_balanced", "start_epoch": -1}, {"name": "class_aware", "per_class": 0},
    {"name": "progressive", "epochs": 0}, {"name": "sqrt", "num_samples": -5},
])
def test_sampler_params_out_of_range_are_recipe_errors(registry, table):
    from ltframe.errors import RecipeError

    with pytest.raises(RecipeError, match="out of range"):
        registry.spec("sampler", table, "sampler")
