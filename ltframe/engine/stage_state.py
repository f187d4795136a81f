"""What a running stage holds: its built components and the on-device accumulators."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ltframe.data.samplers import BatchStream
from ltframe.engine.ema import EMA
from ltframe.engine.stages import StagePlan


class Accumulators:
    """Loss sums, NaN flag, pseudo-label confusion and throughput kept on the device between
    log intervals, so a step never syncs with the host."""

    def __init__(self, device: torch.device, loss_names: list[str], num_classes: int) -> None:
        self.zero = torch.zeros((), device=device)
        self.sums = {name: self.zero.clone() for name in [*loss_names, "total"]}
        self.confusion = torch.zeros(num_classes * num_classes, device=device)
        self.pseudo = torch.zeros(2, device=device)  # online pseudo-labels kept, seen (interval)
        self.seen = 0  # pseudo-labelled samples of the interval (a host count: no device op)
        self.num_classes = num_classes
        self.n = 0
        self.imgs = 0
        self.t_log = time.perf_counter()
        self.last_good = 0  # the step of the last checkpoint written in this stage

    @property
    def bad(self) -> Tensor:
        """A non-finite loss in the interval: the summed total is then non-finite too (one
        check per log interval instead of one per step)."""
        return ~torch.isfinite(self.sums["total"])

    def add(self, losses: dict[str, Tensor], images: int) -> None:
        """Add a step's loss terms to the interval's sums (one multi-tensor kernel)."""
        torch._foreach_add_([self.sums[k] for k in losses], [v.detach() for v in losses.values()])
        self.n += 1
        self.imgs += images

    def count_pseudo(self, pseudo: Any, true: Tensor) -> None:
        """Diagnostics only: pseudo-labels of the selected samples against hidden labels
        (index_add_, not bincount, which syncs with the host on CUDA)."""
        pl = pseudo.targets.argmax(1) if pseudo.targets.dim() == 2 else pseudo.targets
        kept = pseudo.mask > 0
        self.pseudo[0] += kept.sum()  # the mask ratio needs no labels
        self.seen += pseudo.mask.numel()
        # images without a known label (-1) are left out
        self.confusion.index_add_(0, torch.add(pl, true.clamp_min(0), alpha=self.num_classes),
                                  (kept & (true >= 0)).float())

    def state_tensors(self) -> dict[str, Tensor]:
        """What a mid-interval checkpoint needs so that a resumed run logs the same means."""
        out = {f"acc.sum.{k}": v for k, v in self.sums.items()}
        out["acc.confusion"] = self.confusion
        out["acc.pseudo"] = torch.stack([self.pseudo[0], self.pseudo[1] + self.seen])
        out["acc.n"] = torch.tensor([self.n])
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        if "acc.n" not in tensors:  # a checkpoint written before these were kept
            return
        for k in self.sums:
            if f"acc.sum.{k}" in tensors:
                self.sums[k] = tensors[f"acc.sum.{k}"].to(self.zero.device).clone()
        self.confusion.copy_(tensors["acc.confusion"])
        if "acc.pseudo" in tensors:
            self.pseudo.copy_(tensors["acc.pseudo"])
            self.seen = 0  # counted in pseudo[1]
        self.n = int(tensors["acc.n"][0])  # images/s restarts with the resumed steps

    def reset_interval(self) -> None:
        for k in self.sums:
            self.sums[k] = self.zero.clone()
        self.pseudo.zero_()
        self.seen = 0
        self.n, self.imgs, self.t_log = 0, 0, time.perf_counter()


@dataclass
class Stage:
    """Everything a running stage holds: its plan, step counts and built components."""

    plan: StagePlan
    spe: int
    total: int
    schedule: Any
    optimizer: Any
    base_lrs: list[float]
    counts: Tensor
    losses: list[tuple[str, float, int, Any]]  # name, weight, start step, term
    labeler: Any
    views: dict[str, list]
    streams: dict[str, BatchStream]
    ema: EMA | None
    acc: Accumulators
    start: int = 0
    transform: Any = None
    teacher: torch.nn.Module | None = None  # stage.teacher = "start": frozen copy at stage start
    soft: bool = False  # the supervised samples all have soft targets in the table
    weighted: bool = False  # some supervised sample has a weight other than 1
    online: dict | None = None  # last epoch's online pseudo-label diagnostics
    train_forward: Any = None  # the training forward when not the plain model (DDP, compiled)
    core: Any = None  # the compiled step core (run.compile with compile_scope = "step")

    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return self.ema.module if self.ema is not None else model

    def teacher_model(self) -> torch.nn.Module | None:
        if self.plan.cfg.teacher == "start":
            return self.teacher
        return self.ema.module if self.ema is not None else None
