"""How every pass builds its result: a new GraphModule over a new graph that shares all
unchanged modules and tensors with its input (docs/passes.md)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .. import recipes
from ..errors import InternalError


def _lookup(root: nn.Module, target: str) -> tuple[nn.Module, str, Any]:
    *prefix, field = target.split(".")
    owner = root
    for item in prefix:
        owner = getattr(owner, item)
    return owner, field, getattr(owner, field)


def _install(
    root: nn.Module, target: str, value: Any, containers: set[int], persistent: bool = True
) -> None:
    *prefix, field = target.split(".")
    owner = root
    for item in prefix:
        child = owner._modules.get(item)
        if child is None:
            child = nn.Module()
            containers.add(id(child))
            owner.add_module(item, child)
        owner = child
    if id(owner) not in containers:
        if getattr(owner, field, None) is value:
            return  # already reachable through a shared module installed earlier
        # Adding to a module shared with the caller's model would mutate that model.
        raise InternalError(f"{target!r} would be added to a shared module")
    if isinstance(value, nn.Module):
        owner.add_module(field, value)
    elif isinstance(value, nn.Parameter):
        owner.register_parameter(field, value)
    elif isinstance(value, torch.Tensor):
        owner.register_buffer(field, value, persistent=persistent)
    else:
        setattr(owner, field, value)


def _keep(result: nn.Module, source: nn.Module, target: str) -> None:
    """Install ``source``'s attribute ``target`` in ``result`` (built by GraphModule, whose
    containers are its own), unless it is already there."""
    *prefix, field = target.split(".")
    owner, original = result, source
    for item in prefix:
        original = getattr(original, item)
        child = owner._modules.get(item)
        if child is None:
            child = nn.Module()
            owner.add_module(item, child)
        if child is original:
            return  # inside a module shared with the source: already reachable
        owner = child
    value = getattr(original, field)
    if getattr(owner, field, None) is value:
        return
    if isinstance(value, nn.Module):
        # in place of the container GraphModule made for the module's parameters
        owner._modules[field] = value
    elif isinstance(value, nn.Parameter):
        owner.register_parameter(field, value)
    elif isinstance(value, torch.Tensor):
        owner.register_buffer(
            field, value, persistent=field not in original._non_persistent_buffers_set
        )
    else:
        setattr(owner, field, value)


def build_graph_module(
    source: fx.GraphModule,
    graph: fx.Graph,
    new_attrs: Mapping[str, Any] | None = None,
    record: dict[str, Any] | None = None,
    *,
    keep: Iterable[str] = (),
    unsaved: Collection[str] = (),
) -> fx.GraphModule:
    """A GraphModule running ``graph`` whose attributes come from ``new_attrs`` first, then
    from ``source`` (shared, not copied). The recipe of ``source`` is carried over with
    ``record`` appended; the training flag is kept.

    ``keep`` names attributes of ``source`` (modules, parameters, buffers) to install even
    though ``graph`` does not use them (a module replaces the container that holds the
    parameters of it the graph uses); tensors of ``new_attrs`` named in ``unsaved`` become
    non-persistent buffers (absent from the state_dict)."""
    new_attrs = dict(new_attrs or {})
    root = nn.Module()
    containers = {id(root)}
    installed: set[str] = set()
    for node in graph.nodes:
        if node.op not in ("call_module", "get_attr") or node.target in installed:
            continue
        target = node.target
        if target in new_attrs:
            _install(root, target, new_attrs[target], containers,
                     persistent=target not in unsaved)
        else:
            owner, field, value = _lookup(source, target)
            persistent = field not in getattr(owner, "_non_persistent_buffers_set", ())
            _install(root, target, value, containers, persistent=persistent)
        installed.add(target)
    graph.lint()
    result = fx.GraphModule(root, graph, class_name=type(source).__name__)
    for target in keep:
        _keep(result, source, target)
    result.training = source.training
    recipes.inherit(source, result, record)
    return result
