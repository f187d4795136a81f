"""Views: none, weak (flip + pad-crop), resized_crop (random resized crop + flip), strong
(RandAugment-style + Cutout)."""

from __future__ import annotations

from ltframe.data.views import (
    NoneParams,
    NoneView,
    ResizedCropParams,
    ResizedCropView,
    StrongParams,
    StrongView,
    WeakParams,
    WeakView,
)
from ltframe.registry import Registry


def register(registry: Registry) -> None:
    registry.register("view", "none", NoneView, NoneParams)
    registry.register("view", "weak", WeakView, WeakParams)
    registry.register("view", "resized_crop", ResizedCropView, ResizedCropParams)
    registry.register("view", "strong", StrongView, StrongParams)
