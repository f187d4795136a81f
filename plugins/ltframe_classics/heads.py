"""Classifier heads: linear, cosine, LWS, tau-norm, NCM.

Decoupling heads follow Kang et al. 2020, "Decoupling Representation and Classifier for
Long-Tailed Recognition" (facebookresearch/classifier-balancing). Heads with a
``fit(train_feats, train_labels, val_feats, val_labels)`` method are fitted by the engine at the
end of a stage that lists them in ``fit`` (NCM class means, tau-norm's tau search).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ltframe.config import param
from ltframe.registry import Registry

#: a head's width (outputs, hidden units) is at most this
MAX_WIDTH = 2**20


@dataclass
class LinearParams:
    bias: bool = True
    out_features: int = param(0, ge=0, le=MAX_WIDTH)  # 0 = the classes (4: a rotation head)


def linear(p: LinearParams, in_features: int, num_classes: int) -> nn.Module:
    """A linear classifier W f + b."""
    return nn.Linear(in_features, p.out_features or num_classes, bias=p.bias)


@dataclass
class MLPParams:
    hidden: int = param(0, ge=0, le=MAX_WIDTH)  # 0 = in_features
    out_features: int = param(128, ge=1, le=MAX_WIDTH)


def mlp(p: MLPParams, in_features: int, num_classes: int) -> nn.Module:
    """Projection MLP Linear-ReLU-Linear (MoCo v2's head, Chen et al. 2020)."""
    hidden = p.hidden or in_features
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, p.out_features))


@dataclass
class CosineParams:
    scale: float = param(1.0, gt=0)  # LDAM applies its own s = 30; use ~16 with plain CE


class CosineHead(nn.Module):
    """Normalised linear layer: s * cos(f, w_c) (LDAM's NormedLinear, kaidic/LDAM-DRW)."""

    def __init__(self, p: CosineParams, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.scale = p.scale
        self.weight = nn.Parameter(torch.empty(in_features, num_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.weight.data.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0)


class Scale(nn.Module):
    """One learnable scale per class (initialised to 1)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_classes))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


@dataclass
class LWSParams:
    bias: bool = True
    cosine: bool = False  # a cosine classifier under the scales (for LDAM representations)


class LWSHead(nn.Module):
    """Learnable weight scaling: f_c * (w_c . x + b_c). Train `fc` in the representation
    stage and only `scale` (train = ["heads.main.scale"]) in the classifier stage."""

    def __init__(self, p: LWSParams, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = (CosineHead(CosineParams(), in_features, num_classes) if p.cosine
                   else nn.Linear(in_features, num_classes, bias=p.bias))
        self.scale = Scale(num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale(self.fc(x))


@dataclass
class TauNormParams:
    tau: float = param(1.0, ge=0)
    search_min: float = param(0.0, ge=0)  # fit() searches tau on the val split: linspace(min, max, n)
    search_max: float = param(2.0, ge=0)
    search_steps: int = param(21, ge=1, le=10_000)
    bias: bool = True  # the trained layer's bias (not used by the normalised logits)

    def __post_init__(self) -> None:
        if self.search_min > self.search_max:
            raise ValueError(f"search_min = {self.search_min} is above search_max = "
                             f"{self.search_max}; the tau search runs from min to max")


class TauNormHead(nn.Module):
    """tau-normalised classifier: logits = (w_c / ||w_c||^tau) . x, no bias. `fit` picks tau
    with the best validation accuracy (the training split when there is no val split)."""

    def __init__(self, p: TauNormParams, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.p = p
        self.fc = nn.Linear(in_features, num_classes, bias=p.bias)
        self.register_buffer("tau", torch.tensor(float(p.tau)))
        self.register_buffer("normalise", torch.tensor(False))

    def logits_with(self, x: Tensor, tau: Tensor | float) -> Tensor:
        w = self.fc.weight
        return x @ (w / w.norm(dim=1, keepdim=True).clamp_min(1e-12).pow(tau)).t()

    def forward(self, x: Tensor) -> Tensor:
        if bool(self.normalise):
            return self.logits_with(x, self.tau)
        return self.fc(x)

    @torch.no_grad()
    def fit(self, feats: Tensor, labels: Tensor, val_feats: Tensor | None,
            val_labels: Tensor | None) -> dict:
        x, y = (val_feats, val_labels) if val_feats is not None else (feats, labels)
        x, y = x.to(self.fc.weight.device), y.to(self.fc.weight.device)
        grid = torch.linspace(self.p.search_min, self.p.search_max, self.p.search_steps)
        accs = []
        for tau in grid.tolist():
            pred = self.logits_with(x, tau).argmax(1)
            recall = [(pred[y == c] == c).float().mean() for c in y.unique()]
            accs.append(torch.stack(recall).mean().item())
        best = int(torch.tensor(accs).argmax())
        self.tau.fill_(grid[best].item())
        self.normalise.fill_(True)
        return {"tau": float(grid[best]), "val_balanced_acc": 100 * accs[best]}


@dataclass
class NCMParams:
    pass


class NCMHead(nn.Module):
    """Nearest class mean: centre by the training mean, L2-normalise, logits = -distance to
    each class mean (computed by `fit` from training features)."""

    def __init__(self, p: NCMParams, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("means", torch.zeros(num_classes, in_features))
        self.register_buffer("center", torch.zeros(in_features))

    def _norm(self, x: Tensor) -> Tensor:
        return F.normalize(x - self.center, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return -torch.cdist(self._norm(x), self.means)

    @torch.no_grad()
    def fit(self, feats: Tensor, labels: Tensor, val_feats: Tensor | None = None,
            val_labels: Tensor | None = None) -> dict:
        feats = feats.to(self.means.device)
        labels = labels.to(self.means.device)
        self.center.copy_(feats.mean(0))
        z = self._norm(feats)
        sums = torch.zeros_like(self.means).index_add_(0, labels, z)
        counts = torch.bincount(labels, minlength=self.means.shape[0]).clamp_min(1)
        self.means.copy_(sums / counts[:, None])
        return {"classes_fitted": int((torch.bincount(labels) > 0).sum())}


def register(registry: Registry) -> None:
    registry.register("head", "linear", linear, LinearParams)
    registry.register("head", "mlp", mlp, MLPParams)
    registry.register("head", "cosine", CosineHead, CosineParams, aliases=("normed_linear",))
    registry.register("head", "lws", LWSHead, LWSParams)
    registry.register("head", "tau_norm", TauNormHead, TauNormParams)
    registry.register("head", "ncm", NCMHead, NCMParams)
