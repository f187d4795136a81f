"""What the multi-branch backbones share with the components, without importing timm."""

from __future__ import annotations

from torch import Tensor

#: branches / experts of one backbone at most
MAX_BRANCHES = 64


def branch_features(feats: Tensor, k: int, n: int) -> Tensor:
    """Branch k's columns of the concatenated features of an n-branch backbone."""
    width = feats.shape[1] // n
    return feats[:, k * width:(k + 1) * width]
