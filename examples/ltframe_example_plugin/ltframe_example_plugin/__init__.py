"""An example ltframe plugin (docs/plugins.md walks through it).

- loss `smooth_ce`: cross-entropy with label smoothing (Szegedy et al. 2016, "Rethinking the
  Inception Architecture"), with a bounded parameter;
- an event hook: counts the run's evaluations through `ltframe_log` and writes
  RUN/example_plugin.json when the run ends (rank 0 only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import ltframe
from ltframe.config import param

__version__ = "0.1.0"


@dataclass
class SmoothCEParams:
    smoothing: float = param(0.1, ge=0, lt=1)  # mass spread uniformly over all classes
    head: str = "main"


class SmoothCE:
    """Label-smoothed cross-entropy of the labeled batch."""

    def __init__(self, params: SmoothCEParams, num_classes: int) -> None:
        self.p = params
        self.num_classes = num_classes

    def __call__(self, ctx: ltframe.StepContext) -> torch.Tensor:
        logits = ctx.logits("labeled", self.p.head).float()
        return F.cross_entropy(logits, ctx.targets, label_smoothing=self.p.smoothing)


_evaluations: dict[str, int] = {}  # stage -> evaluations seen in the current run


@ltframe.hookimpl
def ltframe_register(registry: Any) -> None:
    registry.register("loss", "smooth_ce", SmoothCE, SmoothCEParams)


@ltframe.hookimpl
def ltframe_log(run: Any, event: str, data: dict) -> None:
    """Every metrics.jsonl record passes here; count the evaluations."""
    if event == "eval":
        _evaluations[data["stage"]] = _evaluations.get(data["stage"], 0) + 1


@ltframe.hookimpl
def ltframe_run_end(run: Any, summary: dict) -> None:
    """Write what was counted next to the run's own files (rank 0 writes, as ltframe does)."""
    if run.is_main:
        (run.run_dir / "example_plugin.json").write_text(
            json.dumps({"evaluations": _evaluations, "top1": summary["top1"]}))
    _evaluations.clear()
