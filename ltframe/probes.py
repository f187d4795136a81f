"""CPU probes for a GPU-ready training step (issue 19): host<->device syncs and kernel counts.

There is no GPU to run `torch.cuda.set_sync_debug_mode("error")` on, so `SyncProbe` emulates
one on a CPU: it treats the model's parameters and buffers, the image store's tensors and every
tensor derived from them (or created with an explicit ``device=``, or moved with ``.to(device)``)
as *device tensors*, and records each operation that would block the host on a GPU:

    kind           what
    item           ``.item()`` (and an internal ``aten::_local_scalar_dense``) of a device tensor
    tolist         ``.tolist()`` of a device tensor
    scalar         ``bool()`` / ``if t`` / ``int()`` / ``float()`` / ``index()`` / formatting
    d2h            ``.cpu()`` / ``.numpy()`` / ``.to("cpu")`` / ``copy_`` into a host tensor
    h2d            a blocking copy of a host tensor to the device: ``.to(device)`` without
                   ``non_blocking``, ``.cuda()``, ``device_tensor.copy_(host)``
    h2d_new        ``torch.tensor`` / ``as_tensor`` / ``asarray`` / ``new_tensor`` of host data
                   with a device (a pageable copy followed by a stream sync)
    h2d_mixed      a host tensor (not a 0-dim scalar) used in an op with device tensors: on a
                   GPU a copy the code forgot (or a device-mismatch error)
    dynamic_shape  an output shape read from device data: nonzero, masked_select, unique,
                   boolean-mask indexing / index_put, repeat_interleave with tensor repeats,
                   bincount
    h2d_async      (informational, not a sync) ``.to(device, non_blocking=True)`` of a host
                   tensor: asynchronous from pinned memory only; pin it and do it once

How tagging works: a `WeakTensorKeyDictionary` of device tensors (no tensor subclass, so
nothing the code under test sees changes). A `TorchFunctionMode` sees the Python-level entry
points (``.item()``, ``bool()``, ``.to``, ``torch.tensor(..., device=)``, factories with
``device=``) and a `TorchDispatchMode` sees every aten op, backward and optimizer kernels
included: an op's outputs are device tensors when any input is one (views and in-place ops
return tagged tensors, so tags survive them). On a CPU ``.to(device)`` / ``.cpu()`` return
the tensor itself; the probe returns a copy instead (what a GPU does), so the host original
stays a host tensor and is caught again the next time it is copied. A device argument given
as the *string* ``"cpu"`` means the host; a ``torch.device`` means the run's device.
Tensors made before the probe starts are host tensors unless `mark_device` names them, so
open the probe before the run is set up (`probe_steps` does) and record only in windows.

Not seen on a CPU: whether a host buffer is pinned, and whether a ``torch.Generator`` lives
on the device (both need the real GPU check).

`OpCounter` counts aten ops that launch kernels (views, metadata and allocations excluded; a
``_foreach_*`` op counts once) in named ranges. `probe_steps` runs a small recipe with both and
attributes records and counts to data / forward / losses / backward / optimizer / EMA by
wrapping the engine's seams (no engine edits).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.optim.optimizer as _optim
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

SYNC_KINDS = frozenset({"item", "tolist", "scalar", "d2h", "h2d", "h2d_new", "h2d_mixed",
                        "dynamic_shape"})
INFO_KINDS = frozenset({"h2d_async"})

_ROOT = Path(__file__).resolve().parent.parent
_OWN_FILE = str(Path(__file__).resolve())
_SKIP_DIRS = (str(Path(torch.__file__).resolve().parent) + os.sep,
              str(Path(os.__file__).resolve().parent) + os.sep)  # torch, the standard library
_PROJECT_DIRS = (str(_ROOT / "ltframe") + os.sep, str(_ROOT / "plugins") + os.sep)

_T = torch.Tensor
_SCALAR_FNS = {_T.__bool__: "bool", _T.__int__: "int", _T.__float__: "float",
               _T.__index__: "index", _T.__format__: "format", _T.__repr__: "repr",
               _T.__complex__: "complex"}
_NEW_FNS = {torch.tensor: "torch.tensor", torch.as_tensor: "torch.as_tensor",
            torch.asarray: "torch.asarray"}
_ONE_HOT = torch.nn.functional.one_hot
_aten = torch.ops.aten
_DYNAMIC = {_aten.nonzero, _aten.masked_select, _aten._unique, _aten._unique2, _aten.unique_dim,
            _aten.unique_consecutive, _aten.unique_dim_consecutive, _aten.bincount,
            _aten.argwhere}
_SCALAR_ATEN = {_aten._local_scalar_dense, _aten.is_nonzero, _aten.equal}
#: aten ops that launch no kernel (metadata, allocation, aliasing), besides `is_view` ops
_NO_KERNEL = {_aten.empty, _aten.empty_strided, _aten.empty_like, _aten.lift_fresh,
              _aten.lift_fresh_copy, _aten.detach, _aten.alias, _aten.resize_, _aten.set_,
              _aten.sym_size, _aten.sym_stride, _aten.sym_numel, _aten.sym_storage_offset,
              _aten.is_same_size, _aten._has_compatible_shallow_copy_type, _aten.size, _aten._unsafe_view,
              _aten._reshape_alias,
              _aten.stride, _aten.numel, _aten.dim, _aten.is_contiguous,
              # profiler range markers (torch.profiler.record_function), not kernels
              torch.ops.profiler._record_function_enter_new, torch.ops.profiler._record_function_exit}


def _where(limit: int = 1) -> str:
    """The innermost `limit` frames of ltframe/ or plugins/ (not this file) as 'file:line (fn)',
    preceded by the innermost frame outside torch, the standard library and this file when that
    one is not in the project (a test, a third-party plugin)."""
    out: list[str] = []
    other = ""
    f = sys._getframe(1)
    while f is not None and len(out) < limit:
        name = f.f_code.co_filename
        if name.startswith(_PROJECT_DIRS) and name != _OWN_FILE:
            out.append(f"{os.path.relpath(name, _ROOT)}:{f.f_lineno} ({f.f_code.co_name})")
        elif (not out and not other and name != _OWN_FILE and not name.startswith(_SKIP_DIRS)
              and not name.startswith("<")):
            other = f"{os.path.relpath(name, _ROOT)}:{f.f_lineno} ({f.f_code.co_name})"
        f = f.f_back
    return " < ".join([other, *out] if other else out) or "?"


@dataclass(frozen=True)
class SyncRecord:
    """One operation that would block the host on a GPU (or, kind h2d_async, copy pageable
    memory)."""

    kind: str
    op: str
    where: str
    range: str = ""
    step: int | None = None
    detail: str = ""

    def line(self) -> str:
        rng = f" [{self.range}]" if self.range else ""
        det = f" {self.detail}" if self.detail else ""
        return f"{self.kind:13s} {self.op:28s} {self.where}{rng}{det}"


class SyncError(RuntimeError):
    """Raised by `SyncProbe(raise_on_sync=True)` at the first sync."""

    def __init__(self, record: SyncRecord) -> None:
        super().__init__(f"host<->device sync: {record.line()}")
        self.record = record


class Ranges:
    """A stack of named ranges ('data', 'forward', ...); `current` is the joined path."""

    def __init__(self) -> None:
        self._stack: list[str] = []

    @contextlib.contextmanager
    def range(self, name: str) -> Iterator[None]:
        self._stack.append(name)
        try:
            yield
        finally:
            self._stack.pop()

    @property
    def current(self) -> str:
        return "/".join(self._stack)


def _tensors(args: Any, kwargs: Any = None) -> list[torch.Tensor]:
    """Tensors in `args` (nested lists / tuples) and `kwargs` values; dicts among the
    positional arguments (e.g. deepcopy's memo) are not searched."""
    out: list[torch.Tensor] = []
    stack = [args, *(kwargs.values() if kwargs else ())]
    while stack:
        a = stack.pop()
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            stack.extend(a)
    return out


def _device_target(dev: Any) -> bool | None:
    """True: the run's device, False: the host, None: no device given."""
    if dev is None:
        return None
    if isinstance(dev, str):
        return not dev.startswith("cpu")
    return True  # torch.device / index: the run's device (on a CPU run that is 'cpu' too)


class _FunctionSide(TorchFunctionMode):
    def __init__(self, probe: SyncProbe) -> None:
        super().__init__()
        self.p = probe

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        return self.p._on_function(func, args, kwargs or {})


class _DispatchSide(TorchDispatchMode):
    def __init__(self, probe: SyncProbe) -> None:
        super().__init__()
        self.p = probe

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        return self.p._on_dispatch(func, args, kwargs or {})


class SyncProbe:
    """Record (or raise on) host<->device syncs of "device tensors" on a CPU.

    with SyncProbe(model, images) as probe:   # params/buffers and images are device tensors
        ...                                    # probe.records, probe.syncs()
    `recording` can be switched off to keep tracking tensors without recording (set-up,
    logging, evaluation); `step` and `ranges` label the records.
    """

    def __init__(self, *device: Any, raise_on_sync: bool = False, recording: bool = True,
                 ranges: Ranges | None = None) -> None:
        self.raise_on_sync = raise_on_sync
        self.recording = recording
        self.ranges = ranges
        self.step: int | None = None
        self.records: list[SyncRecord] = []
        self._dev = WeakTensorKeyDictionary()
        self._tls = threading.local()
        self._modes: list[Any] = []
        self.mark_device(*device)

    # --- tags -------------------------------------------------------------------------------
    def mark_device(self, *objs: Any) -> None:
        """Tag tensors (or the parameters and buffers of modules, or tensors in containers)
        as device tensors."""
        for obj in objs:
            if isinstance(obj, torch.nn.Module):
                for t in [*obj.parameters(), *obj.buffers()]:
                    self._dev[t] = True
            elif isinstance(obj, torch.Tensor):
                self._dev[obj] = True
            else:
                for t in _tensors(list(obj.values()) if isinstance(obj, dict) else obj):
                    self._dev[t] = True

    def is_device(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t in self._dev

    def syncs(self) -> list[SyncRecord]:
        """Records that are syncs (not the informational h2d_async)."""
        return [r for r in self.records if r.kind in SYNC_KINDS]

    # --- context ----------------------------------------------------------------------------
    def __enter__(self) -> SyncProbe:
        self._modes = [_DispatchSide(self), _FunctionSide(self)]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
        self._modes = []

    def _state(self) -> threading.local:
        s = self._tls
        if not hasattr(s, "ctx"):
            s.ctx, s.reported, s.quiet = [], 0, 0
        return s

    def _record(self, kind: str, op: str, detail: str = "") -> None:
        s = self._state()
        if not self.recording or s.quiet:
            return
        rec = SyncRecord(kind, op, _where(), self.ranges.current if self.ranges else "",
                         self.step, detail)
        self.records.append(rec)
        if self.raise_on_sync and kind in SYNC_KINDS:
            raise SyncError(rec)

    def _copy(self, t: torch.Tensor, device: bool) -> torch.Tensor:
        """A copy of `t` tagged as `device` (what a real transfer returns)."""
        s = self._state()
        s.quiet += 1
        try:
            out = t.clone()
        finally:
            s.quiet -= 1
        if device:
            self._dev[out] = True
        else:
            self._dev.pop(out, None)
        return out

    # --- Python-level entry points ----------------------------------------------------------
    def _on_function(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        s = self._state()
        ins = _tensors(args, kwargs)
        on_dev = any(t in self._dev for t in ins)
        name = getattr(func, "__name__", str(func))
        if func in (_T.to, _T.cuda, _T.cpu, _T.copy_, _T.numpy, _T.new_tensor) or func in _NEW_FNS:
            return self._on_move(func, args, kwargs, on_dev)
        target = _device_target(kwargs.get("device"))
        if on_dev:
            if func is _T.item:
                self._record("item", "Tensor.item")
            elif func is _T.tolist:
                self._record("tolist", "Tensor.tolist")
            elif func in _SCALAR_FNS and args and self.is_device(args[0]):
                self._record("scalar", f"Tensor.{name}", _SCALAR_FNS[func])
            elif func is _T.__array__:
                self._record("d2h", "Tensor.__array__")
        reported = func in (_T.item, _T.tolist, _T.__array__) or func in _SCALAR_FNS
        if func is _ONE_HOT and on_dev:  # its CPU kernel checks min/max with .item(); CUDA's
            reported = True  # does only without num_classes (to size the output)
            if (args[1] if len(args) > 1 else kwargs.get("num_classes", -1)) == -1:
                self._record("dynamic_shape", "one_hot", "num_classes = -1")
        s.ctx.append(on_dev or bool(target))
        s.reported += reported
        try:
            out = func(*args, **kwargs)
        finally:
            s.ctx.pop()
            s.reported -= reported
        if on_dev or target:
            self._tag(out, ins)
        return out

    def _tag(self, out: Any, ins: list[torch.Tensor]) -> None:
        """Tag the tensors of `out` as device tensors, except host inputs returned as they are
        (an in-place op on, or a no-op move of, a host tensor keeps it a host tensor)."""
        host_in = {id(t) for t in ins if t not in self._dev}
        for t in _tensors(out):
            if id(t) not in host_in:
                self._dev[t] = True

    def _on_move(self, func: Callable, args: tuple, kwargs: dict, on_dev: bool) -> Any:
        """.to / .cuda / .cpu / .numpy / copy_ / torch.tensor & co."""
        s = self._state()
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        src_dev = self.is_device(src)
        nb = bool(kwargs.get("non_blocking", False))
        if func is _T.to:
            target: bool | None = _device_target(kwargs.get("device"))
            for a in args[1:]:
                if isinstance(a, bool):
                    nb = a
                elif isinstance(a, (str, torch.device, int)):
                    target = _device_target(a)
                elif isinstance(a, torch.Tensor):
                    target = self.is_device(a)
            if "other" in kwargs:
                target = self.is_device(kwargs["other"])
        elif func is _T.cuda:
            target = True
        elif func in (_T.cpu, _T.numpy):
            target = False
        elif func is _T.copy_:
            dst, srct = args[0], args[1] if len(args) > 1 else kwargs["src"]
            nb = bool(args[2]) if len(args) > 2 else nb
            if self.is_device(dst) and not self.is_device(srct):
                self._record("h2d_async" if nb else "h2d", "Tensor.copy_",
                             f"{tuple(srct.shape)} {srct.dtype}")
            elif self.is_device(srct) and not self.is_device(dst):
                self._record("d2h", "Tensor.copy_")
            s.reported += 1
            try:
                return self._call(func, args, kwargs, self.is_device(dst))
            finally:
                s.reported -= 1
        else:  # torch.tensor / as_tensor / asarray / Tensor.new_tensor
            if func is _T.new_tensor:
                target = src_dev if kwargs.get("device") is None else _device_target(
                    kwargs["device"])
                data = args[1] if len(args) > 1 else kwargs.get("data")
            else:
                target = _device_target(kwargs.get("device"))
                data = args[0] if args else kwargs.get("data")
            data_dev = self.is_device(data) if isinstance(data, torch.Tensor) else any(
                self.is_device(t) for t in _tensors(data))
            if target and not data_dev:
                self._record("h2d_new", _NEW_FNS.get(func, "Tensor.new_tensor"), _shape(data))
            elif data_dev and target is False:
                self._record("d2h", _NEW_FNS.get(func, "Tensor.new_tensor"))
            out = self._call(func, args, kwargs, bool(target) or (data_dev and target is None))
            if out is data and isinstance(out, torch.Tensor) and target and not data_dev:
                out = self._copy(out, True)
            return out
        if target is None:  # a dtype / memory-format change: stays where it is
            return self._call(func, args, kwargs, src_dev)
        if target and not src_dev:
            self._record("h2d_async" if nb else "h2d", f"Tensor.{func.__name__}",
                         f"{tuple(src.shape)} {src.dtype}" if src is not None else "")
        elif src_dev and not target:
            self._record("d2h", f"Tensor.{func.__name__}")
        s.reported += 1
        try:
            out = self._call(func, args, kwargs, bool(target))
        finally:
            s.reported -= 1
        if out is src and target != src_dev:  # a real transfer makes a new tensor
            out = self._copy(out, bool(target))
        return out

    def _call(self, func: Callable, args: tuple, kwargs: dict, device: bool) -> Any:
        s = self._state()
        s.ctx.append(device)
        try:
            out = func(*args, **kwargs)
        finally:
            s.ctx.pop()
        if device:
            self._tag(out, _tensors(args, kwargs))
        return out

    # --- aten ops ---------------------------------------------------------------------------
    def _on_dispatch(self, func: Any, args: tuple, kwargs: dict) -> Any:
        s = self._state()
        ins = _tensors(args, kwargs)
        dev_in = [t for t in ins if t in self._dev]
        device = bool(dev_in) or (not ins and bool(s.ctx) and s.ctx[-1])
        if dev_in and not s.quiet:
            packet = func.overloadpacket
            host = [t for t in ins if t not in self._dev and t.dim() > 0]
            if host and not s.reported:
                self._record("h2d_mixed", str(packet.__name__),
                             ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in host[:3]))
            if packet in _SCALAR_ATEN and not s.reported:
                self._record("item", f"aten.{packet.__name__}")
            elif packet in _DYNAMIC or (packet is _aten.repeat_interleave
                                        and isinstance(args[0], torch.Tensor)
                                        and (len(args) < 2 or isinstance(args[1], torch.Tensor))):
                self._record("dynamic_shape", f"aten.{packet.__name__}")
            elif packet in (_aten.index, _aten.index_put, _aten.index_put_, _aten._index_put_impl_):
                idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
                if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                       for i in idx or ()):
                    self._record("dynamic_shape", f"aten.{packet.__name__}", "boolean mask")
        out = func(*args, **kwargs)
        if device:
            self._tag(out, ins)
        return out


def _shape(data: Any) -> str:
    if isinstance(data, torch.Tensor):
        return f"{tuple(data.shape)} {data.dtype}"
    if isinstance(data, (list, tuple)):
        return f"list[{len(data)}]"
    return type(data).__name__


# --- kernel-launch counter ------------------------------------------------------------------
class OpCounter(TorchDispatchMode):
    """Count aten ops that would launch kernels, per named range.

    with OpCounter() as c:
        with c.range("data"): ...
    c.counts: {range path: Counter(op name)}; `totals(depth=1)` sums by the top `depth`
    names of the path ('' = outside any range). Views, metadata ops and allocations are not
    counted; a `_foreach_*` op counts once (one multi-tensor kernel on a GPU, per chunk).
    `active` False pauses counting.
    """

    def __init__(self, ranges: Ranges | None = None) -> None:
        super().__init__()
        self.ranges = ranges or Ranges()
        self.counts: dict[str, Counter] = {}
        self.active = True

    def range(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self.ranges.range(name)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if self.active and not (func.is_view or func.overloadpacket in _NO_KERNEL):
            key = self.ranges.current
            self.counts.setdefault(key, Counter())[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def totals(self, depth: int = 1) -> dict[str, int]:
        out: Counter = Counter()
        for k, c in self.counts.items():
            out["/".join(k.split("/")[:depth]) if k else ""] += sum(c.values())
        return dict(out)

    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def reset(self) -> None:
        self.counts = {}


# --- a real training step under the probes --------------------------------------------------
@dataclass
class StepProbeResult:
    """What `probe_steps` saw in the probed steps."""

    records: list[SyncRecord]
    counts: dict[str, Counter]  # range path -> op counts, summed over the probed steps
    steps: int  # probed steps (steps per stage times stages)
    stages: list[str] = field(default_factory=list)

    def syncs(self, warmup: bool = True) -> list[SyncRecord]:
        """Sync records (kinds in SYNC_KINDS); `warmup` False drops each stage's first step."""
        return [r for r in self.records if r.kind in SYNC_KINDS
                and (warmup or not r.range.startswith("warmup"))]

    def by_location(self, kinds: frozenset[str] = SYNC_KINDS) -> Counter:
        return Counter((r.kind, r.op, r.where) for r in self.records if r.kind in kinds)

    def totals(self, depth: int = 2, warmup: bool = False) -> dict[str, float]:
        """Mean op counts per step by range path (its first `depth` names after the root);
        'step' is the step outside any range. `warmup` False: steady steps only (each
        stage's first step left out) when there are any."""
        out: Counter = Counter()
        steady = self.steps - len(self.stages)
        use_warmup = warmup or steady <= 0
        for k, c in self.counts.items():
            root, *parts = k.split("/")
            if root == "warmup" and not use_warmup:
                continue
            out["/".join(parts[:depth]) or "step"] += sum(c.values())
        n = max(self.steps if use_warmup else steady, 1)
        return {k: round(v / n, 1) for k, v in sorted(out.items())}

    def ops(self, prefix: str, warmup: bool = False) -> Counter:
        """Op names (summed over the probed steps) in ranges under `prefix` (e.g. 'data')."""
        out: Counter = Counter()
        for k, c in self.counts.items():
            root, _, rest = k.partition("/")
            if (warmup or root != "warmup") and (rest == prefix or rest.startswith(prefix + "/")):
                out.update(c)
        return out


def probe_steps(recipe_path: str | Path | None = None, overrides: list[str] | None = None, *,
                recipe: Any = None, out_dir: str | Path, steps: int = 3, stages: int = 1,
                raise_on_sync: bool = False, count_ops: bool = True, smoke: bool = False,
                foreach: bool = True,
                plugins: list[tuple[str, object]] | None = None) -> StepProbeResult:
    """Run a (small) recipe on the CPU with a `SyncProbe` and an `OpCounter` and return what
    they saw in the first `steps` steps of each of the first `stages` stages (the rest of a
    stage runs unprobed; `smoke` is `ltframe run --smoke`: two steps a stage, small batches).

    The probe covers `Trainer._step` and the `ltframe_step_end` hooks (everything from the
    step's start to `Trainer._after_step`); logging, epoch ends, evaluation and checkpoints
    (`_after_step`) are outside it. Each stage's first step is labelled 'warmup' (lazy
    one-time set-up lands there). Ranges (paths under 'step' / 'warmup'): data (with
    'view:<name>' per view), transform, forward (the training forward), forward_no_grad
    (teacher / guesses), pseudo_labeler, 'loss:<name>' per term, backward, optimizer, ema,
    accumulate, hooks (step-end hooks); the rest of the step is the root itself. The batch
    streams' index bookkeeping (`BatchStream.next`: host tensors, no kernels) is not counted.
    The run stops (KeyboardInterrupt, caught) at the first step after the probed stages; its
    run directory stays under `out_dir`. `foreach` sets the optimizer's `foreach` flag, so its
    ops are counted as on CUDA (torch's default there; on a CPU the default is a loop over the
    parameters).
    """
    from ltframe.data.samplers import BatchStream
    from ltframe.engine import trainer as tr
    from ltframe.engine.ema import EMA
    from ltframe.engine.run import start_run
    from ltframe.engine.stage_state import Accumulators
    from ltframe.errors import RunInterrupted

    ranges = Ranges()
    probe = SyncProbe(raise_on_sync=raise_on_sync, recording=False, ranges=ranges)
    counter = OpCounter(ranges) if count_ops else None
    if counter is not None:
        counter.active = False
    state = {"stage": -1, "n": 0, "total": 0, "stages": 0, "open": False}
    names: list[str] = []
    orig = {"step": tr.Trainer._step, "after": tr.Trainer._after_step,
            "setup": tr.Trainer._setup_stage,
            "gather": tr.Trainer._gather_inputs, "transformed": tr.Trainer._transformed,
            "fng": tr.forward_no_grad, "ema": EMA.update, "acc": Accumulators.add,
            "backward": torch.Tensor.backward, "next": BatchStream.next}

    def ranged(name: str, fn: Callable) -> Callable:
        def wrapper(*a: Any, **k: Any) -> Any:
            if not state["open"] or ranges._stack[-1:] == [name]:  # re-entered: one range
                return fn(*a, **k)
            with ranges.range(name):
                return fn(*a, **k)
        return wrapper

    def on_host(fn: Callable) -> Callable:  # host-side bookkeeping: no kernel is launched
        def wrapper(*a: Any, **k: Any) -> Any:
            active = counter is not None and counter.active
            if active:
                counter.active = False
            try:
                return fn(*a, **k)
            finally:
                if active:
                    counter.active = True
        return wrapper

    def push(name: str) -> None:  # hooks: must return None
        if state["open"]:
            ranges._stack.append(name)

    def pop() -> None:
        if state["open"] and len(ranges._stack) > 1:
            ranges._stack.pop()

    def close() -> None:
        if state["open"]:
            state["open"] = False
            probe.recording = False
            if counter is not None:
                counter.active = False
            ranges._stack.clear()

    def mark(trainer: Any, st: Any = None) -> None:
        stores = (trainer.data.train, trainer.data.test, trainer.data.val)
        probe.mark_device(trainer.model, *(s.images for s in stores
                                           if s is not None and getattr(s, "files", 1) is None))
        if st is not None:
            probe.mark_device(st.ema.module if st.ema else None, st.teacher)

    def setup(self: Any, *a: Any, **k: Any) -> Any:  # state built from the model is derived
        mark(self)
        return orig["setup"](self, *a, **k)

    def step(self: Any, st: Any, step_i: int, epoch: int) -> Any:
        if st.plan.index != state["stage"]:
            state.update(stage=st.plan.index, n=0)
            state["stages"] += 1
            names.append(st.plan.name)
        if state["stages"] > stages or (state["stages"] == stages and state["n"] >= steps):
            raise KeyboardInterrupt  # every stage asked for was probed: stop the run
        if state["n"] >= steps:  # the rest of a probed stage runs unprobed
            return orig["step"](self, st, step_i, epoch)
        state["n"] += 1
        state["total"] += 1
        mark(self, st)
        probe.step = step_i
        ranges._stack[:] = ["warmup" if state["n"] == 1 else "step"]
        state["open"] = True
        probe.recording = True
        if counter is not None:
            counter.active = True
        if foreach and st.optimizer is not None:
            for g in st.optimizer.param_groups:
                if "foreach" in g:
                    g["foreach"] = True
        views = st.views
        st.views = {split: [(v, ranged(f"view:{v}", fn)) for v, fn in vs]
                    for split, vs in views.items()}
        losses, labeler = st.losses, st.labeler
        st.losses = [(n, w, s, ranged(f"loss:{n}", t)) for n, w, s, t in losses]
        if labeler is not None:
            st.labeler = ranged("pseudo_labeler", labeler)
        hooks = [self.model.register_forward_pre_hook(lambda m, a: push("forward")),
                 self.model.register_forward_hook(lambda m, a, o: pop())]
        try:
            out = orig["step"](self, st, step_i, epoch)
        finally:
            st.views, st.losses, st.labeler = views, losses, labeler
            for h in hooks:
                h.remove()
        if state["open"]:
            ranges._stack[1:] = ["hooks"]
        return out

    def after(self: Any, st: Any, done: int, epoch: int) -> Any:
        close()
        return orig["after"](self, st, done, epoch)


    patches = [(tr.Trainer, "_step", step), (tr.Trainer, "_after_step", after),
               (tr.Trainer, "_setup_stage", setup),
               (tr.Trainer, "_gather_inputs", ranged("data", orig["gather"])),
               (tr.Trainer, "_transformed", ranged("transform", orig["transformed"])),
               (tr, "forward_no_grad", ranged("forward_no_grad", orig["fng"])),
               (EMA, "update", ranged("ema", orig["ema"])),
               (Accumulators, "add", ranged("accumulate", orig["acc"])),
               (torch.Tensor, "backward", ranged("backward", orig["backward"])),
               (BatchStream, "next", on_host(orig["next"]))]
    saved = [(obj, attr, obj.__dict__[attr]) for obj, attr, _ in patches]
    opt_hooks = [_optim.register_optimizer_step_pre_hook(lambda o, a, k: push("optimizer")),
                 _optim.register_optimizer_step_post_hook(lambda o, a, k: pop())]
    for obj, attr, new in patches:
        setattr(obj, attr, new)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(probe)
            if counter is not None:
                stack.enter_context(counter)
            try:
                start_run(recipe_path, overrides, recipe=recipe, out_dir=out_dir,
                          smoke=smoke, plugins=plugins)
            except RunInterrupted:
                pass
            finally:
                close()
    finally:
        for obj, attr, old in saved:
            setattr(obj, attr, old)
        for h in opt_hooks:
            h.remove()
    return StepProbeResult(probe.records, counter.counts if counter else {}, state["total"],
                           names[:stages])
