"""Grown targets as one GEMM each: ``pack`` for training, ``fold`` for inference (docs/packing.md).

Every pseudo-layer of a grown target, at any depth, reads the target's own input x. So the
target's output and every member's pre-activation are column blocks of one product
``x [W; W_1; ...; W_n]^T + [b; b_1; ...; b_n]``, laid out by depth. What is left per depth
level is elementwise: the pair sums (all plus columns of the level against all minus
columns), ``gelu(a) + a``, and one ``index_put`` that adds the level's rows into the channels
of the level above; the last one writes into the target's own output channels.

- :func:`pack` keeps the parameters ``grow`` created, the very ``nn.Parameter`` objects
  under the same state_dict keys (the stacked weight is a ``torch.cat`` of them inside the
  graph, so each receives its gradient), so an optimizer, a checkpoint and
  :func:`fxgrow.passes.grow_lineage` stay valid. It computes the same function as the
  exact form within float rounding, not bitwise: one GEMM over more rows may sum in another
  order than the separate GEMMs did. Growth therefore always runs on the exact form
  (:func:`fxgrow.passes.grow` unpacks a packed input first), where it is bitwise
  function-preserving by construction, and the result is packed again after the check.
- :func:`unpack` returns the exact form a packed model was made from (the graph is kept
  with the packed model), sharing every module and parameter.
- :func:`fold` is for inference after training: each pair's members become one row block
  ``W+ + W-`` (nested growth of either member writes into it), and the target's rows and all
  of its blocks one ``nn.Linear``. The result holds new weights, so it is not for training.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import recipes
from .._ops import get_attr_value
from ..errors import CheckpointError, PlanError
from ._grown_trees import GrownLinear, GrownTree, PseudoLayer, erase_unused, grown_trees
from ._rebuild import build_graph_module
from .grow import module_stem
from .replay import register_replay

PACK_PASS = "pack"
FOLD_PASS = "fold"
_EXACT_GRAPH = "fxgrow.exact_graph"  # gm.meta key: the graph a packed model was made from


class _AddToColumns(torch.autograd.Function):
    """``output`` with ``rows`` added to its last-dim channels ``index``, saving only the
    index for backward. ``index_add`` alone would also keep ``rows`` alive until backward;
    ``index_put(accumulate=True)`` (what ``grow`` writes, for its exact gradient layout) is
    several times slower on the CPU."""

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, index: torch.Tensor,
                rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        return output.index_add(-1, index, rows)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor]:
        (index,) = ctx.saved_tensors
        return grad, None, grad.index_select(-1, index)


def add_to_columns(output: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``result[..., index[i]] = output[..., index[i]] + rows[..., i]`` (out of place,
    repeated indices summed): the write-back of one depth level of a packed target."""
    return _AddToColumns.apply(output, index, rows)


