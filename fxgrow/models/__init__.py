"""Model builders (timm classes) that return traced GraphModules carrying a rebuildable spec."""

from .builders import BUILDERS, build, deit_small_reduced, tiny_vit, tiny_vit_reduced

__all__: list[str] = ["BUILDERS", "build", "deit_small_reduced", "tiny_vit", "tiny_vit_reduced"]
