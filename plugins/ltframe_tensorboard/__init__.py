"""TensorBoard logging on ltframe's event hooks: logger `tensorboard`.

    [run]
    loggers = [{ name = "tensorboard" }]      # events in RUN/tensorboard/; pip install 'ltframe[tensorboard]'

Every metrics.jsonl record reaches the logger through `ltframe_log`; the logger writes loss
terms and lr ("train"), overall / many / medium / few top-1 ("eval", per stage), pseudo-label
accuracy ("pseudo_labels", "pool_labels") as scalars against a run-wide step.
"""

from __future__ import annotations

from ltframe import hookimpl
from ltframe.registry import Registry
from ltframe_tensorboard import logger

__version__ = "0.1.0"


@hookimpl
def ltframe_register(registry: Registry) -> None:
    logger.register(registry)
