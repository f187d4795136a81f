"""MoCo v2 (He et al. 2020; Chen et al. 2020, facebookresearch/moco) as a loss term.

The query is the projection head's output for one view; the key comes from a momentum copy of
backbone + projection head applied to a second view. Logits: [q.k, q.queue] / T, target 0.
`mask_same_label` removes queue entries that share the query's label from the negatives, as
SSD (paper 004, MCG-NJU/SSD-LT) does. The key encoder and queue are checkpointed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ltframe.config import param
from ltframe.data.views import Normalize, elsewhere, flip_pad_crop, on_generator_device, resized_crop
from ltframe.data.views import gray_expand as gray
from ltframe.engine.context import StepContext
from ltframe.engine.dist import gather_batch
from ltframe.registry import Registry


@dataclass
class MocoParams:
    head: str = param("proj", ref="any_head")  # projection head, e.g. { name = "mlp", out_features = 128 }
    query: str = param("labeled:moco", ref="part")  # part giving queries
    key: str = param("labeled:moco#1", ref="part")  # part whose *inputs* the momentum encoder embeds
    queue_size: int = param(65536, ge=1, le=2**24)  # negatives kept (MoCo v2: 65536)
    momentum: float = param(0.999, ge=0, le=1)  # momentum encoder's EMA decay
    temperature: float = param(0.2, gt=0)
    mask_same_label: bool = False  # SSD: drop negatives with the query's label


class _KeyEncoder(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


class MocoLoss:
    """InfoNCE against a momentum encoder and a queue of keys."""

    def __init__(self, params: MocoParams, num_classes: int, class_counts: Tensor) -> None:
        self.p = params
        self.encoder: _KeyEncoder | None = None
        self.queue: Tensor | None = None
        self.queue_labels: Tensor | None = None
        self.ptr = 0
        self._pending: dict | None = None

    def _setup(self, ctx: StepContext) -> None:
        model = ctx.model
        self.encoder = _KeyEncoder(copy.deepcopy(model.backbone),
                                   copy.deepcopy(model.heads[self.p.head])).train()
        for q in self.encoder.parameters():
            q.requires_grad_(False)
        dim = ctx.logits(self.p.query, self.p.head).shape[1]
        dev = ctx.logits(self.p.query, self.p.head).device
        self.queue = F.normalize(torch.randn(self.p.queue_size, dim, device=dev), dim=1)
        self.queue_labels = torch.full((self.p.queue_size,), -1, dtype=torch.long, device=dev)
        if self._pending is not None:
            self._apply(self._pending)
            self._pending = None

    @torch.no_grad()
    def _momentum_update(self, model: nn.Module) -> None:
        assert self.encoder is not None
        src = [*model.backbone.parameters(), *model.heads[self.p.head].parameters()]
        dst = list(self.encoder.parameters())
        torch._foreach_lerp_(dst, [s.detach() for s in src], 1 - self.p.momentum)

    def __call__(self, ctx: StepContext) -> Tensor:
        if self.encoder is None:
            self._setup(ctx)
        assert self.queue is not None and self.queue_labels is not None
        self._momentum_update(ctx.model)
        q = F.normalize(ctx.logits(self.p.query, self.p.head), dim=1)
        with torch.no_grad():
            k = F.normalize(self.encoder(ctx.inputs(self.p.key)).float(), dim=1)
        pos = (q * k).sum(1, keepdim=True)
        neg = q @ self.queue.clone().t()  # the queue is updated in place below
        labels = ctx.targets if ctx.targets is not None and ctx.targets.numel() == q.shape[0] \
            else torch.full((q.shape[0],), -1, dtype=torch.long, device=q.device)
        if self.p.mask_same_label:
            same = (labels[:, None] == self.queue_labels[None]) & (labels[:, None] >= 0)
            neg = neg.masked_fill(same, float("-inf"))
        logits = torch.cat([pos, neg], 1) / self.p.temperature
        loss = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
        self._enqueue(gather_batch(k), gather_batch(labels))  # every rank's keys (MoCo)
        return loss

    @torch.no_grad()
    def _enqueue(self, k: Tensor, labels: Tensor) -> None:
        assert self.queue is not None and self.queue_labels is not None
        n = k.shape[0]
        idx = (torch.arange(n, device=k.device) + self.ptr) % self.p.queue_size
        self.queue[idx] = k.to(self.queue.dtype)
        self.queue_labels[idx] = labels
        self.ptr = (self.ptr + n) % self.p.queue_size

    def state_dict(self) -> dict:
        if self.encoder is None:
            return self._pending or {}
        return {"encoder": self.encoder.state_dict(), "queue": self.queue,
                "queue_labels": self.queue_labels, "ptr": self.ptr}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if self.encoder is None:
            self._pending = state
        else:
            self._apply(state)

    def _apply(self, state: dict) -> None:
        assert self.encoder is not None and self.queue is not None
        self.encoder.load_state_dict(state["encoder"])
        self.queue.copy_(state["queue"])
        self.queue_labels.copy_(state["queue_labels"])
        self.ptr = int(state["ptr"])


@dataclass
class MocoViewParams:
    min_scale: float = param(0.2, gt=0, le=1)  # random resized crop scale range (min, 1)
    jitter: float = param(0.4, ge=0, le=1)  # brightness / contrast / saturation strength
    jitter_prob: float = param(0.8, ge=0, le=1)
    gray_prob: float = param(0.2, ge=0, le=1)
    flip: bool = True


class MocoView(Normalize):
    """MoCo v2 augmentation, batched: random resized crop, colour jitter, grayscale, flip."""

    def __init__(self, params: MocoViewParams, mean, std) -> None:
        super().__init__(mean, std)
        self.p = params

    def __call__(self, x: Tensor, gen: torch.Generator) -> Tensor:
        if elsewhere(gen, x):
            return on_generator_device(MocoView.__call__, self, x, gen)
        x = self.to_unit(x)
        b, dev = x.shape[0], x.device
        r = torch.rand(b, 8, generator=gen, device=dev)  # gen lives on the images' device
        x = resized_crop(x, r[:, :4], self.p.min_scale)
        on = (r[:, 4] < self.p.jitter_prob)[:, None, None, None]
        j = self.p.jitter
        fb, fc, fs = (1 + j * (torch.rand(3, b, generator=gen, device=dev) * 2 - 1))
        jit = (x * fb[:, None, None, None]).clamp(0, 1)
        m = gray(x).mean((1, 2, 3), keepdim=True)
        jit = (m + fc[:, None, None, None] * (jit - m)).clamp(0, 1)
        g = gray(jit)
        jit = (g + fs[:, None, None, None] * (jit - g)).clamp(0, 1)
        x = torch.where(on, jit, x)
        to_gray = (r[:, 5] < self.p.gray_prob)[:, None, None, None]
        x = torch.where(to_gray, gray(x), x)
        x = flip_pad_crop(x, gen, self.p.flip, 0, "reflect")
        return super().__call__(x)


def register(registry: Registry) -> None:
    registry.register("loss", "moco", MocoLoss, MocoParams)
    registry.register("view", "moco", MocoView, MocoViewParams)
