"""CReST / CReST+ (Wei et al. 2021, "CReST: A Class-Rebalancing Self-Training Framework for
Imbalanced Semi-Supervised Learning", paper 003; google-research/crest).

- scheduler `crest`: G generations of the recipe's (FixMatch) stage; after each generation the
  EMA model labels the unlabeled pool and a class-rebalanced subset joins the labeled set of the
  next generation; CReST+ sets the temperature `t` of an `align` pseudo-labeler per generation.
- pseudo_labeler `crest_select` (offline only): the per-class top-confidence selection.
"""

from __future__ import annotations

from ltframe import hookimpl
from ltframe.registry import Registry
from ltframe_crest import scheduler, select

__version__ = "0.1.0"


@hookimpl
def ltframe_register(registry: Registry) -> None:
    for module in (select, scheduler):
        module.register(registry)
