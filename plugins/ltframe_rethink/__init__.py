"""Self-supervised pre-training (SSP) from Yang & Xu 2020, "Rethinking the Value of Labels for
Improving Class-Imbalanced Learning" (paper 001; YyzHarry/imbalanced-semi-self): a rotation
pretext task and MoCo v2 (with optional masking of same-label negatives, as SSD uses).

An SSP stage trains the backbone with a pretext head (e.g. `heads.rot`); later stages train
other heads from the pre-trained backbone and never use the pretext head again.
"""

from __future__ import annotations

from ltframe import hookimpl
from ltframe.registry import Registry
from ltframe_rethink import moco, rotation

__version__ = "0.1.0"


@hookimpl
def ltframe_register(registry: Registry) -> None:
    for module in (rotation, moco):
        module.register(registry)
