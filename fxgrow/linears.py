"""Linear layers as fxgrow sees them in a graph: ``call_module`` nn.Linear nodes and
``F.linear`` calls on parameters (BEiT and EVA build their qkv bias with ``torch.cat``).

A linear is named by its *target*: the module path (``blocks.0.mlp.fc1``) for a module call,
the weight parameter's path (``blocks.0.attn.qkv.weight``) for ``F.linear``. Reduce, analyze
and grow all address linears this way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
from torch import nn

from ._ops import FUNCTIONAL_LINEARS, get_attr_value



@dataclass(frozen=True)
class LinearSite:
    """One node of a graph that applies a linear map ``y = x W^T + b`` on its last dim."""

    node: fx.Node
    target: str
    kind: Literal["module", "functional"]
    input: fx.Node
    weight: torch.Tensor
    weight_node: fx.Node | None  # the get_attr node of a functional linear's weight
    bias_node: fx.Node | None  # a functional linear's bias argument (may be computed)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def has_bias(self, gm: fx.GraphModule) -> bool:
        """Whether the linear adds a bias, without evaluating a computed one."""
        if self.kind == "module":
            return gm.get_submodule(self.target).bias is not None
        return self.bias_node is not None

    def bias(self, gm: fx.GraphModule) -> torch.Tensor | None:
        """The bias as a tensor, evaluating a computed bias (``cat(q_bias, k_bias, v_bias)``)."""
        if self.kind == "module":
            return gm.get_submodule(self.target).bias
        if self.bias_node is None:
            return None
        return evaluate_constant(gm, self.bias_node)


def evaluate_constant(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """Evaluate a node that depends only on attributes and constants (no placeholders)."""
    values: dict[fx.Node, object] = {}

    def run(n: fx.Node) -> object:
        if n in values:
            return values[n]
        if n.op == "placeholder":
            raise ValueError(f"node {n.name!r} depends on the graph's inputs")
        args = fx.node.map_arg(n.args, run)
        kwargs = fx.node.map_arg(n.kwargs, run)
        if n.op == "get_attr":
            value = get_attr_value(gm, n.target)
        elif n.op == "call_function":
            value = n.target(*args, **kwargs)
        elif n.op == "call_method":
            self_obj, *rest = args
            value = getattr(self_obj, n.target)(*rest, **kwargs)
        elif n.op == "call_module":
            value = gm.get_submodule(n.target)(*args, **kwargs)
        else:
            raise ValueError(f"cannot evaluate node {n.name!r} ({n.op})")
        values[n] = value
        return value

    return run(node)


def functional_args(node: fx.Node) -> tuple[fx.Node, object, object]:
    """``(input, weight, bias)`` of an ``F.linear`` node, wherever they were passed."""
    names = ("input", "weight", "bias")
    args = list(node.args) + [None] * (3 - len(node.args))
    for i, name in enumerate(names):
        if name in node.kwargs:
            args[i] = node.kwargs[name]
    return args[0], args[1], args[2]


def linear_site(gm: fx.GraphModule, node: fx.Node) -> LinearSite | None:
    """The LinearSite of ``node``, or None if ``node`` is not a linear fxgrow can address."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if not isinstance(module, nn.Linear) or not node.args:
            return None
        return LinearSite(node, node.target, "module", node.args[0], module.weight, None, None)
    if node.op == "call_function" and node.target in FUNCTIONAL_LINEARS:
        x, weight_arg, bias_arg = functional_args(node)
        if not isinstance(weight_arg, fx.Node) or weight_arg.op != "get_attr":
            return None  # a weight computed in the graph has no parameter to grow from
        weight = get_attr_value(gm, weight_arg.target)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            return None
        bias = bias_arg if isinstance(bias_arg, fx.Node) else None
        return LinearSite(node, weight_arg.target, "functional", x, weight, weight_arg, bias)
    return None


def linear_sites(gm: fx.GraphModule) -> dict[str, list[LinearSite]]:
    """Every addressable linear of ``gm``, by target, in graph order. A target maps to
    several sites when one module (or weight) is applied more than once."""
    sites: dict[str, list[LinearSite]] = {}
    for node in gm.graph.nodes:
        site = linear_site(gm, node)
        if site is not None:
            sites.setdefault(site.target, []).append(site)
    return sites
