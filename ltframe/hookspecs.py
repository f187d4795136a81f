"""The plugin contract: every hook ltframe calls, grouped by phase.

Plugins implement these with ``@ltframe.hookimpl``. Registration runs once per plugin; events
are broadcast to every plugin *and* to every stateful component built for the current run, so a
memory bank or a momentum queue can react to steps without the engine knowing about it.
Event hooks return None unless stated otherwise.
"""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("ltframe")
hookimpl = pluggy.HookimplMarker("ltframe")


# --- registration -------------------------------------------------------------------------
@hookspec(historic=True)
def ltframe_register(registry: Any) -> None:
    """Add named component factories to `registry` (an ltframe.Registry).

    Called once for every plugin when it is registered (historic: plugins registered later
    are called too). Use ``registry.register(kind, name, factory, ParamsDataclass)``.
    Not firstresult; return value ignored.
    """


# --- run -----------------------------------------------------------------------------------
@hookspec
def ltframe_run_start(run: Any) -> None:
    """Called once after data, model and run directory exist, before the first stage.

    `run` is the ltframe.engine.Run (recipe, data, model, registry, run_dir, device).
    Also called when a run is resumed.
    """


@hookspec
def ltframe_run_end(run: Any, summary: dict) -> None:
    """Called once after the last stage with the final summary dict (already written)."""


# --- stage ---------------------------------------------------------------------------------
@hookspec
def ltframe_stage_start(run: Any, stage: Any) -> None:
    """Called when a stage begins (or resumes); `stage` is the StagePlan about to run."""


@hookspec
def ltframe_stage_end(run: Any, stage: Any, result: dict) -> None:
    """Called when a stage finishes; `result` holds its final metrics (a StageResult dict)."""


# --- epoch ---------------------------------------------------------------------------------
@hookspec
def ltframe_epoch_start(run: Any, stage: Any, epoch: int) -> None:
    """Called before epoch `epoch` (0-based, within the stage) starts."""


@hookspec
def ltframe_epoch_end(run: Any, stage: Any, epoch: int, metrics: dict) -> None:
    """Called after epoch `epoch`, after its evaluation (if any) and checkpoint.

    `metrics` holds the epoch's mean loss terms and evaluation metrics, if evaluated.
    """


# --- step ----------------------------------------------------------------------------------
@hookspec
def ltframe_step_end(run: Any, stage: Any, step: int, ctx: Any) -> None:
    """Called after every optimizer step; `step` is the global step within the stage.

    `ctx` is the StepContext (inputs, outputs, loss terms as tensors). Do not call
    ``.item()`` here on every step: it forces a device sync.
    """


# --- evaluation ----------------------------------------------------------------------------
@hookspec
def ltframe_evaluate(run: Any, model: Any, logits: Any, labels: Any) -> dict | None:
    """Called at every evaluation with the test-set logits and labels (CPU tensors).

    Return a dict of extra metrics (merged into the evaluation result) or None.
    Not firstresult: every plugin's dict is merged.
    """


# --- logging -------------------------------------------------------------------------------
@hookspec
def ltframe_log(run: Any, event: str, data: dict) -> None:
    """Called for every record written to RUN/metrics.jsonl (rank 0 only): `event` is "train"
    (loss terms, lr, images/s at `run.log_every`), "eval", "stage_start", "stage_end",
    "pseudo_labels", "pool_labels", "fit", "error", ...; `data` the record's other fields.

    The hook for experiment trackers (TensorBoard, W&B, MLflow): see the `logger` kind.
    """
