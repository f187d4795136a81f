"""Batched inference over an image store and metric computation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ltframe.data.bundle import ImageStore
from ltframe.data.views import NoneParams, NoneView
from ltframe.eval.metrics import SCALARS, classification_metrics


@torch.no_grad()
def _batched(model: nn.Module, store: ImageStore, index: Tensor, mean, std, batch_size: int,
             forward, autocast: bool = False, channels_last: bool = False) -> Tensor:
    """`forward(model, x)` over un-augmented batches of `index`, in eval mode; float32 CPU."""
    view = NoneView(NoneParams(), mean, std)
    modes = [m.training for m in model.modules()]  # frozen parts stay in eval mode afterwards
    model.eval()
    outs = []
    try:
        for start in range(0, index.numel(), batch_size):
            if store.prefetches:  # file-backed: decode the next batch meanwhile
                store.prefetch(index[start + batch_size:start + 2 * batch_size])
            x = view(store.get(index[start:start + batch_size]))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(store.device.type, dtype=torch.bfloat16, enabled=autocast):
                outs.append(forward(model, x).float().cpu())
    finally:
        for m, mode in zip(model.modules(), modes, strict=True):
            m.training = mode
    return torch.cat(outs) if outs else torch.zeros(0)


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
