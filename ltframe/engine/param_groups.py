"""Optimizer parameter groups: `[optim] no_decay` keeps chosen parameters out of weight decay.

USB (microsoft/Semi-supervised-learning, semilearn/core/utils/build.py get_optimizer with
bn_wd_skip) puts every parameter whose name contains 'bn' or 'bias' in a group with
weight_decay 0; the CReST/FixMatch TensorFlow code (google-research/crest) decays only
variables named 'kernel' (convolution and dense weights). A name test depends on how a model
names its modules, so ltframe selects by what a parameter is:

- "bias": every parameter registered under the name `bias` (any module's bias);
- "norm": every parameter held directly by a normalisation module: torch's BatchNorm /
  SyncBatchNorm / InstanceNorm / GroupNorm / LayerNorm / RMSNorm and any module with "Norm"
  in its class name or a base class name (timm's LayerNorm2d, RmsNorm, EvoNorm, BatchNormAct2d...).

On wrn28_2 and resnet32_cifar, ["bias", "norm"] is exactly USB's set (tests/test_param_groups.py).
Without `no_decay` the optimizer gets the plain parameter list, as before."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from ltframe.recipe import NO_DECAY


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: a torch norm type or a class (or base) named *Norm*."""
    norm_types = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
                  *([nn.RMSNorm] if hasattr(nn, "RMSNorm") else []))
    if isinstance(module, norm_types):
        return True
    return any("Norm" in cls.__name__ for cls in type(module).__mro__ if cls is not nn.Module)


def no_decay_ids(model: nn.Module, rules: Sequence[str]) -> set[int]:
    """ids of the parameters of `model` that the rules exclude from weight decay."""
    bad = [r for r in rules if r not in NO_DECAY]
    if bad:
        raise ValueError(f"no_decay: unknown entry {bad[0]!r}; allowed: {', '.join(NO_DECAY)}")
    out: set[int] = set()
    for module in model.modules():
        norm = "norm" in rules and is_norm(module)
        for name, p in module.named_parameters(recurse=False):
            if norm or ("bias" in rules and name == "bias"):
                out.add(id(p))
    return out


def param_groups(params: Iterable[nn.Parameter], model: nn.Module,
                 rules: Sequence[str]) -> list[Any]:
    """`params` unchanged without rules; else [{params: decayed}, {params: excluded,
    weight_decay: 0.0}] in parameter order, empty groups left out."""
    params = list(params)
    if not rules:
        return params
    skip = no_decay_ids(model, rules)
    decay = [p for p in params if id(p) not in skip]
    keep = [p for p in params if id(p) in skip]
    groups: list[Any] = []
    if decay:
        groups.append({"params": decay})
    if keep:
        groups.append({"params": keep, "weight_decay": 0.0})
    return groups
