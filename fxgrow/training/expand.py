"""Optimizer state through ``widen`` and ``deepen`` (TripLe's "+m" and "-m").

An expansion pass replaces parameters by new tensors, so the old optimizer cannot keep
training the result (unlike growth, whose new parameters are added to the same optimizer:
:mod:`fxgrow.training.optim`). :func:`expand_optimizer` builds a new optimizer of the same
class and settings over the expanded model:

- every param group keeps its hyper-parameters (learning rate, weight decay, the
  ``initial_lr`` a scheduler set); a new parameter joins the group of the old parameter it
  was built from (:attr:`fxgrow.passes.ParamSource.group_of`), a shared parameter stays in
  its group;
- ``carry_state=True`` ("+m"): a shared parameter keeps its state; a new parameter gets the
  pass's own map (:meth:`fxgrow.passes.ParamSource.apply`) applied to its source's
  ``exp_avg`` and ``exp_avg_sq`` (and ``max_exp_avg_sq``), the source's step count, so the
  state is expanded by exactly the operator that expanded the weights, as TripLe does;
  zeroed or freshly initialised parameters (identity blocks) start without state;
- ``carry_state=False`` ("-m"): no state at all, as if the expanded model were new.

The map is the pass's (:func:`fxgrow.passes.expansion_map`); this module never re-derives
an operator.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import OptimizerError
from .optim import param_names

_MAPPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer")


def expand_optimizer(
    optimizer: torch.optim.Optimizer,
    old_model: nn.Module,
    new_model: fx.GraphModule,
    mapping: Mapping[str, Any] | None = None,
    *,
    carry_state: bool = True,
) -> torch.optim.Optimizer:
    """A new optimizer over ``new_model``, the result of ``widen`` or ``deepen`` applied to
    ``old_model`` which ``optimizer`` trained (see the module docstring).

    ``mapping`` defaults to :func:`fxgrow.passes.expansion_map` of ``new_model``. Every
    parameter of ``new_model`` ends in exactly one group.

    Raises:
        OptimizerError: a new parameter with no source in the map and not shared with the old
            model, a source the old optimizer does not hold, or optimizer state the map
            does not know how to expand.
    """
    if mapping is None:
        from ..passes import expansion_map

        mapping = expansion_map(new_model)
    old_names = param_names(old_model)
    old_by_name = {name: p for name, p in old_model.named_parameters(remove_duplicate=True)}
    group_of: dict[int, int] = {}
    for index, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            group_of[id(p)] = index
    new_groups: list[list[nn.Parameter]] = [[] for _ in optimizer.param_groups]
    state: dict[nn.Parameter, dict[str, Any]] = {}
    for name, param in new_model.named_parameters(remove_duplicate=True):
        if id(param) in old_names:  # shared with the old model
            index = group_of.get(id(param))
            if index is None:
                continue  # the old optimizer did not train it (frozen): neither will this one
            new_groups[index].append(param)
            if carry_state and optimizer.state.get(param):
                state[param] = optimizer.state[param]
            continue
        source = mapping.get(name)
        if source is None:
            raise OptimizerError(f"new parameter {name!r} has no source in the expansion map")
        origin = old_by_name.get(source.group_of) if source.group_of is not None else None
        if origin is None or id(origin) not in group_of:
            raise OptimizerError(f"new parameter {name!r}: its source {source.group_of!r} is not a "
                              f"parameter the optimizer holds")
        new_groups[group_of[id(origin)]].append(param)
        if carry_state and source.source is not None and optimizer.state.get(origin):
            state[param] = _mapped_state(optimizer.state[origin], source, name)
    groups = []
    for old_group, params in zip(optimizer.param_groups, new_groups):
        groups.append({**{k: v for k, v in old_group.items() if k != "params"}, "params": params})
    groups = [g for g in groups if g["params"]]
    # The class's own __init__ may not accept every key of its defaults (AdamW stores
    # decoupled_weight_decay); the base initialiser takes them as they are.
    new = type(optimizer).__new__(type(optimizer))
    torch.optim.Optimizer.__init__(new, groups, dict(optimizer.defaults))
    for param, entry in state.items():
        new.state[param] = entry
    return new


def _mapped_state(entry: Mapping[str, Any], source: Any, name: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if key == "step":
            out[key] = value.clone() if isinstance(value, torch.Tensor) else value
        elif key in _MAPPED and isinstance(value, torch.Tensor):
            out[key] = source.apply(value)
        else:
            raise OptimizerError(f"optimizer state {key!r} of {name!r}: expand_optimizer knows "
                              f"how to expand {_MAPPED} and 'step' only; use carry_state=False")
    return out


def freeze(model: nn.Module, names: set[str] | list[str], frozen: bool = True) -> list[str]:
    """Set ``requires_grad = not frozen`` on the named parameters; returns the names changed.
    A parameter without gradient is skipped by AdamW's step, its state kept as it is."""
    changed = []
    for name, param in model.named_parameters(remove_duplicate=True):
        if name in names and param.requires_grad == frozen:
            param.requires_grad_(not frozen)
            changed.append(name)
    return changed
