"""ltframe's built-in plugin: data sources, views, optimizers, lr schedules, `sequence`.

Registered through the same entry point group as every other plugin (name "builtin").
"""

from __future__ import annotations

from ltframe.builtin import optim, sources, stages, views
from ltframe.hookspecs import hookimpl
from ltframe.registry import Registry


@hookimpl
def ltframe_register(registry: Registry) -> None:
    for module in (sources, views, optim, stages):
        module.register(registry)
