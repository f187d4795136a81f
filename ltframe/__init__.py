"""ltframe: a plug-in framework for long-tailed and semi-supervised long-tailed recognition."""

from ltframe.config import ComponentSpec
from ltframe.engine.context import PseudoLabels, StepContext
from ltframe.engine.run import evaluate_checkpoint, resume_run, start_run
from ltframe.errors import LtframeError
from ltframe.hookspecs import hookimpl
from ltframe.plugins import make_plugin_manager
from ltframe.recipe import Recipe, load_recipe
from ltframe.registry import Registry

__version__ = "0.1.0"

__all__ = [
    "ComponentSpec",
    "LtframeError",
    "PseudoLabels",
    "Recipe",
    "Registry",
    "StepContext",
    "evaluate_checkpoint",
    "hookimpl",
    "load_recipe",
    "make_plugin_manager",
    "resume_run",
    "start_run",
]
