"""Checkpoints written off the training thread.

`CheckpointWriter.submit` copies the tensors once into host memory (pinned buffers, reused
between checkpoints, filled with asynchronous copies and one wait; a CPU run clones), freezes the
sidecar's content, and returns: a background thread writes the files with `checkpoint.save`
(atomic as ever: temporary file, fsync, rename, `latest` last) while training goes on. One write
is in flight at a time; the next `submit`, `wait` or `last` waits for it. A failed write (full
disk, read-only file system) is raised by the next `submit` / `wait`, on the training thread.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ltframe.engine import checkpoint as ckpt


class CheckpointWriter:
    """One background checkpoint write at a time; `background=False` writes in `submit`."""

    def __init__(self, background: bool = True) -> None:
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._last: Path | None = None
        self._pinned: dict[str, Tensor] = {}

    def snapshot(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Host copies of `tensors` that training can no longer change: device tensors go into
        pinned buffers (kept for the next checkpoint) with non-blocking copies and one wait."""
        out: dict[str, Tensor] = {}
        pinned: dict[str, Tensor] = {}
        devices = set()
        for k, t in tensors.items():
            t = t.detach()
            if t.device.type == "cpu":
                out[k] = t.clone(memory_format=torch.contiguous_format)
                continue
            buf = self._pinned.get(k)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
            buf.copy_(t, non_blocking=True)
            out[k] = pinned[k] = buf
            devices.add(t.device)
        for d in devices:  # the copies were queued on each device's stream: one wait each
            if d.type == "cuda":
                torch.cuda.current_stream(d).synchronize()
        self._pinned = pinned  # buffers of tensors no longer saved are released
        return out

    def submit(self, ckpt_dir: Path, stem: str, tensors: dict[str, Tensor], meta: dict[str, Any],
               wait: bool = False) -> None:
        """Write a checkpoint; returns once the tensors are copied (or, with `wait`, once the
        files are complete). Raises a failure of the previous write first."""
        self.wait()  # the pinned buffers are free again, and a failed write is raised here
        host = self.snapshot(tensors)
        frozen = copy.deepcopy(meta)  # history / record keep changing while the thread writes
        if not self.background or wait:
            self._last = ckpt.save(ckpt_dir, stem, host, frozen)
            return
        self._thread = threading.Thread(target=self._write, args=(ckpt_dir, stem, host, frozen),
                                        name=f"ltframe-checkpoint-{stem}", daemon=False)
        self._thread.start()

    def _write(self, ckpt_dir: Path, stem: str, host: dict[str, Tensor], meta: dict) -> None:
        try:
            self._last = ckpt.save(ckpt_dir, stem, host, meta)
        except BaseException as exc:  # raised on the training thread by the next wait()
            self._error = exc

    def wait(self, raise_error: bool = True) -> None:
        """Block until the write in flight is complete; raise its failure (once)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None and raise_error:
            exc, self._error = self._error, None
            raise exc

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def last(self) -> Path | None:
        """The newest complete checkpoint this process wrote (waits for one in flight)."""
        self.wait(raise_error=False)
        return self._last
