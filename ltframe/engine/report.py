"""Progress reporting interface between the engine and a front end (the CLI uses rich)."""

from __future__ import annotations

from typing import Any


class Reporter:
    """Silent reporter; the CLI subclasses it. All methods are optional no-ops."""

    def message(self, text: str) -> None:
        pass

    def stage_start(self, name: str, total_steps: int, start_step: int) -> None:
        pass

    def progress(self, step: int, info: dict[str, Any]) -> None:
        pass

    def evaluation(self, stage: str, epoch: int, metrics: dict[str, Any]) -> None:
        pass

    def stage_end(self, name: str) -> None:
        pass
