"""Classic supervised long-tailed components: losses, samplers and heads.

Losses (CE, focal, LDAM, logit-adjusted; CB / DRW re-weighting), samplers (random,
class-balanced / DRS, class-aware, square-root, progressive), heads (linear, cosine, LWS,
tau-norm, NCM) and the `decoupled` stage scheduler (cRT, LWS, tau-norm, NCM).
"""

from __future__ import annotations

from ltframe import hookimpl
from ltframe.registry import Registry
from ltframe_classics import decoupled, heads, losses, samplers

__version__ = "0.1.0"


@hookimpl
def ltframe_register(registry: Registry) -> None:
    for module in (losses, samplers, heads, decoupled):
        module.register(registry)
