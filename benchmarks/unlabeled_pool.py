"""A large folder of unlabeled images: scan time, resident memory and batch rate.

Writes N small JPEGs (once, into --dir), builds a run's data with
`[data] unlabeled = { name = "folder", root = DIR }` beside the built-in synthetic source, and
reads batches of unlabeled images the way a training stream does (prefetching the next one).
Prints the scan/build time, the resident memory before and after (the pool must stay on disk)
and images/s.

    .venv/bin/python benchmarks/unlabeled_pool.py --files 100000 --dir /tmp/pool
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_pool(root: Path, n: int, size: int) -> None:
    from PIL import Image

    have = sum(1 for _ in root.rglob("*.jpg")) if root.is_dir() else 0
    if have >= n:
        return
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (64, size, size, 3), generator=g, dtype=torch.uint8).numpy()
    for i in range(n):
        d = root / f"{i // 1000:04d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(base[i % 64]).save(d / f"{i:07d}.jpg", quality=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--dir", default="/tmp/ltframe_pool")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--batch", type=int, default=448)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    root = Path(a.dir)
    t = time.perf_counter()
    write_pool(root, a.files, a.size)
    print(f"pool: {a.files} files under {root} ({time.perf_counter() - t:.1f} s to write/check)")

    from ltframe.config import from_dict
    from ltframe.data.bundle import build_bundle
    from ltframe.plugins import make_plugin_manager
    from ltframe.recipe import DataCfg

    registry = make_plugin_manager()[1]
    cfg = from_dict(DataCfg, {"source": {"name": "synthetic", "image_size": a.size},
                              "unlabeled": {"name": "folder", "root": str(root)},
                              "workers": a.workers}, "data", registry.spec)
    before = rss_mb()
    t = time.perf_counter()
    src = registry.build(cfg.source, seed=0)
    extra = registry.build(cfg.unlabeled, seed=0, unlabeled=True, image_size=a.size)
    bundle = build_bundle(src, cfg, 0, torch.device("cpu"), unlabeled=extra)
    built = time.perf_counter() - t
    after = rss_mb()
    print(f"build: {built:.1f} s; unlabeled split {bundle.splits.unlabeled.numel()} images; "
          f"resident memory {before:.0f} -> {after:.0f} MB (decoded pool would be "
          f"{bundle.splits.unlabeled.numel() * 3 * a.size ** 2 / 2 ** 20:.0f} MB)")
    g = torch.Generator().manual_seed(0)
    pool = bundle.splits.unlabeled
    batches = [pool[torch.randint(0, pool.numel(), (a.batch,), generator=g)] for _ in range(a.batches + 1)]
    t = time.perf_counter()
    for i in range(a.batches):
        bundle.train.prefetch(batches[i + 1])
        x = bundle.train.get(batches[i])
        assert x.shape == (a.batch, 3, a.size, a.size)
    dt = time.perf_counter() - t
    print(f"read: {a.batches} batches of {a.batch} in {dt:.1f} s = {a.batches * a.batch / dt:.0f} "
          f"images/s ({a.workers} workers); resident memory now {rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
