"""The number a stage reports from its evaluations: the last one, the best one (highest top-1),
or the mean of the last k — reference implementations differ, so a recipe says which protocol
it follows. The last evaluation is always kept beside the chosen one."""

from __future__ import annotations

import math
from typing import Any

from ltframe.errors import LtframeError
from ltframe.eval.metrics import SCALARS


class EvalRecord:
    """One stage's evaluations, reduced to what `report` needs (the last k and the best)."""

    def __init__(self, report: str, last_k: int) -> None:
        self.report = report
        self.last_k = max(last_k, 1)
        self.recent: list[dict] = []
        self.best: dict | None = None

    def add(self, metrics: dict) -> None:
        self.recent = (self.recent + [metrics])[-self.last_k:]
        if self.best is None or metrics["top1"] > self.best["top1"]:
            self.best = metrics

    def state_dict(self) -> dict:
        return {"recent": self.recent, "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.recent = list(state.get("recent", []))
        self.best = state.get("best")

    def summary(self) -> dict:
        """The chosen metrics at top level, plus `report` and the `last` evaluation."""
        if not self.recent:
            return {}
        last = self.recent[-1]
        if self.report == "best":
            assert self.best is not None
            chosen = {**self.best, "best_epoch": self.best.get("epoch"),
                      "best_step": self.best.get("step")}
        elif self.report == "mean_last_k":
            chosen = {**mean_metrics(self.recent), "evaluations": len(self.recent)}
        else:
            chosen = dict(last)
        for key in ("stage", "epoch", "step"):
            chosen.pop(key, None)
        if chosen.get("top1") is not None and math.isnan(chosen["top1"]):
            raise LtframeError("evaluation produced NaN accuracy; the test set may be empty")
        return {**chosen, "report": self.report, "last": _compact(last)}


def _compact(metrics: dict) -> dict:
    keep = (*SCALARS, "per_class", "rows", "epoch", "step")
    return {k: metrics[k] for k in keep if k in metrics}


def mean_metrics(evals: list[dict]) -> dict[str, Any]:
    """Mean of the evaluations' numeric metrics (per_class and per-tau rows elementwise)."""
    out: dict[str, Any] = {}
    for key in SCALARS:
        vals = [e[key] for e in evals if e.get(key) is not None]
        if vals:
            out[key] = sum(vals) / len(vals)
        elif key in evals[-1]:
            out[key] = None
    pcs = [e["per_class"] for e in evals if "per_class" in e]
    if pcs:
        out["per_class"] = [round(sum(col) / len(col), 4) for col in zip(*pcs, strict=True)]
    rows = [e["rows"] for e in evals if "rows" in e]
    if rows:
        out["rows"] = [{"posthoc_tau": group[0]["posthoc_tau"], **mean_metrics(list(group))}
                       for group in zip(*rows, strict=True)]
    return out
