"""The `sequence` stage scheduler: the recipe's [[stage]] tables, in order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ltframe.config import param
from ltframe.engine.stages import StagePlan
from ltframe.registry import Registry


@dataclass
class SequenceParams:
    repeat: int = param(1, ge=1, le=1000)  # run the list of stages this many times


class Sequence:
    """Each [[stage]] once (or `repeat` times), in recipe order."""

    def __init__(self, params: SequenceParams, stages: list[tuple[Any, Any]]) -> None:
        self.params = params
        self.stages = stages

    def next_stage(self, history: list[dict]) -> StagePlan | None:
        i = len(history)
        if i >= len(self.stages) * self.params.repeat:
            return None
        cfg, optim = self.stages[i % len(self.stages)]
        return StagePlan(index=i, name=cfg.name, cfg=cfg, optim=optim)


def register(registry: Registry) -> None:
    registry.register("scheduler", "sequence", Sequence, SequenceParams)
