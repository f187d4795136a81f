"""Batched inference over an image store and metric computation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ltframe.data.bundle import ImageStore
from ltframe.data.views import NoneParams, NoneView
from ltframe.eval.metrics import classification_metrics


@torch.no_grad()
def predict(model: nn.Module, store: ImageStore, index: Tensor, mean, std, batch_size: int,
            head: str, autocast: bool = False, channels_last: bool = False) -> Tensor:
    """Logits (float32, CPU) of `head` for the images at `index`."""
    view = NoneView(NoneParams(), mean, std)
    was_training = model.training
    model.eval()
    outs = []
    dev = store.device
    try:
        for start in range(0, index.numel(), batch_size):
            x = view(store.get(index[start:start + batch_size]))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                _, logits = model(x)
            outs.append(logits[head].float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.zeros(0)


def evaluate_logits(logits: Tensor, labels: Tensor, train_counts: Tensor, many: int,
                    few: int) -> dict:
    return classification_metrics(logits, labels.cpu(), train_counts.cpu(), many, few)


@torch.no_grad()
def extract_features(model: nn.Module, store: ImageStore, index: Tensor, mean, std,
                     batch_size: int) -> Tensor:
    """Backbone features (float32, CPU) of the un-augmented images at `index`."""
    view = NoneView(NoneParams(), mean, std)
    was_training = model.training
    model.eval()
    outs = []
    try:
        for start in range(0, index.numel(), batch_size):
            outs.append(model.features(view(store.get(index[start:start + batch_size]))).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.zeros(0)
