"""Classic supervised long-tailed components: losses, samplers and heads.

Now: cross-entropy, random (instance-balanced) and class-balanced samplers, the linear head.
"""

from __future__ import annotations

from ltframe import hookimpl
from ltframe.registry import Registry
from ltframe_classics import heads, losses, samplers

__version__ = "0.1.0"


@hookimpl
def ltframe_register(registry: Registry) -> None:
    for module in (losses, samplers, heads):
        module.register(registry)
