"""Side-by-side numbers of finished runs, read from their run directories (no torch, no
plotting): one row per run, or per stage of each run. Used by `ltframe compare`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ltframe.errors import LtframeError

METRICS = ("top1", "many", "medium", "few")


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    """summary.json of a finished run, with a clear error for anything else."""
    path = Path(run_dir)
    if not path.is_dir():
        raise LtframeError(f"{run_dir}: no such run directory; give the folder `ltframe run` "
                           "printed (e.g. runs/<name>)")
    summary = path / "summary.json"
    if not summary.is_file():
        from ltframe.engine.runlock import holder

        pid = holder(path)
        if pid is not None:  # never advise resuming a run another process still writes
            raise LtframeError(f"{run_dir}: still training (process {pid} holds its lock); "
                               "wait for it to finish, then run this again")
        hint = (f"it has checkpoints but no summary.json: finish it with `ltframe resume {path}`"
                if (path / "checkpoints").is_dir() else "it is not a run directory")
        raise LtframeError(f"{run_dir}: {hint}")
    try:
        return json.loads(summary.read_text())
    except json.JSONDecodeError as exc:
        raise LtframeError(f"{summary}: not valid JSON ({exc.msg}, line {exc.lineno}); "
                           f"re-evaluate with `ltframe eval {path}`") from None


def _recipe_of(run_dir: Path) -> str:
    try:
        meta = json.loads((run_dir / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return ""
    return str(meta.get("recipe") or "")


def _protocol(s: dict[str, Any]) -> str:
    report = s.get("report") or "last"
    if report == "mean_last_k":
        return f"mean of last {s.get('evaluations', '?')}"
    return report


def compare_rows(run_dirs: list[str | Path], stages: bool = False) -> list[dict[str, Any]]:
    """One dict per run (or per stage of each run), and per post-hoc tau where the run was
    evaluated with a list of taus (`posthoc_tau`, None otherwise): run, run_dir, recipe,
    stage, protocol, the reported top1 / many / medium / few, the last evaluation's top1,
    seconds."""
    rows: list[dict[str, Any]] = []
    for d in run_dirs:
        s = load_summary(d)
        base = {"run": Path(d).name, "run_dir": str(d), "recipe": _recipe_of(Path(d))}
        parts = s.get("stages", []) if stages else [{**s, "stage": "final"}]
        for part in parts:
            last = part.get("last") or {}
            for tau, numbers, last_numbers in _per_tau(part, last):
                row = {**base, "stage": part.get("stage", ""), "protocol": _protocol(part),
                       "posthoc_tau": tau, **{m: numbers.get(m) for m in METRICS},
                       "last_top1": last_numbers.get("top1", numbers.get("top1")),
                       "seconds": s.get("seconds") if not stages else None}
                if stages:
                    row["eval_head"] = part.get("eval_head")
                rows.append(row)
    return rows


def _per_tau(part: dict[str, Any], last: dict[str, Any]) -> list[tuple[Any, dict, dict]]:
    """(tau, reported numbers, last evaluation's numbers) for each post-hoc tau of a result."""
    taus = part.get("rows") or []
    if not taus:
        return [(part.get("posthoc_tau"), part, last)]
    last_rows = {r.get("posthoc_tau"): r for r in last.get("rows") or []}
    return [(r.get("posthoc_tau"), r, last_rows.get(r.get("posthoc_tau"), {})) for r in taus]
