"""Optimizer surgery: after growth the SAME optimizer object trains the grown model.

:func:`add_grown_params` appends every parameter a growth created to the parameter group of
the parameter it grew from (a new weight joins the group of its parent linear's weight, a
new bias the group of the parent's bias), so learning rate, weight-decay rules (timm's
``param_groups_weight_decay`` puts biases and 1-D parameters in a no-decay group) and any
per-group settings follow the parent. The number and order of groups does not change, so
learning-rate schedulers that hold the optimizer keep working. Existing parameters and their
state (AdamW ``exp_avg``/``exp_avg_sq``/``step``, SGD ``momentum_buffer``) are not touched.

New parameters start with no state (the optimizer initialises it at their first step, as for
a fresh model) unless ``init_state="parent"``: then each new row takes the optimizer state
of the neuron it grew from, as TripLe copies states with the weights. The copy is NOT
scaled or sign-flipped like the weights (+aW, -aW): optimizer state estimates gradients,
and at growth both members of a pair receive the same gradient, ``1 + GeLU'(0) = 1.5``
times the parent neuron's (docs/growth.md), whatever the sign of their weights. So
first moments (``exp_avg``, ``momentum_buffer``) are copied times 1.5, second moments
(``exp_avg_sq``, ``max_exp_avg_sq``) times 2.25 and the step count as it is: the new
neurons' first update then moves along the direction the parent's state predicts for them.
A parent bias computed from several parameters (BEiT's ``cat(q_bias, k_bias, v_bias)``) has
no single state to copy; such new biases start fresh.

Global gradient-norm clipping is the one common setting that sees the new parameters'
gradients: the clip factor, and so every parameter's step, changes after growth.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn

from .._ops import get_attr_value
from ..errors import ConfigError, OptimizerError
from ..linears import ancestors, linear_sites

#: d(new neuron's output)/d(parent output) at growth: 1 + GeLU'(0).
GRADIENT_RATIO = 1.5
_FIRST_MOMENTS = ("exp_avg", "momentum_buffer")
_SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")


def param_names(model: nn.Module) -> dict[int, str]:
    """``id(param) -> qualified name`` for every parameter of ``model``."""
    return {id(p): name for name, p in model.named_parameters(remove_duplicate=True)}


def group_param_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[list[str]]:
    """The qualified names of each param group's parameters, in order (what a checkpoint
    stores so that resume rebuilds identical groups)."""
    names = param_names(model)
    result = []
    for index, group in enumerate(optimizer.param_groups):
        missing = [i for i, p in enumerate(group["params"]) if id(p) not in names]
        if missing:
            raise OptimizerError(
                f"optimizer param group {index} holds parameters (positions {missing}) that "
                f"are not parameters of the model"
            )
        result.append([names[id(p)] for p in group["params"]])
    return result


def set_group_params(
    optimizer: torch.optim.Optimizer, model: nn.Module, names: list[list[str]]
) -> None:
    """Point the optimizer's groups at ``model``'s parameters named in ``names`` (one list
    per group, as :func:`group_param_names` returns), before ``optimizer.load_state_dict``."""
    params = dict(model.named_parameters(remove_duplicate=True))
    if len(names) != len(optimizer.param_groups):
        raise OptimizerError(
            f"saved optimizer has {len(names)} param groups, this one {len(optimizer.param_groups)}"
        )
    unknown = [n for group in names for n in group if n not in params]
    if unknown:
        raise OptimizerError(f"saved optimizer names parameters the model lacks: {unknown[:5]}")
    for group, group_names in zip(optimizer.param_groups, names):
        group["params"] = [params[n] for n in group_names]


def _entry(value: Any) -> tuple[str, list[int], str, str]:
    if isinstance(value, Mapping):
        return value["target"], list(value["indices"]), value["role"], value["kind"]
    parent, indices, role, kind = value
    return parent, list(indices), role, kind


def _parent_params(gm: fx.GraphModule, target: str) -> tuple[nn.Parameter, list[nn.Parameter]]:
    """The parent linear's weight and the parameters its bias is made of."""
    sites = linear_sites(gm).get(target)
    if not sites:
        raise OptimizerError(f"growth parent {target!r} is not a linear of the grown model")
    site = sites[0]
    if site.kind == "module":
        bias = gm.get_submodule(target).bias
        return site.weight, [bias] if bias is not None else []
    bias_params: list[nn.Parameter] = []
    if site.bias_node is not None:
        for node in ancestors(site.bias_node):
            if node.op == "get_attr":
                value = get_attr_value(gm, node.target)
                if isinstance(value, nn.Parameter):
                    bias_params.append(value)
    return site.weight, bias_params


def _copy_parent_state(
    optimizer: torch.optim.Optimizer, parent: nn.Parameter, new: nn.Parameter, indices: list[int]
) -> None:
    state = optimizer.state.get(parent)
    if not state:
        return  # the parent has not stepped yet: the new parameter starts fresh as well
    rows = torch.tensor(indices, dtype=torch.long, device=parent.device)
    copied: dict[str, Any] = {}
    for key, value in state.items():
        if key == "step":
            copied[key] = value.clone() if isinstance(value, torch.Tensor) else value
        elif key in _FIRST_MOMENTS + _SECOND_MOMENTS and value.shape == parent.shape:
            factor = GRADIENT_RATIO if key in _FIRST_MOMENTS else GRADIENT_RATIO**2
            copied[key] = (value.index_select(0, rows) * factor).reshape(new.shape).clone()
        else:
            raise OptimizerError(
                f"init_state='parent' does not know how to copy optimizer state {key!r} of "
                f"{type(optimizer).__name__}; use init_state='fresh'"
            )
    optimizer.state[new] = copied


def add_grown_params(
    optimizer: torch.optim.Optimizer,
    model: fx.GraphModule,
    lineage: Mapping[str, Any] | None = None,
    *,
    init_state: Literal["fresh", "parent"] = "fresh",
) -> list[str]:
    """Add the parameters growth created in ``model`` to ``optimizer``, in place.

    ``lineage`` maps a new parameter's qualified name to ``(parent target, neuron indices,
    role, "weight"|"bias")`` (default: :func:`fxgrow.passes.grow_lineage` of ``model``);
    parameters it names that the optimizer already holds are skipped, so calling this after
    every round is correct. Returns the names added, in the model's parameter order.

    Raises:
        OptimizerError: a parent that is not a linear of ``model``, a parent parameter that no
            param group holds, an unknown ``init_state``.
    """
    if init_state not in ("fresh", "parent"):
        raise ConfigError(f"init_state must be 'fresh' or 'parent', got {init_state!r}")
    if lineage is None:
        from ..passes import grow_lineage

        lineage = grow_lineage(model)
    held = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    added = []
    for name, param in model.named_parameters(remove_duplicate=True):
        if id(param) in held or name not in lineage:
            continue
        parent_target, indices, _role, kind = _entry(lineage[name])
        weight, biases = _parent_params(model, parent_target)
        parent_group = held.get(id(weight))
        if kind == "bias":
            bias_groups = [held[id(b)] for b in biases if id(b) in held]
            parent_group = bias_groups[0] if bias_groups else parent_group
        if parent_group is None:
            raise OptimizerError(
                f"the parent {parent_target!r} of new parameter {name!r} is in no param group "
                f"of the optimizer"
            )
        optimizer.param_groups[parent_group]["params"].append(param)
        held[id(param)] = parent_group
        if init_state == "parent":
            parent = weight if kind == "weight" else (biases[0] if len(biases) == 1 else None)
            if parent is not None:
                _copy_parent_state(optimizer, parent, param, indices)
        added.append(name)
    return added
