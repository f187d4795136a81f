"""Images/s of the file-backed image pipeline (ImageNet-LT / iNaturalist through `listfile` or
`imagefolder` with in_memory = false), issue 10.

Writes a folder of JPEGs (default 512 images of 320 x 256, like resized ImageNet photos), then:

  decode    `ImageStore.get` throughput (decode + resize to `--size`) for several
            `data.workers` values (0 = in the calling thread);
  overlap   a loop of batches where each "step" takes `--step-ms` of non-Python work (a sleep,
            which releases the GIL as a GPU step does): without prefetching a batch costs
            decode + step, with the engine's prefetch (the next batch decodes during the step)
            about max(decode, step).

    .venv/bin/python benchmarks/jpeg_pipeline.py
    .venv/bin/python benchmarks/jpeg_pipeline.py --images 2048 --workers 0,4,8,16 --step-ms 100
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ltframe.data.bundle import ImageStore
from ltframe.data.sources import FileImages


def write_jpegs(root: Path, n: int, w: int = 320, h: int = 256) -> list[str]:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    paths = []
    base = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
    for i in range(n):
        arr = (base.int() + 7 * i).remainder(256).to(torch.uint8)  # photo-sized, distinct files
        p = root / f"{i:05d}.jpg"
        Image.fromarray(arr.numpy()).save(p, quality=90)
        paths.append(str(p))
    return paths


def decode_rate(paths: list[str], size: int, workers: int, batch: int) -> float:
    store = ImageStore(FileImages(paths, size), torch.device("cpu"), False, workers)
    t = time.perf_counter()
    for s in range(0, len(paths), batch):
        store.get(torch.arange(s, min(s + batch, len(paths))))
    return len(paths) / (time.perf_counter() - t)


def overlap_rate(paths: list[str], size: int, workers: int, batch: int, step_s: float,
                 prefetch: bool) -> float:
    store = ImageStore(FileImages(paths, size), torch.device("cpu"), False, workers)
    batches = [torch.arange(s, min(s + batch, len(paths))) for s in range(0, len(paths), batch)]
    t = time.perf_counter()
    for k, idx in enumerate(batches):
        store.get(idx)
        if prefetch and k + 1 < len(batches):
            store.prefetch(batches[k + 1])
        time.sleep(step_s)  # the training step
    return len(paths) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", default="0,2,4,8")
    ap.add_argument("--step-ms", type=float, default=0.0,
                    help="simulated step (0: the time decoding one batch takes with the most workers)")
    args = ap.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.images)
        print(f"{args.images} JPEGs 320x256 -> {args.size}px, batch {args.batch}, "
              f"{torch.get_num_threads()} torch threads")
        decode_rate(paths, args.size, max(workers), args.batch)  # warm the page cache
        rates = {}
        for w in workers:
            rates[w] = decode_rate(paths, args.size, w, args.batch)
            print(f"decode   workers={w:<3d} {rates[w]:8.1f} images/s", flush=True)
        w = max(workers)
        step = args.step_ms / 1000 or args.batch / rates[w]
        for pre in (False, True):
            r = overlap_rate(paths, args.size, w, args.batch, step, pre)
            print(f"overlap  workers={w:<3d} step {step * 1000:.0f} ms, prefetch={str(pre):<5} "
                  f"{r:8.1f} images/s", flush=True)


if __name__ == "__main__":
    main()
