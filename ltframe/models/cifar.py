"""CIFAR backbones registered into timm's registry (`timm.create_model("wrn28_2")`).

- wrn28_2 / wrn28_8: Wide ResNet-28 as in FixMatch / CReST (pre-activation, leaky ReLU 0.1,
  BN momentum 0.001); reference: google-research/crest and USB's wrn.py.
- resnet32_cifar: ResNet-32 of He et al. with option-A (zero-pad) shortcuts, as used by
  LDAM-DRW (kaidic/LDAM-DRW) and paper 001 (YyzHarry/imbalanced-semi-self).
Each model follows timm's classifier contract: `num_classes=0` gives a feature extractor,
`num_features` is the feature width, `forward_features` / `forward_head` / `reset_classifier`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

__all__ = ["WideResNet", "ResNetCifar", "wrn28_2", "wrn28_8", "resnet32_cifar"]


class _TimmClassifierMixin(nn.Module):
    num_features: int
    num_classes: int

    def _make_fc(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self._make_fc(num_classes)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class _WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, act_first: bool, slope: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, momentum=0.001)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=0.001)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.act = nn.LeakyReLU(slope, inplace=True)
        self.equal = cin == cout and stride == 1
        self.short = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
        self.act_first = act_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.equal:
            out = self.conv1(self.act(self.bn1(x)))
        else:
            if self.act_first:
                x = self.act(self.bn1(x))
            out = self.conv1(x)
        out = self.conv2(self.act(self.bn2(out)))
        return out + (x if self.equal else self.short(x))


class WideResNet(_TimmClassifierMixin):
    """WRN-depth-width for 32x32 inputs (FixMatch variant)."""

    def __init__(self, depth: int = 28, width: int = 2, num_classes: int = 10,
                 leaky_slope: float = 0.1, in_chans: int = 3, **_: object) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        layers = []
        for g in range(3):
            for i in range(n):
                cin = widths[g] if i == 0 else widths[g + 1]
                stride = (1 if g == 0 else 2) if i == 0 else 1
                layers.append(_WideBlock(cin, widths[g + 1], stride, g == 0 and i == 0, leaky_slope))
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(widths[3], momentum=0.001)
        self.act = nn.LeakyReLU(leaky_slope, inplace=True)
        self.num_features = widths[3]
        self._make_fc(num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """FixMatch's WRN initialisation (also used when a stage resets the backbone)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.blocks(self.conv1(x))))


class _BasicBlockA(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = cout - cin if (stride != 1 or cin != cout) else 0
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x
        if self.pad or self.stride != 1:  # option A: subsample + zero-pad channels
            short = x[:, :, :: self.stride, :: self.stride]
            short = F.pad(short, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + short)


class ResNetCifar(_TimmClassifierMixin):
    """ResNet-(6n+2) for CIFAR with option-A shortcuts."""

    def __init__(self, depth: int = 32, num_classes: int = 10, in_chans: int = 3,
                 **_: object) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(_BasicBlockA(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.num_features = 64
        self._make_fc(num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """Kaiming-normal convolutions and linear layers (LDAM-DRW's resnet32)."""
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(F.relu(self.bn1(self.conv1(x))))


def _cfg() -> dict:
    """No published weights; `pretrained=True, pretrained_cfg_overlay=dict(file=...)` loads a
    local file (e.g. one written by `ltframe export`) through timm's own loader."""
    return {"url": "", "num_classes": 10, "input_size": (3, 32, 32), "first_conv": "conv1",
            "classifier": "fc", "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616)}


default_cfgs = generate_default_cfgs({"wrn28_2": _cfg(), "wrn28_8": _cfg(),
                                      "resnet32_cifar": _cfg()})


def _build(cls: type, variant: str, pretrained: bool, **kwargs) -> nn.Module:
    return build_model_with_cfg(cls, variant, pretrained, **kwargs)


@register_model
def wrn28_2(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-28-2 (1.5M parameters), the FixMatch/CReST/BMB CIFAR backbone."""
    return _build(WideResNet, "wrn28_2", pretrained, depth=28, width=2, **kwargs)


@register_model
def wrn28_8(pretrained: bool = False, **kwargs) -> WideResNet:
    """WRN-28-8, the wider FixMatch backbone for CIFAR-100."""
    return _build(WideResNet, "wrn28_8", pretrained, depth=28, width=8, **kwargs)


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs) -> ResNetCifar:
    """ResNet-32 for CIFAR (LDAM-DRW, paper 001)."""
    return _build(ResNetCifar, "resnet32_cifar", pretrained, depth=32, **kwargs)
