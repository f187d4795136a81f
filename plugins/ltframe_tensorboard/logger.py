"""The `tensorboard` logger: metrics.jsonl records as TensorBoard scalars
(torch.utils.tensorboard.SummaryWriter; the `tensorboard` extra)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from ltframe import hookimpl
from ltframe.config import param
from ltframe.errors import RecipeError
from ltframe.registry import Registry

EVAL_KEYS = ("top1", "many", "medium", "few", "top5")


@dataclass
class TensorBoardParams:
    subdir: str = "tensorboard"  # event files go to RUN/<subdir>/ (a relative path inside RUN)
    flush_secs: int = param(30, ge=1)

    def __post_init__(self) -> None:
        path = PurePosixPath(self.subdir.replace("\\", "/"))
        if (not self.subdir.strip() or path.is_absolute() or PureWindowsPath(self.subdir).drive
                or ".." in path.parts or "\0" in self.subdir):
            raise ValueError(f"subdir: {self.subdir!r} is not a folder inside the run directory; "
                             "give a relative path without '..', e.g. \"tensorboard\"")


class TensorBoardLogger:
    """Scalars against a run-wide step: stage offsets keep the curves of consecutive stages
    apart (stage k starts where stage k - 1 ended)."""

    def __init__(self, params: TensorBoardParams) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RecipeError("run.loggers names 'tensorboard' but the tensorboard package is "
                              "missing; install it with pip install 'ltframe[tensorboard]' or "
                              "remove the logger") from None
        self.p = params
        self._writer_cls = SummaryWriter
        self.writer: Any = None
        self.offset = 0  # run-wide step of the current stage's step 0
        self.stage_steps = 0

    @hookimpl
    def ltframe_run_start(self, run: Any) -> None:
        root = Path(run.run_dir).resolve()
        folder = (root / self.p.subdir).resolve()
        if not folder.is_relative_to(root):  # a link inside the run directory leads out of it
            raise RecipeError(f"run.loggers: tensorboard subdir {self.p.subdir!r} resolves to "
                              f"{folder}, outside the run directory {root}")
        self.writer = self._writer_cls(str(folder), flush_secs=self.p.flush_secs)

    @hookimpl
    def ltframe_log(self, run: Any, event: str, data: dict) -> None:
        w = self.writer
        if w is None:
            return
        if event == "stage_start":
            self.offset += self.stage_steps
            self.stage_steps = int(data.get("total_steps", 0))
            return
        step = self.offset + int(data.get("step", 0))
        if event == "train":
            for k, v in (data.get("loss") or {}).items():
                w.add_scalar(f"loss/{k}", v, step)
            w.add_scalar("train/lr", data.get("lr", 0.0), step)
            if data.get("images_per_s"):
                w.add_scalar("train/images_per_s", data["images_per_s"], step)
            if data.get("mask_ratio") is not None:  # online pseudo-labels kept (no labels needed)
                w.add_scalar("train/mask_ratio", data["mask_ratio"], step)
        elif event == "eval":
            for k in EVAL_KEYS:
                if data.get(k) is not None:
                    w.add_scalar(f"eval/{k}", data[k], step)
        elif event == "pseudo_labels" and data.get("pl_accuracy") is not None:
            w.add_scalar("pseudo_labels/accuracy", data["pl_accuracy"], step)
        elif event == "pool_labels" and data.get("pool_accuracy") is not None:
            w.add_scalar("pool_labels/accuracy", data["pool_accuracy"], self.offset + self.stage_steps)

    @hookimpl
    def ltframe_run_end(self, run: Any, summary: dict) -> None:
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def register(registry: Registry) -> None:
    registry.register("logger", "tensorboard", TensorBoardLogger, TensorBoardParams)
