"""Models: timm backbones (plus CIFAR backbones registered into timm) and named heads."""

from ltframe.models import cifar  # noqa: F401  (registers wrn28_2, wrn28_8, resnet32_cifar)
from ltframe.models.model import LTModel, build_backbone

__all__ = ["LTModel", "build_backbone"]
