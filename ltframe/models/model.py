"""LTModel: one timm backbone used as a feature extractor plus any number of named heads."""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import Tensor, nn

from ltframe.errors import RecipeError, closest


def build_backbone(name: str, **kwargs: Any) -> nn.Module:
    """`timm.create_model(name, num_classes=0)`: a feature extractor with `num_features`."""
    import importlib

    from ltframe.registry import BACKBONE_MODULES

    for module in BACKBONE_MODULES:  # plugins' backbones, registered into timm on import
        importlib.import_module(module)
    if not timm.is_model(name):
        names = timm.list_models()
        raise RecipeError(
            f"model.backbone: unknown timm model '{name}'{closest(name, names)}; "
            "see timm.list_models() or use wrn28_2, wrn28_8, resnet32_cifar"
        )
    kwargs.setdefault("pretrained", False)
    try:
        return timm.create_model(name, num_classes=0, **kwargs)
    except TypeError as exc:
        raise RecipeError(f"model.backbone_args: {name} rejects an argument: {exc}") from None
    except (ValueError, RuntimeError, AssertionError, ZeroDivisionError, OverflowError) as exc:
        raise RecipeError(f"model.backbone_args: timm cannot build {name} with {kwargs} "
                          f"({type(exc).__name__}: {str(exc)[:200]}); check the values") from None


class LTModel(nn.Module):
    """Backbone features -> {head name: logits}. `heads` is an nn.ModuleDict."""

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module]) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)

    @property
    def num_features(self) -> int:
        return int(self.backbone.num_features)

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        feats = self.backbone(x)
        return feats, {name: head(feats) for name, head in self.heads.items()}

    def submodule(self, path: str) -> nn.Module:
        """'backbone', 'heads', 'heads.main' -> module; a clear error for unknown parts."""
        try:
            return self.get_submodule(path)
        except AttributeError:
            parts = ["backbone", "heads", *(f"heads.{n}" for n in self.heads)]
            raise RecipeError(
                f"unknown model part '{path}'; parts: {', '.join(parts)}{closest(path, parts)}"
            ) from None

    @torch.no_grad()
    def reset(self, path: str) -> None:
        """Re-initialise `path`: every submodule's reset_parameters() (BatchNorm statistics
        included), then the model's own `init_weights()` where a module defines one (timm's
        convention), so a reset backbone starts as a freshly built one."""
        root = self.submodule(path)
        for m in root.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        done: list[nn.Module] = []
        for m in root.modules():
            init = getattr(m, "init_weights", None)
            if callable(init) and not any(m in list(d.modules()) for d in done):
                try:
                    init()
                except TypeError:  # an init_weights that needs arguments: keep the defaults
                    continue
                done.append(m)
