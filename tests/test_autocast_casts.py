"""bf16 autocast casts each trainable weight once per step, however many forwards the step
makes (issue 19): MixMatch guesses labels with two no-grad forwards before its training
forward. Autocast runs on the CPU here (the trainer turns it on only on CUDA: forced below)."""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ltframe import start_run
from ltframe.engine import trainer as trainer_mod
from ltframe.testing import tiny_recipe

MIXMATCH = {"name": "mixmatch", "epochs": 1, "steps_per_epoch": 3, "data": "labeled+unlabeled",
            "views": {"labeled": ["weak"], "unlabeled": ["weak", "weak"]},
            "transform": "mixmatch", "loss": ["mixmatch"]}


class _Casts(TorchDispatchMode):
    """Counts bf16 casts per source tensor (by storage pointer)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_ptr: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if (func.overloadpacket.__name__ == "_to_copy" and kwargs.get("dtype") == torch.bfloat16
                and args[0].dtype == torch.float32):
            self.by_ptr[args[0].data_ptr()] += 1
        return func(*args, **kwargs)


def _casts_per_step(tmp_path, monkeypatch, *, cached: bool) -> list[Counter]:
    """For each step: trainable weight -> bf16 casts (a model forward per part of the step)."""
    steps: list[Counter] = []
    init, step = trainer_mod.Trainer.__init__, trainer_mod.Trainer._step

    def forced_init(self, *a, **kw):
        init(self, *a, **kw)
        self.autocast = True

    def counted_step(self, st, *a, **kw):
        weights = {p.data_ptr() for p in self.model.parameters() if p.requires_grad and p.dim() > 1}
        with _Casts() as c:
            out = step(self, st, *a, **kw)
        steps.append(Counter({k: v for k, v in c.by_ptr.items() if k in weights}))
        return out

    monkeypatch.setattr(trainer_mod.Trainer, "__init__", forced_init)
    monkeypatch.setattr(trainer_mod.Trainer, "_step", counted_step)
    if not cached:  # the former behaviour: no outer region, one autocast per forward
        monkeypatch.setattr(trainer_mod.Trainer, "_core", trainer_mod.Trainer._core_body)
    path = tiny_recipe(tmp_path, stage=[MIXMATCH], run={"log_every": 1000},
                       data={"split": {"name": "fraction", "labeled_fraction": 0.3}})
    start_run(path)
    return steps


@pytest.mark.slow
def test_each_weight_is_cast_to_bf16_once_per_step(tmp_path, monkeypatch):
    steps = _casts_per_step(tmp_path / "a", monkeypatch, cached=True)
    assert len(steps) == 3
    for c in steps:
        assert c and max(c.values()) == 1, c  # every weight cast, each once


@pytest.mark.slow
def test_without_the_outer_region_each_forward_casts_again(tmp_path, monkeypatch):
    # the counter sees the difference: 2 guesses + the training forward = 3 casts per weight
    steps = _casts_per_step(tmp_path / "b", monkeypatch, cached=False)
    assert all(max(c.values()) == 3 for c in steps), steps
