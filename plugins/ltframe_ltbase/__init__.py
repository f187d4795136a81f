"""Supervised long-tailed baselines (shared/ZOO.md part B): Balanced Softmax, BBN, RIDE, TDE
(causal_norm), MiSLAS, weight balancing — each from its authors' code, differences as parameters.

Every module of this package that defines `register(registry)` is registered (one module per
method, so methods can be added without touching this file).
"""

from __future__ import annotations

import importlib
import pkgutil

from ltframe import hookimpl
from ltframe.registry import Registry

__version__ = "0.1.0"


@hookimpl
def ltframe_register(registry: Registry) -> None:
    # the timm backbones are imported only when a model is built (`ltframe show` and
    # `ltframe components` stay light)
    registry.add_backbone_module(f"{__name__}.backbones")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name == "backbones":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(registry)
