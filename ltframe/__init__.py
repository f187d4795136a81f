"""ltframe: a plug-in framework for long-tailed and semi-supervised long-tailed recognition.

The public names are imported on first access (PEP 562 module `__getattr__`), so that
`import ltframe` (and the command line's `--help`) does not pay for torch, timm and
torchvision until something actually needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "ComponentSpec": "ltframe.config",
    "LtframeError": "ltframe.errors",
    "PseudoLabels": "ltframe.engine.context",
    "Recipe": "ltframe.recipe",
    "Registry": "ltframe.registry",
    "StepContext": "ltframe.engine.context",
    "evaluate_checkpoint": "ltframe.engine.run",
    "hookimpl": "ltframe.hookspecs",
    "load_model": "ltframe.export",
    "load_recipe": "ltframe.recipe",
    "make_plugin_manager": "ltframe.plugins",
    "resume_run": "ltframe.engine.run",
    "start_run": "ltframe.engine.run",
}

__all__ = [
    "ComponentSpec",
    "LtframeError",
    "PseudoLabels",
    "Recipe",
    "Registry",
    "StepContext",
    "evaluate_checkpoint",
    "hookimpl",
    "load_model",
    "load_recipe",
    "make_plugin_manager",
    "resume_run",
    "start_run",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ltframe' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # static type checkers and IDEs see the real names
    from ltframe.config import ComponentSpec
    from ltframe.engine.context import PseudoLabels, StepContext
    from ltframe.engine.run import evaluate_checkpoint, resume_run, start_run
    from ltframe.errors import LtframeError
    from ltframe.export import load_model
    from ltframe.hookspecs import hookimpl
    from ltframe.plugins import make_plugin_manager
    from ltframe.recipe import Recipe, load_recipe
    from ltframe.registry import Registry
