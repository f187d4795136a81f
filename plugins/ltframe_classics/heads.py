"""Classifier heads."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ltframe.registry import Registry


@dataclass
class LinearParams:
    bias: bool = True


def linear(p: LinearParams, in_features: int, num_classes: int) -> nn.Module:
    """A linear classifier W f + b."""
    return nn.Linear(in_features, num_classes, bias=p.bias)


def register(registry: Registry) -> None:
    registry.register("head", "linear", linear, LinearParams)
