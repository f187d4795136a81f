"""Semi-supervised components (USB microsoft/Semi-supervised-learning and google-research/crest
as references; see each module):

- pseudo_labeler `threshold` (FixMatch), `align` (distribution alignment, CReST+ / ReMixMatch)
- loss `fixmatch`, `pseudo_label`, `mean_teacher` (unlabeled terms; the supervised term is
  another loss of the recipe, e.g. `ce`)
- transform + loss `mixmatch`

A FixMatch stage: data = "labeled+unlabeled", views.unlabeled = ["weak", "strong"],
pseudo_labeler = "threshold", loss = ["ce", {name = "fixmatch", weight = 1.0}], ema = 0.999.
"""

from __future__ import annotations

from ltframe import hookimpl
from ltframe.registry import Registry
from ltframe_ssl import labelers, losses, mixmatch

__version__ = "0.1.0"


@hookimpl
def ltframe_register(registry: Registry) -> None:
    for module in (labelers, losses, mixmatch):
        module.register(registry)
