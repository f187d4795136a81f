"""SSD: Self Supervision to Distillation for long-tailed recognition (paper 004;
MCG-NJU/SSD-LT; shared/METHODS.md "SSD (paper 004)").

- loss `distill`: T^2-scaled distillation to the run's per-sample soft labels;
- scheduler `ssd`: I joint CE + self-supervision, II decoupled teacher + soft labels for the
  training set, III a new network with a hard and a soft head, IV a decoupled classifier.
"""

from __future__ import annotations

from ltframe import hookimpl
from ltframe.registry import Registry
from ltframe_ssd import distill, scheduler

__version__ = "0.1.0"


@hookimpl
def ltframe_register(registry: Registry) -> None:
    for module in (distill, scheduler):
        module.register(registry)
