"""How pseudo-labelling, selection and evaluation time grow with the pool size (issue 10).

Synthetic logits rows (a pool of N unlabeled samples over C classes, long-tailed predictions)
go through what the engine does between stages and at evaluation, timed separately:

  softmax     probabilities of the pool (float32);
  threshold   the `threshold` pseudo-labeler's offline mode (hard labels, confidence >= 0.95);
  crest       CReST's per-class top-confidence selection (`crest_select`, alpha = 3);
  diagnostics per-class precision / recall of the kept labels against hidden labels;
  evaluate    top-1 / per-class recall / many-medium-few of N test rows (`evaluate_logits`).

Peak memory is reported as the growth of the process's maximum resident set (CPU) or
torch.cuda.max_memory_allocated (GPU) over the pool's own N x C float32 logits: a ratio near 2
to 3 means no float64 or extra N x C copies beyond the probabilities.

    .venv/bin/python benchmarks/scaling.py                         # 1e4, 1e5, 1e6 rows, C = 1000
    .venv/bin/python benchmarks/scaling.py --sizes 10000,100000 --classes 100
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Any

import torch

from ltframe.engine.context import PoolPredictions
from ltframe.eval.evaluate import evaluate_logits
from ltframe.eval.metrics import pseudo_label_metrics
from ltframe.plugins import make_plugin_manager


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _timed(device: str, fn: Any) -> tuple[Any, float]:
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t


def pool_logits(n: int, c: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Long-tailed hidden labels (exp profile, ratio 100) and logits that favour them."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    prior = torch.pow(0.01, torch.arange(c) / max(c - 1, 1))
    hidden = torch.multinomial(prior / prior.sum(), n, replacement=True, generator=g)
    logits = torch.randn(n, c, generator=g).mul_(1.5)
    logits[torch.arange(n), hidden] += 4.0
    return logits.to(device), hidden.to(device)


def measure(n: int, c: int, device: str) -> dict[str, Any]:
    _, reg = make_plugin_manager()
    logits, hidden = pool_logits(n, c, device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base = _peak_bytes(device)
    counts = torch.bincount(hidden, minlength=c).cpu()
    row: dict[str, Any] = {"rows": n, "classes": c}
    probs, row["softmax_s"] = _timed(device, lambda: logits.softmax(1))
    pool = PoolPredictions(index=torch.arange(n, device=device), probs=probs, num_classes=c,
                           class_counts=counts, stage_index=0, stage_name="bench", logits=logits)
    kw = dict(num_classes=c, class_counts=counts, num_samples=n, labeled_counts=counts, seed=0)
    thr = reg.build(reg.spec("pseudo_labeler", {"name": "threshold", "threshold": 0.95}, "b"), **kw)
    sel, row["threshold_s"] = _timed(device, lambda: thr.label_pool(pool))
    row["threshold_kept"] = int(sel.index.numel())
    crest = reg.build(reg.spec("pseudo_labeler", {"name": "crest_select"}, "b"), **kw)
    sel, row["crest_s"] = _timed(device, lambda: crest.label_pool(pool))
    row["crest_kept"] = int(sel.index.numel())

    def diag() -> dict:
        true, pl = hidden[sel.index].long(), sel.targets.long()
        conf = torch.bincount(true * c + pl, minlength=c * c).view(c, c)
        return pseudo_label_metrics(conf.cpu())

    _, row["diagnostics_s"] = _timed(device, diag)
    _, row["evaluate_s"] = _timed(device, lambda: evaluate_logits(
        logits, hidden, counts, 100, 20))
    logits_bytes = n * c * 4
    row["peak_over_logits"] = round((_peak_bytes(device) - base + logits_bytes) / logits_bytes, 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    cols = ("softmax_s", "threshold_s", "crest_s", "diagnostics_s", "evaluate_s")
    print(f"device: {args.device}, classes {args.classes}")
    print(f"{'rows':>9} " + " ".join(f"{k:>13}" for k in cols) + f" {'peak/logits':>12}")
    for n in (int(s) for s in args.sizes.split(",")):
        r = measure(n, args.classes, args.device)
        rows.append(r)
        print(f"{n:>9} " + " ".join(f"{r[k]:>13.3f}" for k in cols)
              + f" {r['peak_over_logits']:>12.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
