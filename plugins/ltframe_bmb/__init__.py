"""BMB: Balanced Memory Bank for imbalanced semi-supervised learning (paper 002; formulas from
the first author's code as shared/METHODS.md "BMB" gives them).

- loss `bmb`: the auxiliary branch (adaptive class weights, FixMatch on the auxiliary head, the
  class-rebalanced feature memory and its loss); the base branch is the recipe's `ce` +
  `fixmatch`, and the auxiliary head is a second head of the model (`heads.aux`);
- `memory.BalancedMemory`: the vectorised memory (enqueue / dequeue / get).
"""

from __future__ import annotations

from ltframe import hookimpl
from ltframe.registry import Registry
from ltframe_bmb import loss

__version__ = "0.1.0"


@hookimpl
def ltframe_register(registry: Registry) -> None:
    loss.register(registry)
