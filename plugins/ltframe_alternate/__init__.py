"""Alternate sampling for semi-supervised long-tailed recognition (paper 000, "Alternate
sampling"; shared/METHODS.md "Alternate sampling (paper 000)").

- loss `consistency`: temporal consistency to each sample's softmax from the previous epoch
  (per-sample memory, checkpointed, uniform when the loss is built = at each loop's start);
- scheduler `alternate`: initialisation (instance-sampled f + g', then a class-balanced g on
  frozen features), then L loops of (1) hard argmax pseudo-labels for the whole unlabeled pool
  from f and g, (2) fine-tune f and g' on D + pseudo-labelled U (random sampling, CE +
  lambda * consistency), (3) retrain g class-balanced on D with f frozen.
"""

from __future__ import annotations

from ltframe import hookimpl
from ltframe.registry import Registry
from ltframe_alternate import consistency, scheduler

__version__ = "0.1.0"


@hookimpl
def ltframe_register(registry: Registry) -> None:
    for module in (consistency, scheduler):
        module.register(registry)
