"""Semi-supervised components (placeholder while the plugin is written)."""

from ltframe.hookspecs import hookimpl


@hookimpl
def ltframe_register(registry):
    pass
