"""Values from the authors' reference code, re-derived by hand (shared/METHODS.md)."""

import pytest


def _ldam_drw_lr_factor(epoch: int) -> float:
    # kaidic/LDAM-DRW cifar_train.py adjust_learning_rate (also imbalanced-semi-self utils.py),
    # 0-based `epoch` as in its training loop
    epoch = epoch + 1
    if epoch <= 5:
        return epoch / 5
    if epoch > 180:
        return 0.0001
    if epoch > 160:
        return 0.01
    return 1.0


def test_step_schedule_defaults_are_ldam_drw(registry):
    spe = 3
    spec = registry.spec("lr_schedule", {"name": "step", "warmup_epochs": 5, "warmup_by": "epoch"},
                         "s")
    assert spec.params.milestones == [160.0, 180.0] and spec.params.gamma == 0.01
    f = registry.build(spec, steps_per_epoch=spe, total_steps=200 * spe)
    for k in range(200 * spe):
        assert f(k) == pytest.approx(_ldam_drw_lr_factor(k // spe), rel=1e-12), k


def test_step_warmup_per_step_is_linear(registry):
    f = registry.build(registry.spec("lr_schedule", {"name": "step", "warmup_epochs": 5}, "s"),
                       steps_per_epoch=10, total_steps=2000)
    assert [f(k) for k in (0, 24, 49, 50)] == pytest.approx([1 / 50, 25 / 50, 1.0, 1.0])


def test_cosine_and_constant_epoch_warmup(registry):
    def build(name, **p):
        return registry.build(registry.spec("lr_schedule", {"name": name, **p}, "s"),
                              steps_per_epoch=4, total_steps=400)

    const = build("constant", warmup_epochs=2, warmup_by="epoch")
    assert [const(k) for k in (0, 3, 4, 7, 8)] == [0.5, 0.5, 1.0, 1.0, 1.0]
    cos = build("cosine", warmup_epochs=2, warmup_by="epoch")
    assert cos(3) == 0.5 and cos(200) == pytest.approx(0.5)


@pytest.mark.parametrize("kind,table", [
    ("optimizer", {"name": "sgd", "lr": 0.0}), ("optimizer", {"name": "sgd", "weight_decay": -1}),
    ("optimizer", {"name": "adam", "betas": [0.9, 1.0]}),
    ("lr_schedule", {"name": "step", "milestones": [160, -1]}),
    ("lr_schedule", {"name": "step", "gamma": 0.0}),
    ("lr_schedule", {"name": "cosine", "warmup_epochs": -1}),
    ("lr_schedule", {"name": "cosine", "min_factor": 2.0}),
])
def test_optim_params_out_of_range_are_recipe_errors(registry, kind, table):
    from ltframe.errors import RecipeError

    with pytest.raises(RecipeError, match="out of range"):
        registry.spec(kind, table, "optim")
