"""Imbalanced semi-supervised methods beside USB (shared/ZOO.md part A): DARP, ABC, DASO, CoSSL,
SAW, Adsh, DebiasPL, ACR, SimPro — each from its authors' code, with USB's behaviour as a parameter
where the two differ.

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
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(registry)
