"""RandAugment speed and op count: the float RandAugment views.py had before issue 19 (old: float
ops, every candidate op on the whole batch; read from git commit OLD_COMMIT, skipped without git)
vs ltframe.data.augment.rand_augment (new: uint8 LUTs, blends, one warp).

Batch 448 of 32x32 RGB uint8 (FixMatch's unlabeled batch, mu = 7 x 64). Prints ms per call (median
of --iters after --warmup calls) and the aten ops dispatched per call (TorchDispatchMode; "kernels"
leaves out view / metadata ops; "cuda-path" counts new's CUDA kernel sequence, i.e. without its CPU
fast paths). Old gets the float image in [0, 1] (as StrongView gives it), new
the uint8 batch; old draws from a CPU generator (as views.py does), new from one on --device.
On CUDA, new also runs once under torch.cuda.set_sync_debug_mode("error") (no host sync).

    .venv/bin/python benchmarks/augment_speed.py                     # CPU, n_ops 2 and 3
    .venv/bin/python benchmarks/augment_speed.py --device cuda --iters 200
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ltframe.data import augment as A

OLD_COMMIT = "6a17960"  # the last commit with views.py's float RandAugment


def old_rand_augment() -> Callable | None:
    """views.rand_augment as it was at OLD_COMMIT (imported from `git show`), or None."""
    try:
        src = subprocess.run(["git", "show", f"{OLD_COMMIT}:ltframe/data/views.py"], check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.mkdtemp()) / "old_views.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_views", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_views"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod.rand_augment

_VIEW_OPS = {"view", "_unsafe_view", "expand", "slice", "select", "unsqueeze", "squeeze", "t",
             "transpose", "permute", "as_strided", "detach", "alias", "reshape", "unbind", "split",
             "lift_fresh", "_to_copy_noop"}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched (all of them, and those that are not views / metadata)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def kernels(self) -> int:
        return sum(n for name, n in self.ops.items() if name not in _VIEW_OPS)


def count_ops(fn: Callable[[], object]) -> OpCounter:
    fn()  # warm the constant caches: steady-state count
    with OpCounter() as c:
        fn()
    return c


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=448)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--n-ops", default="2,3", help="comma-separated op counts")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, generator=g).to(dev)
    xf = u8.float() / 255
    cpu_gen = torch.Generator().manual_seed(1)
    dev_gen = torch.Generator(device=dev).manual_seed(1)
    print(f"device {dev} ({torch.get_num_threads()} CPU threads), batch {args.batch} x 3 x "
          f"{args.size} x {args.size}, median of {args.iters} calls")
    print(f"{'n_ops':>5}  {'impl':<4} {'ms/call':>9} {'aten ops':>9} {'kernels':>8} {'cuda-path':>9}")
    old = old_rand_augment()
    if old is None:
        print(f"(old implementation skipped: `git show {OLD_COMMIT}:ltframe/data/views.py` failed)")
    for n in (int(s) for s in args.n_ops.split(",")):
        impls = {"new": lambda n=n: A.rand_augment(u8, dev_gen, n)}
        if old is not None:
            impls = {"old": lambda n=n: old(xf, cpu_gen, n)} | impls
        for name, fn in impls.items():
            c = count_ops(fn)
            A.CPU_FAST_PATHS = False
            gpu_path = count_ops(fn).kernels
            A.CPU_FAST_PATHS = True
            ms = time_ms(fn, dev, args.warmup, args.iters)
            print(f"{n:>5}  {name:<4} {ms:>9.2f} {sum(c.ops.values()):>9} {c.kernels:>8} {gpu_path:>9}")
        if dev.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")
            try:
                impls["new"]()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            print(f"{n:>5}  new: no host sync (cuda sync debug mode 'error')")


if __name__ == "__main__":
    main()
