"""Stage plans and the stage-scheduler contract (the `scheduler` hook point)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ltframe.recipe import OptimCfg, StageCfg


@dataclass
class StagePlan:
    """One stage to run: its recipe table, resolved optimizer, and scheduler extras."""

    index: int
    name: str
    cfg: StageCfg
    optim: OptimCfg
    extras: dict[str, Any] = field(default_factory=dict)


class StageScheduler(Protocol):
    """Yields the stages of a run. Must be a pure function of `history` so resume works."""

    def next_stage(self, history: list[dict]) -> StagePlan | None:
        """The next stage given the results of the finished ones (None = run complete)."""
