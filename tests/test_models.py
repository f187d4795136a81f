"""CIFAR backbones registered into timm, and the backbone + heads model."""

import pytest
import timm
import torch

import ltframe  # noqa: F401  (registers the CIFAR backbones)
from ltframe.errors import RecipeError
from ltframe.models import LTModel, build_backbone


@pytest.mark.parametrize("name, width, params_m", [
    ("resnet32_cifar", 64, (0.45, 0.48)),
    ("wrn28_2", 128, (1.45, 1.50)),
    ("wrn28_8", 512, (23.3, 23.5)),
])
def test_cifar_backbones_are_timm_models(name, width, params_m):
    assert timm.is_model(name)
    clf = timm.create_model(name, num_classes=7)
    n = sum(p.numel() for p in clf.parameters()) / 1e6
    assert params_m[0] < n < params_m[1] + 0.05, n
    feat = timm.create_model(name, num_classes=0)
    assert feat.num_features == width
    x = torch.randn(2, 3, 32, 32)
    assert feat(x).shape == (2, width) and clf(x).shape == (2, 7)


def test_model_with_named_heads_and_parts():
    backbone = build_backbone("resnet32_cifar")
    model = LTModel(backbone, {"main": torch.nn.Linear(64, 5), "aux": torch.nn.Linear(64, 5)})
    feats, logits = model(torch.randn(3, 3, 32, 32))
    assert feats.shape == (3, 64) and set(logits) == {"main", "aux"}
    before = model.heads.aux.weight.clone()
    model.reset("heads.aux")
    assert not torch.equal(before, model.heads.aux.weight)
    with pytest.raises(RecipeError, match="unknown model part 'heads.mian'.*did you mean 'heads.main'"):
        model.submodule("heads.mian")


def test_any_timm_backbone_and_unknown_names():
    b = build_backbone("resnet18")
    assert b.num_features == 512
    with pytest.raises(RecipeError, match="unknown timm model 'resnet33_cifar'.*resnet32_cifar"):
        build_backbone("resnet33_cifar")
