"""CIFAR backbones with several branches, registered into timm's registry (so `[model] backbone`
names them and timm's loader reads exported files), each a feature extractor whose output is
the concatenation of its branches' pooled features:

- `resnet32_two_branch`: ResNet-32 whose last residual block is duplicated into two parallel
  blocks after a shared trunk (stem, 5 + 5 + 4 blocks); features [f_1 ; f_2], 2 x 64 = 128.
  BBN's `bbn_res32_cifar` (megvii-research/BBN lib/backbone/resnet_cifar.py BBN_ResNet_Cifar:
  conventional `cb_block` = branch 1, re-balancing `rb_block` = branch 2), which TDE's CIFAR
  ResNet-32 also is (KaihuaTang/Long-Tailed-Recognition.pytorch models/ResNet32Feature.py:
  the 128 features its causal-norm classifier splits into two heads).
- `resnet32_experts`: RIDE's multi-expert ResNet-32 (frank-xwang/RIDE-LongTailRecognition
  model/ldam_drw_resnets/ride_resnet_cifar.py ResNet_s): stem + layer1 shared, layer2 and layer3
  per expert (`reduce_dimension = true`: 24 / 48 channels, else 32 / 64); features
  [f_1 ; ... ; f_K], K x 48. A head over chunks of the features (`experts`) gives each
  expert its classifier.
- `resnet34_cifar`: weight balancing's CIFAR ResNet-34 (ShadeAlsha/LTR-weight-balancing
  utils/network_arch_resnet.py ResnetEncoder(34)): torchvision's ResNet-34 with a 3x3 stride-1
  stem and no max-pool (its forward skips it), 512 features (timm's ResNet class, no zero-init
  of the last BatchNorm, as torchvision's default).

Option-A (zero-pad) shortcuts and Kaiming-normal initialisation as LDAM-DRW's ResNet-32
(ltframe.models.cifar.ResNetCifar). `branch_features(feats, k, n)` cuts branch k's features.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import Tensor

from ltframe.errors import RecipeError
from ltframe.models.cifar import _BasicBlockA, _cfg, _TimmClassifierMixin
from ltframe.registry import Registry
from ltframe_ltbase.branches import MAX_BRANCHES, branch_features  # noqa: F401


def _layer(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
    return nn.Sequential(*[_BasicBlockA(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                           for i in range(blocks)])


def _kaiming(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)


class TwoBranchResNetCifar(_TimmClassifierMixin):
    """ResNet-(6n+2), last block duplicated: features [branch 1 ; branch 2] (BBN / TDE)."""

    def __init__(self, depth: int = 32, num_classes: int = 10, in_chans: int = 3, **_: object) -> None:
        super().__init__()
        n = (depth - 2) // 6
        if n < 2:
            raise RecipeError(f"model.backbone_args.depth = {depth}: the two-branch ResNet needs "
                              "depth >= 14 (6n + 2, n >= 2)")
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layers = nn.Sequential(_layer(16, 16, n, 1), _layer(16, 32, n, 2), _layer(32, 64, n - 1, 2))
        self.branch1 = _BasicBlockA(64, 64, 1)
        self.branch2 = _BasicBlockA(64, 64, 1)
        self.num_branches = 2
        self.num_features = 128
        self._make_fc(num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        _kaiming(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """The two branches' maps, concatenated on channels (pooled by forward_head)."""
        trunk = self.layers(F.relu(self.bn1(self.conv1(x))))
        return torch.cat([self.branch1(trunk), self.branch2(trunk)], dim=1)


class MultiExpertResNetCifar(_TimmClassifierMixin):
    """ResNet-(6n+2) with shared stem + layer1 and per-expert layer2 / layer3 (RIDE)."""

    def __init__(self, depth: int = 32, num_classes: int = 10, in_chans: int = 3,
                 num_experts: int = 3, reduce_dimension: bool = True, **_: object) -> None:
        super().__init__()
        n = (depth - 2) // 6
        if n < 1 or not 1 <= int(num_experts) <= MAX_BRANCHES:
            raise RecipeError(f"model.backbone_args: depth = {depth} (>= 8) and num_experts = "
                              f"{num_experts} (1 to {MAX_BRANCHES}) for resnet32_experts")
        w2, w3 = (24, 48) if reduce_dimension else (32, 64)
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = _layer(16, 16, n, 1)
        self.layer2s = nn.ModuleList([_layer(16, w2, n, 2) for _ in range(num_experts)])
        self.layer3s = nn.ModuleList([_layer(w2, w3, n, 2) for _ in range(num_experts)])
        self.num_branches = int(num_experts)
        self.num_features = w3 * self.num_branches
        self._make_fc(num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        _kaiming(self)

    def forward_features(self, x: Tensor) -> Tensor:
        shared = self.layer1(F.relu(self.bn1(self.conv1(x))))
        return torch.cat([l3(l2(shared)) for l2, l3 in zip(self.layer2s, self.layer3s, strict=True)],
                         dim=1)


class ResNet34Cifar(ResNet):
    """ResNet-34 for 32x32 inputs: 3x3 stride-1 stem, no max-pool."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, **kwargs: object) -> None:
        kwargs = {k: v for k, v in kwargs.items() if k in ("drop_rate", "drop_path_rate")}
        super().__init__(BasicBlock, (3, 4, 6, 3), num_classes=num_classes, in_chans=in_chans,
                         zero_init_last=False, **kwargs)
        self.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()


default_cfgs = generate_default_cfgs({"resnet32_two_branch": _cfg(), "resnet32_experts": _cfg(),
                                      "resnet34_cifar": _cfg()})


@register_model
def resnet32_two_branch(pretrained: bool = False, **kwargs) -> TwoBranchResNetCifar:
    """ResNet-32 with a duplicated last block (BBN's bbn_res32_cifar, TDE's ResNet-32)."""
    return build_model_with_cfg(TwoBranchResNetCifar, "resnet32_two_branch", pretrained,
                                **{"depth": 32, **kwargs})


@register_model
def resnet32_experts(pretrained: bool = False, **kwargs) -> MultiExpertResNetCifar:
    """RIDE's multi-expert ResNet-32 (3 experts, 24 / 48 channels by default)."""
    return build_model_with_cfg(MultiExpertResNetCifar, "resnet32_experts", pretrained,
                                **{"depth": 32, **kwargs})


@register_model
def resnet34_cifar(pretrained: bool = False, **kwargs) -> ResNet34Cifar:
    """ResNet-34 with a CIFAR stem (weight balancing's backbone)."""
    return build_model_with_cfg(ResNet34Cifar, "resnet34_cifar", pretrained, **kwargs)


def register(registry: Registry) -> None:
    """Nothing to add to the registry: importing this module registered the timm models."""
