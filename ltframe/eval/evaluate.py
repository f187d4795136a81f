"""Batched inference over an image store and metric computation."""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from ltframe.data.bundle import ImageStore
from ltframe.data.views import NoneParams, NoneView
from ltframe.eval.metrics import SCALARS, classification_metrics

#: device memory of outputs held before they go to the host in one copy (the usual evaluation
#: holds all its logits: one transfer at the end)
HOLD_BYTES = 1 << 30


@functools.lru_cache(maxsize=16)
def _view(mean: tuple[float, ...], std: tuple[float, ...]) -> NoneView:
    """One normalising view per (mean, std): its device constants are made once, not at every
    evaluation."""
    return NoneView(NoneParams(), mean, std)


@torch.no_grad()
def _batched(model: nn.Module, store: ImageStore, index: Tensor, mean, std, batch_size: int,
             forward, autocast: bool = False, channels_last: bool = False) -> Tensor:
    """`forward(model, x)` over un-augmented batches of `index`, in eval mode; float32 CPU.

    No host <-> device sync per batch: the indices go to the device once, the outputs stay on
    the device and come to the host in one copy at the end (or per `HOLD_BYTES` of outputs)."""
    view = _view(tuple(float(v) for v in mean), tuple(float(v) for v in std)).to(store.device)
    modes = [m.training for m in model.modules()]  # frozen parts stay in eval mode afterwards
    model.eval()
    index = index.cpu()
    images = getattr(store, "images", None) if getattr(store, "files", None) is None else None
    on_device = images is not None and images.device == store.device
    idx_device = None
    if on_device and index.numel():
        cuda = store.device.type == "cuda"
        idx_device = (index.pin_memory() if cuda else index).to(store.device, non_blocking=True)
    host: list[Tensor] = []
    held: list[Tensor] = []
    held_bytes = 0
    try:
        for start in range(0, index.numel(), batch_size):
            if store.prefetches:  # file-backed: decode the next batch meanwhile
                store.prefetch(index[start + batch_size:start + 2 * batch_size])
            idx = index[start:start + batch_size]
            x = view(store.get(idx) if idx_device is None
                     else store.get(idx, idx_device[start:start + batch_size]))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(store.device.type, dtype=torch.bfloat16, enabled=autocast):
                held.append(forward(model, x).float())
            held_bytes += held[-1].numel() * 4
            if held_bytes >= HOLD_BYTES:
                host.append(torch.cat(held).cpu())
                held, held_bytes = [], 0
        if held:
            host.append(torch.cat(held).cpu())
    finally:
        for m, mode in zip(model.modules(), modes, strict=True):
            m.training = mode
    if not host:
        return torch.zeros(0)
    return host[0] if len(host) == 1 else torch.cat(host)


def predict(model: nn.Module, store: ImageStore, index: Tensor, mean, std, batch_size: int,
            head: str, autocast: bool = False, channels_last: bool = False) -> Tensor:
    """Logits (float32, CPU) of `head` for the images at `index`."""
    return _batched(model, store, index, mean, std, batch_size,
                    lambda m, x: m(x)[1][head], autocast, channels_last)


def extract_features(model: nn.Module, store: ImageStore, index: Tensor, mean, std,
                     batch_size: int) -> Tensor:
    """Backbone features (float32, CPU) of the un-augmented images at `index`."""
    return _batched(model, store, index, mean, std, batch_size, lambda m, x: m.features(x))


def adjust_logits(logits: Tensor, train_counts: Tensor, tau: float) -> Tensor:
    """Post-hoc logit adjustment, logits - tau * log(prior) (Menon et al. 2021, "Long-tail
    learning via logit adjustment"; google-research/google-research/logit_adjustment)."""
    if not tau:
        return logits
    counts = train_counts.cpu().double().clamp_min(1)
    return logits - tau * (counts / counts.sum()).log().float()


def evaluate_logits(logits: Tensor, labels: Tensor, train_counts: Tensor, many: int,
                    few: int, posthoc_tau: float | list[float] = 0.0,
                    prior_counts: Tensor | None = None, by: str = "count",
                    rank_sizes: tuple[int, ...] | list[int] = (3, 3)) -> dict:
    """Metrics of `logits`, adjusted post hoc by `posthoc_tau` (see `adjust_logits`) with the
    prior of `prior_counts` (default `train_counts`, which also defines many/medium/few).

    With a list of taus the first one gives the metrics and `rows` holds the main metrics of
    every tau (one row each, `posthoc_tau` included)."""
    taus = posthoc_tau if isinstance(posthoc_tau, list) else [posthoc_tau]
    counts = train_counts.cpu().long()
    prior = counts if prior_counts is None else prior_counts.cpu().long()
    results = [classification_metrics(adjust_logits(logits, prior, t), labels.cpu(), counts,
                                      many, few, by, rank_sizes) for t in taus]
    out = results[0]
    if isinstance(posthoc_tau, list):
        out["rows"] = [{"posthoc_tau": t, **{k: r[k] for k in SCALARS if k in r}}
                       for t, r in zip(taus, results, strict=True)]
    return out
