"""Linear layers as fxgrow sees them in a graph: ``call_module`` nn.Linear nodes, ``F.linear``
calls on parameters (BEiT and EVA build their qkv bias with ``torch.cat``) and, in ATen graphs
from ``torch.export``, ``aten.linear`` and ``aten.addmm``/``aten.mm`` with a parameter as the
stored-transposed weight (GPT-2's ``Conv1D``) or as ``aten.t`` of a weight.

A linear is named by its *target*: the module path (``blocks.0.mlp.fc1``) for a module call,
the weight parameter's path (``blocks.0.attn.qkv.weight``) for ``F.linear``. An ATen linear
gets the name a symbolic trace of the same model gives: the module path when the call is the
forward of the module that owns the weight as ``weight`` (``node.meta["nn_module_stack"]``),
the weight's path otherwise, so one plan applies to both graphs. Reduce, analyze and grow all
address linears this way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx
from torch import nn

from ._ops import FUNCTIONAL_LINEARS, MATMUL_LINEARS, WEIGHT_TRANSPOSES, get_attr_value
from .errors import TraceError

_aten = torch.ops.aten


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
    # True when the parameter behind weight_node is stored as W^T (in, out), as GPT-2's Conv1D
    weight_transposed: bool = False
    # (start, stop) when the weight is those rows of the parameter behind weight_node, computed
    # in the graph (a chunk of nn.MultiheadAttention's packed in_proj_weight)
    weight_rows: tuple[int, int] | None = None

    def stored(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (out, in) in the layout of the parameter behind ``weight_node``."""
        return weight.t() if self.weight_transposed else weight

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
            raise TraceError(f"node {n.name!r} depends on the graph's inputs")
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
            raise TraceError(f"cannot evaluate node {n.name!r} ({n.op})")
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


def linear_input(node: fx.Node) -> fx.Node:
    """The input ``x`` of a linear node of any kind :func:`linear_site` accepts."""
    if node.op == "call_module":
        return node.args[0]
    if node.target in MATMUL_LINEARS:
        return node.args[MATMUL_LINEARS[node.target]]
    return functional_args(node)[0]


def linear_site(gm: fx.GraphModule, node: fx.Node) -> LinearSite | None:
    """The LinearSite of ``node``, or None if ``node`` is not a linear fxgrow can address."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if not isinstance(module, nn.Linear) or not node.args:
            return None
        return LinearSite(node, node.target, "module", node.args[0], module.weight, None, None)
    if node.op == "call_function" and node.target in FUNCTIONAL_LINEARS:
        x, weight_arg, bias_arg = functional_args(node)
        position, bias = None, bias_arg
    elif node.op == "call_function" and node.target in MATMUL_LINEARS:
        if any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")):
            return None
        position = MATMUL_LINEARS[node.target]
        if len(node.args) != position + 2:
            return None
        x, weight_arg = node.args[position], node.args[position + 1]
        bias = node.args[0] if position == 1 else None
    else:
        return None
    found = _parameter(gm, weight_arg, transposed=position is not None)
    if found is None or not isinstance(x, fx.Node):
        return None  # a weight computed from the graph's inputs has no parameter to grow from
    weight, weight_node, transposed, rows = found
    target = _name(node, weight_node.target)
    if rows is not None:
        target = f"{target}_rows{rows[0]}_{rows[1]}"
    bias = bias if isinstance(bias, fx.Node) else None
    return LinearSite(node, target, "functional", x, weight, weight_node, bias, transposed, rows)


def _parameter(
    gm: fx.GraphModule, arg: object, transposed: bool
) -> tuple[torch.Tensor, fx.Node, bool, tuple[int, int] | None] | None:
    """The (out, in) weight behind a linear's weight argument: a 2-D ``get_attr``, a
    transpose of one, or a block of its rows computed in the graph (``chunk``, ``split``,
    ``slice``); ``transposed`` says the argument itself is the (in, out) matrix."""
    if not isinstance(arg, fx.Node):
        return None
    if arg.op == "call_function" and arg.target in WEIGHT_TRANSPOSES and arg.args \
            and isinstance(arg.args[0], fx.Node) and arg.args[0].op == "get_attr" \
            and (arg.target is not _aten.permute.default or list(arg.args[1]) in ([1, 0], [-1, -2])):
        arg, transposed = arg.args[0], not transposed
    if arg.op == "get_attr":
        value = get_attr_value(gm, arg.target)
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            return None
        return (value.t() if transposed else value), arg, transposed, None
    if transposed or arg.op != "call_function":
        return None
    return _row_block(gm, arg)


def _row_block(
    gm: fx.GraphModule, arg: fx.Node
) -> tuple[torch.Tensor, fx.Node, bool, tuple[int, int]] | None:
    """A weight that is a block of consecutive rows of one 2-D parameter, as a view of it."""
    sources = [n for n in ancestors(arg) if n.op in ("get_attr", "placeholder")]
    if len(sources) != 1 or sources[0].op != "get_attr":
        return None
    param = get_attr_value(gm, sources[0].target)
    try:
        value = evaluate_constant(gm, arg)
    except Exception:  # not evaluable from attributes alone: not a block of a parameter
        return None
    if not (isinstance(param, torch.Tensor) and param.dim() == 2 and isinstance(value, torch.Tensor)
            and value.dim() == 2 and value.shape[1] == param.shape[1]
            and value.untyped_storage().data_ptr() == param.untyped_storage().data_ptr()
            and value.stride() == param.stride()):
        return None
    start, rest = divmod(value.storage_offset() - param.storage_offset(), param.stride(0))
    if rest or start < 0 or start + value.shape[0] > param.shape[0]:
        return None
    return value, sources[0], False, (start, start + value.shape[0])


def ancestors(node: fx.Node, stop: Callable[[fx.Node], bool] = lambda n: False) -> list[fx.Node]:
    """``node`` and every node it is computed from, not looking past nodes where ``stop``
    holds (they are listed, their inputs are not)."""
    seen, stack = {}, [node]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen[current] = None
            if not stop(current):
                stack.extend(current.all_input_nodes)
    return list(seen)


def _name(node: fx.Node, weight_path: str) -> str:
    """A linear's target: the module path when ``node`` is the forward of the module owning
    the weight as ``weight`` (what a symbolic trace calls), else the weight's path."""
    if not isinstance(node.target, torch._ops.OpOverload):
        return weight_path
    owner, _, field = weight_path.rpartition(".")
    stack = node.meta.get("nn_module_stack")
    if field == "weight" and owner and stack:
        innermost = list(stack.values())[-1]
        if innermost[0] == owner:
            return owner
    return weight_path


def linear_sites(gm: fx.GraphModule) -> dict[str, list[LinearSite]]:
    """Every addressable linear of ``gm``, by target, in graph order. A target maps to
    several sites when one module (or weight) is applied more than once."""
    sites: dict[str, list[LinearSite]] = {}
    for node in gm.graph.nodes:
        site = linear_site(gm, node)
        if site is not None:
            sites.setdefault(site.target, []).append(site)
    return sites