def is_packed(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` is the result of :func:`pack` (and so can be unpacked)."""
    return isinstance(getattr(gm, "meta", None), dict) and _EXACT_GRAPH in gm.meta


def pack(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with every grown target computed as one GEMM of its stacked weights.

    The result shares all modules and parameters with ``gm`` (the grown ones are still
    installed under their names, so state_dict keys are unchanged) and computes the same
    outputs and gradients within float rounding. A target whose grown subgraph was edited
    after growth is left as it is. A packed input is unpacked first. ``gm`` is never modified;
    the result's history gains ``{"pass": "pack"}`` with the packed targets.

    Raises:
        PlanError: ``gm`` is not a GraphModule.
    """
    gm, graph, new_attrs, record = _rewrite(gm, PACK_PASS, _pack_tree)
    exact = gm.graph
    keep = [n.target for n in exact.nodes if n.op in ("call_module", "get_attr")]
    result = build_graph_module(gm, graph, new_attrs, record, keep=keep, unsaved=set(new_attrs))
    result.meta[_EXACT_GRAPH] = copy.deepcopy(exact)
    return result


def unpack(gm: fx.GraphModule) -> fx.GraphModule:
    """The exact form of a packed model: the graph ``grow`` wrote, over the same modules and
    parameters. Its history is ``gm``'s without the final ``pack`` record, so saving and
    loading it gives the exact form back. Raises PlanError if ``gm`` is not packed."""
    if not isinstance(gm, fx.GraphModule) or not is_packed(gm):
        raise PlanError("unpack expects a model made by fxgrow.passes.pack")
    result = build_graph_module(gm, copy.deepcopy(gm.meta[_EXACT_GRAPH]))
    data = recipes.recipe(result)
    if data["history"] and data["history"][-1].get("pass") == PACK_PASS:
        data["history"].pop()
    result.meta[recipes.META_KEY] = data
    return result


def exact_form(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` itself, or its exact form if it is packed (what analysis and growth read)."""
    return unpack(gm) if is_packed(gm) else gm


def fold(gm: fx.GraphModule) -> fx.GraphModule:
    """An inference model: each grown target, its pairs summed (``W+ + W-``, ``b+ + b-``) and
    all of its rows concatenated, as one new ``nn.Linear`` ``{target}_folded`` followed by
    the elementwise steps of each depth level. Outputs equal the unfolded model's within
    float rounding; per pseudo-layer of k neurons it costs k(d+1) parameters and kd
    multiply-adds per token, half the paper form's. The new weights are copies, so training
    the result does not train ``gm``. A packed input is unpacked first; the history gains
    ``{"pass": "fold"}`` with the folded targets.

    Raises:
        PlanError: ``gm`` is not a GraphModule.
    """
    names: dict[str, str] = {}  # target -> its folded module, shared by all of its calls

    def fold_tree(gm: fx.GraphModule, graph: fx.Graph, tree: GrownTree,
                  new_attrs: dict[str, Any]) -> None:
        _fold_tree(gm, graph, tree, new_attrs, names)

    gm, graph, new_attrs, record = _rewrite(gm, FOLD_PASS, fold_tree)
    modules = {n for n, v in new_attrs.items() if isinstance(v, nn.Module)}
    return build_graph_module(gm, graph, new_attrs, record, unsaved=set(new_attrs) - modules)


# ----------------------------------------------------------------------------- helpers


def _rewrite(
    gm: fx.GraphModule, name: str, rewrite: Callable[..., None]
) -> tuple[fx.GraphModule, fx.Graph, dict[str, Any], dict[str, Any]]:
    """Apply ``rewrite(gm, graph, tree, new_attrs)`` to every grown tree of a copy of the
    exact form's graph; return the exact form, the new graph, its new attributes and the
    pass record naming the rewritten targets."""
    if not isinstance(gm, fx.GraphModule):
        raise PlanError(f"{name} expects a torch.fx.GraphModule (see fxgrow.trace), "
                        f"got {type(gm).__name__}")
    gm = exact_form(gm)
    graph = copy.deepcopy(gm.graph)
    new_attrs: dict[str, Any] = {}
    targets = []
    for tree in _trees(gm, graph):
        rewrite(gm, graph, tree, new_attrs)
        targets.append(tree.site.target)
    return gm, graph, new_attrs, {"pass": name, "args": {"targets": list(dict.fromkeys(targets))}}


def _trees(gm: fx.GraphModule, graph: fx.Graph) -> list[GrownTree]:
    """The grown trees of ``graph``, a copy of ``gm``'s graph, read through a GraphModule
    that shares ``gm``'s modules so that the trees' nodes are ``graph``'s own."""
    view = fx.GraphModule(gm, graph)
    view.meta[recipes.META_KEY] = recipes.recipe(gm)
    trees = grown_trees(view)
    graph.owning_module = None  # the rewrite adds attributes the view does not have
    return trees


def _layout(members_by_layer: Sequence[tuple[PseudoLayer, Sequence[Any]]]) -> list[Any]:
    """The column order of one level: every pair's first member, then every pair's second,
    then the single members, so a level's pair sums are one add of two blocks."""
    pairs = [items for _, items in members_by_layer if len(items) == 2]
    singles = [items for _, items in members_by_layer if len(items) == 1]
    return [p[0] for p in pairs] + [p[1] for p in pairs] + [s[0] for s in singles]


def _level_sums(graph: fx.Graph, block: fx.Node, pair_width: int, single_width: int) -> fx.Node:
    """``a`` of one level: pair sums (first members' block plus second members') and then
    the single members' columns as they are."""
    if not pair_width:
        return block
    sizes = [pair_width, pair_width] + ([single_width] if single_width else [])
    parts = graph.call_function(torch.split, (block, sizes), {"dim": -1})
    first, second = (graph.call_function(operator.getitem, (parts, i)) for i in (0, 1))
    sums = graph.call_function(operator.add, (first, second))
    if not single_width:
        return sums
    singles = graph.call_function(operator.getitem, (parts, 2))
    return graph.call_function(torch.cat, ([sums, singles],), {"dim": -1})


def _emit_levels(
    graph: fx.Graph,
    product: fx.Node,
    widths: list[int],
    level_args: list[tuple[int, int, str]],
) -> fx.Node:
    """The elementwise tree over ``product`` (columns laid out by depth, ``widths`` per
    level): from the deepest level up, ``gelu(a) + a`` written into the level above.
    ``level_args[L]`` = (pair width, single width, index buffer) of the level whose members
    sit at depth L + 1. Returns the root's final value."""
    split = graph.call_function(torch.split, (product, widths), {"dim": -1})
    blocks = [graph.call_function(operator.getitem, (split, i)) for i in range(len(widths))]
    current = blocks[-1]
    for depth in range(len(widths) - 1, 0, -1):
        pair_width, single_width, index_name = level_args[depth - 1]
        a = _level_sums(graph, current, pair_width, single_width)
        rows = graph.call_function(operator.add, (graph.call_function(F.gelu, (a,)), a))
        index = graph.get_attr(index_name)
        current = graph.call_function(add_to_columns, (blocks[depth - 1], index, rows))
    return current


def _index_tensor(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.cat(parts).to(device=device, dtype=torch.long)


def _pack_tree(gm: fx.GraphModule, graph: fx.Graph, tree: GrownTree,
               new_attrs: dict[str, Any]) -> None:
    site = tree.site
    levels = tree.levels()
    offset: dict[int, int] = {id(tree.root): 0}  # a linear's column within its level block
    columns: list[list[GrownLinear]] = [[tree.root]]
    level_args: list[tuple[int, int, str]] = []
    device = site.weight.device
    stem = module_stem(site)
    for depth, entries in enumerate(levels):
        order = _layout([(layer, layer.members) for _, layer in entries])
        for start, member in _running(order):
            offset[id(member)] = start
        columns.append(order)
        pairs = [(parent, layer) for parent, layer in entries if len(layer.members) == 2]
        singles = [(parent, layer) for parent, layer in entries if len(layer.members) == 1]
        parts = [torch.tensor(layer.indices) + offset[id(parent)] for parent, layer in
                 pairs + singles]
        name = f"{stem}_packed_index{depth}"
        new_attrs[name] = _index_tensor(parts, device)
        level_args.append((sum(len(l.indices) for _, l in pairs),
                           sum(len(l.indices) for _, l in singles), name))
    with graph.inserting_before(tree.root.tip):
        weights, biases = [], []
        root_weight, root_bias = _root_params(gm, graph, tree)
        weights.append(root_weight)
        biases.append(root_bias)
        for level in columns[1:]:
            for member in level:
                weights.append(graph.get_attr(f"{member.target}.weight"))
                if root_bias is not None:
                    biases.append(graph.get_attr(f"{member.target}.bias"))
        weight = graph.call_function(torch.cat, (weights,), {"dim": 0})
        bias = None if root_bias is None else graph.call_function(torch.cat, (biases,), {"dim": 0})
        product = graph.call_function(F.linear, (site.input, weight, bias))
        widths = [sum(m.width for m in level) for level in columns]
        out = _emit_levels(graph, product, widths, level_args)
    tree.root.tip.replace_all_uses_with(out)
    erase_unused(graph, tree.nodes)


def _running(order: list[GrownLinear]) -> list[tuple[int, GrownLinear]]:
    """Each member with its first column in the level block."""
    result, start = [], 0
    for member in order:
        result.append((start, member))
        start += member.width
    return result


def _root_params(
    gm: fx.GraphModule, graph: fx.Graph, tree: GrownTree
) -> tuple[fx.Node, fx.Node | None]:
    site = tree.site
    if site.kind == "functional":
        return site.weight_node, site.bias_node
    module = gm.get_submodule(site.target)
    bias = graph.get_attr(f"{site.target}.bias") if module.bias is not None else None
    return graph.get_attr(f"{site.target}.weight"), bias


def _fold_tree(gm: fx.GraphModule, graph: fx.Graph, tree: GrownTree,
               new_attrs: dict[str, Any], names: dict[str, str]) -> None:
    """Replace ``tree`` by its folded linear; ``names`` maps a target already folded (a
    module called at several places) to its folded module, which is reused."""
    site = tree.site
    name = names.get(site.target)
    if name is None:
        name = names[site.target] = _free_name(gm, f"{module_stem(site)}_folded", new_attrs)
    levels = tree.levels()
    with torch.no_grad():
        root_bias = site.bias(gm)
        weights = [site.weight.detach()]
        biases = [] if root_bias is None else [root_bias.detach()]
        offset: dict[int, int] = {id(tree.root): 0}  # a linear's column in its level block
        widths = [site.out_features]
        level_args: list[tuple[int, int, str]] = []
        for depth, entries in enumerate(levels):
            parts, start = [], 0
            for parent, layer in entries:
                parts.append(torch.tensor(layer.indices) + offset[id(parent)])
                modules = [gm.get_submodule(m.target) for m in layer.members]
                weights.append(sum(m.weight.detach() for m in modules))
                if root_bias is not None:
                    biases.append(sum(m.bias.detach() for m in modules))
                for member in layer.members:
                    offset[id(member)] = start  # both members' growth lands in the sum
                start += len(layer.indices)
            widths.append(start)
            index_name = f"{name}_index{depth}"
            new_attrs[index_name] = _index_tensor(parts, site.weight.device)
            level_args.append((0, start, index_name))
        folded = nn.Linear(site.in_features, sum(widths), bias=root_bias is not None,
                           device="meta")
        folded.weight = nn.Parameter(torch.cat(weights), requires_grad=site.weight.requires_grad)
        if root_bias is not None:
            folded.bias = nn.Parameter(torch.cat(biases), requires_grad=site.weight.requires_grad)
    new_attrs[name] = folded
    with graph.inserting_before(tree.root.tip):
        product = graph.call_module(name, (site.input,))
        out = _emit_levels(graph, product, widths, level_args)
    tree.root.tip.replace_all_uses_with(out)
    leftovers = [*tree.nodes]
    if site.kind == "functional":
        leftovers += [n for n in (site.weight_node, site.bias_node) if n is not None]
        leftovers += _ancestors(site.bias_node)
    erase_unused(graph, leftovers)


def _ancestors(node: fx.Node | None) -> list[fx.Node]:
    found: list[fx.Node] = []
    stack = [node] if node is not None else []
    while stack:
        n = stack.pop()
        for arg in n.all_input_nodes:
            if arg.op != "placeholder" and arg not in found:
                found.append(arg)
                stack.append(arg)
    return found


def _free_name(gm: fx.GraphModule, name: str, taken: dict[str, Any]) -> str:
    candidate, n = name, 0
    while candidate in taken or _has(gm, candidate):
        n += 1
        candidate = f"{name}{n}"
    return candidate


def _has(gm: fx.GraphModule, qualname: str) -> bool:
    try:
        get_attr_value(gm, qualname)
    except (AttributeError, AssertionError):
        return False
    return True


def _check_targets(result: fx.GraphModule, args: dict[str, Any], name: str) -> fx.GraphModule:
    made = recipes.history(result)[-1]["args"]["targets"]
    if made != args["targets"]:
        raise CheckpointError(f"replayed {name} rewrote {made}, the record says {args['targets']}")
    return result


@register_replay(PACK_PASS)
def _replay_pack(gm: fx.GraphModule, args: dict[str, Any]) -> fx.GraphModule:
    return _check_targets(pack(gm), args, PACK_PASS)


@register_replay(FOLD_PASS)
def _replay_fold(gm: fx.GraphModule, args: dict[str, Any]) -> fx.GraphModule:
    return _check_targets(fold(gm), args, FOLD_PASS)
