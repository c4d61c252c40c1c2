"""Parameter accounting."""

from __future__ import annotations

from torch import nn

__all__ = ["count_params", "params_by_module"]


def count_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``model``, each shared parameter counted once.

    With ``trainable_only``, parameters with ``requires_grad=False`` are left out."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def params_by_module(model: nn.Module, *, trainable_only: bool = False) -> dict[str, int]:
    """Parameter elements under every module path ('' for the whole model), descendants
    included; a parameter shared by several modules is counted under its first path only,
    so that the children of a module never add up to more than the module."""
    counts = {name: 0 for name, _ in model.named_modules()}
    for path, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        owner = path.rpartition(".")[0]
        parts = owner.split(".") if owner else []
        for depth in range(len(parts) + 1):
            key = ".".join(parts[:depth])
            counts[key] = counts.get(key, 0) + param.numel()
    return counts
