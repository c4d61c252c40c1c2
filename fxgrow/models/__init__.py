"""Model builders (timm classes) that return traced GraphModules carrying a rebuildable spec."""

__all__: list[str] = []
