"""Grown targets as two GEMMs each: ``pack`` for training, ``fold`` for inference
(docs/packing.md).

Every pseudo-layer of a grown target, at any depth, reads the target's own input x. So every
member's pre-activation is a column block of one product ``x [W_1; ...; W_n]^T + [b_1; ...;
b_n]``, laid out by depth, beside the target's own linear, which is left as it is. What is
left per depth level is elementwise (:func:`packed_levels`, one node per target): the pair
sums (all plus columns of the level against all minus columns), ``gelu(a) + a``, and one
``index_add`` of the level's rows into the channels of the level above; the last one writes
into the target's own output channels.

- :func:`pack` keeps the parameters ``grow`` created, the very ``nn.Parameter`` objects
  under the same state_dict keys (the stacked member weight is a concatenation of them
  inside the graph, :func:`stack_rows`, so each receives its gradient), so an optimizer, a
  checkpoint and :func:`fxgrow.passes.grow_lineage` stay valid. It computes the same
  function as the exact form within float rounding, not bitwise: one GEMM over more rows may
  sum in another order than the separate GEMMs did, and the pair sums are formed in another
  order. Growth therefore always runs on the exact form (:func:`fxgrow.passes.grow` unpacks
  a packed input first), where it is bitwise function-preserving by construction, and the
  result is packed again after the check.
- :func:`unpack` returns the exact form a packed model was made from (the graph is kept
  with the packed model), sharing every module and parameter.
- :func:`fold` is for inference after training: each pair's members become one row block
  ``W+ + W-`` (nested growth of either member writes into it), and all of a target's blocks
  one ``nn.Linear`` beside the target's own. The folded weights are new, so it is not for
  training.
"""

from __future__ import annotations

import copy
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


Pairs = tuple[tuple[int, int], ...]  # per level: (pair width, single width)


def _pair_sums(block: torch.Tensor, pair_width: int, single_width: int) -> torch.Tensor:
    """``a`` of one level: pair sums (first members' columns plus second members') and then
    the single members' columns as they are."""
    if not pair_width:
        return block
    sums = block[..., :pair_width] + block[..., pair_width:2 * pair_width]
    return torch.cat([sums, block[..., 2 * pair_width:]], -1) if single_width else sums


def _levels_forward(out: torch.Tensor | None, pre: torch.Tensor, widths: Sequence[int],
                    pairs: Pairs, indices: Sequence[torch.Tensor], *, in_place: bool
                    ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """From the deepest level up: each level's ``a``, ``gelu(a) + a`` added into the level
    above, the last into ``out`` (in place or not). Returns the result (``None`` if ``out``
    is) and every level's ``a``, shallowest first."""
    blocks = pre.split(list(widths), -1)
    current = blocks[-1]
    sums = []
    for depth in range(len(widths), 0, -1):
        a = _pair_sums(current, *pairs[depth - 1])
        sums.append(a)
        if depth == 1 and out is None:
            break
        rows = F.gelu(a) + a
        if depth > 1:
            current = blocks[depth - 2].index_add(-1, indices[depth - 1], rows)
        elif in_place:
            out.index_add_(-1, indices[0], rows)
        else:
            out = out.index_add(-1, indices[0], rows)
    return out, sums[::-1]


def _levels_backward(grad: torch.Tensor, sums: Sequence[torch.Tensor], widths: Sequence[int],
                     pairs: Pairs, indices: Sequence[torch.Tensor]) -> torch.Tensor:
    """The gradient of ``pre`` (``out``'s is ``grad`` itself), each level's written straight
    into one buffer laid out like ``pre``: nothing is concatenated."""
    grad_pre = grad.new_empty((*grad.shape[:-1], sum(widths)))
    above = grad
    for depth, block in enumerate(grad_pre.split(list(widths), -1)):
        grad_rows = above.index_select(-1, indices[depth])
        pair_width, _ = pairs[depth]
        # d(gelu(a) + a)/da, written where the level's first members' (or singles') go
        _gelu_plus_one_backward(grad_rows[..., :pair_width], sums[depth][..., :pair_width],
                                block[..., :pair_width])
        _gelu_plus_one_backward(grad_rows[..., pair_width:], sums[depth][..., pair_width:],
                                block[..., 2 * pair_width:])
        # both members of a pair receive the pair sum's gradient
        block[..., pair_width:2 * pair_width].copy_(block[..., :pair_width])
        above = block
    return grad_pre


def _gelu_plus_one_backward(grad: torch.Tensor, a: torch.Tensor, into: torch.Tensor) -> None:
    if into.shape[-1]:
        torch.ops.aten.gelu_backward.grad_input(grad, a, grad_input=into)
        into.add_(grad)


class _LevelsFunction(torch.autograd.Function):
    """Eager :func:`packed_levels`: the last write-back goes into ``out`` in place (a linear's
    output, which no backward reads), so it is not cloned; only each level's ``a`` (for the
    GeLU) and the indices are saved."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, pre: torch.Tensor, widths: tuple[int, ...],
                pairs: Pairs, *indices: torch.Tensor) -> torch.Tensor:
        out, sums = _levels_forward(out, pre, widths, pairs, indices, in_place=True)
        ctx.mark_dirty(out)
        ctx.save_for_backward(*indices, *sums)
        ctx.widths, ctx.pairs = widths, pairs
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        levels = len(ctx.widths)
        indices, sums = ctx.saved_tensors[:levels], ctx.saved_tensors[levels:]
        grad_pre = _levels_backward(grad, sums, ctx.widths, ctx.pairs, indices)
        return (grad, grad_pre, None, None, *([None] * levels))


# Under torch.compile the levels are two opaque operators with the eager kernels inside:
# traced into inductor, every target's levels (each of its own widths) became kernels of
# their own, each compiled by the C++ compiler, and compiling took ten times the dense model's.
@torch.library.custom_op("fxgrow::packed_levels", mutates_args=())
def _levels_op(out: torch.Tensor, pre: torch.Tensor, widths: list[int], pair_widths: list[int],
               single_widths: list[int], indices: list[torch.Tensor]) -> torch.Tensor:
    return levels_out_of_place(out, pre, tuple(widths), tuple(zip(pair_widths, single_widths)),
                               *indices)


@torch.library.custom_op("fxgrow::packed_levels_backward", mutates_args=())
def _levels_backward_op(grad: torch.Tensor, pre: torch.Tensor, widths: list[int],
                        pair_widths: list[int], single_widths: list[int],
                        indices: list[torch.Tensor]) -> torch.Tensor:
    pairs = tuple(zip(pair_widths, single_widths))
    sums = _levels_forward(None, pre, widths, pairs, indices, in_place=False)[1]
    return _levels_backward(grad, sums, widths, pairs, indices)


@_levels_op.register_fake
def _levels_op_fake(out, pre, widths, pair_widths, single_widths, indices):
    return torch.empty_like(out)


@_levels_backward_op.register_fake
def _levels_backward_op_fake(grad, pre, widths, pair_widths, single_widths, indices):
    return torch.empty_like(pre)


def _levels_op_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    _, pre, *ctx.layout, indices = inputs
    ctx.save_for_backward(pre, *indices)


def _levels_op_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    pre, *indices = ctx.saved_tensors
    grad_pre = _levels_backward_op(grad, pre, *ctx.layout, indices)
    return grad, grad_pre, None, None, None, [None] * len(indices)


_levels_op.register_autograd(_levels_op_backward, setup_context=_levels_op_setup)


@torch.library.custom_op("fxgrow::stack_rows", mutates_args=())
def _stack_rows_op(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts)


@_stack_rows_op.register_fake
def _stack_rows_op_fake(parts):
    return parts[0].new_empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]))


def _stack_rows_op_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    ctx.rows = [p.shape[0] for p in inputs[0]]


def _stack_rows_op_backward(ctx: Any, grad: torch.Tensor) -> tuple[list[torch.Tensor]]:
    return (list(grad.split(ctx.rows)),)


_stack_rows_op.register_autograd(_stack_rows_op_backward, setup_context=_stack_rows_op_setup)


def stack_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)``: a packed target's member weights (or biases) stacked for its one
    GEMM. Under torch.compile an opaque fxgrow operator: inductor would compile a kernel of
    its own for every target's concatenation, each of other shapes."""
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        return _stack_rows_op(parts)
    return torch.cat(parts)


def packed_levels(out: torch.Tensor, pre: torch.Tensor, widths: tuple[int, ...],
                  pairs: Pairs, *indices: torch.Tensor) -> torch.Tensor:
    """``out`` (a grown target's own output) with every level of its members written back:
    ``pre`` holds the members' pre-activations, level by level (``widths``), each level
    ``pairs[L] = (pair width, single width)`` laid out as docs/packing.md says and written
    into the channels ``indices[L]`` of the level above. Eager, this writes into ``out``.
    torch.export sees plain aten operators (a portable program); torch.compile sees two
    opaque fxgrow operators, the eager kernels, whatever the widths."""
    if torch.compiler.is_exporting():
        return levels_out_of_place(out, pre, widths, pairs, *indices)
    if torch.compiler.is_compiling():
        return _levels_op(out, pre, list(widths), [p for p, _ in pairs], [s for _, s in pairs],
                          list(indices))
    return _LevelsFunction.apply(out, pre, widths, pairs, *indices)


def levels_out_of_place(out: torch.Tensor, pre: torch.Tensor, widths: tuple[int, ...],
                        pairs: Pairs, *indices: torch.Tensor) -> torch.Tensor:
    """:func:`packed_levels` in plain out-of-place operators (autograd derives its backward)."""
    return _levels_forward(out, pre, widths, pairs, indices, in_place=False)[0]


def is_packed(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` is the result of :func:`pack` (and so can be unpacked)."""
    return isinstance(getattr(gm, "meta", None), dict) and _EXACT_GRAPH in gm.meta


def pack(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with every grown target computed as its own GEMM plus one GEMM of its members'
    stacked weights and one elementwise node.

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
    """An inference model: each grown target's members, pairs summed (``W+ + W-``, ``b+ +
    b-``) and concatenated, as one new ``nn.Linear`` ``{target}_folded`` beside the target's
    own, followed by the elementwise steps of each depth level. Outputs equal the unfolded
    model's within float rounding; per pseudo-layer of k neurons it costs k(d+1) parameters and kd
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


def _emit_levels(graph: fx.Graph, out: fx.Node, pre: fx.Node,
                 level_args: list[tuple[int, int, int, str]]) -> fx.Node:
    """The node writing every level of ``pre`` (the members' pre-activations) back into
    ``out``; ``level_args[L]`` = (width, pair width, single width, index buffer) of the
    level whose members sit at depth L + 1."""
    widths = tuple(width for width, *_ in level_args)
    pairs = tuple((pair_width, single_width) for _, pair_width, single_width, _ in level_args)
    indices = [graph.get_attr(name) for *_, name in level_args]
    return graph.call_function(packed_levels, (out, pre, widths, pairs, *indices))


def _index_tensor(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.cat(parts).to(device=device, dtype=torch.long)


def _pack_tree(gm: fx.GraphModule, graph: fx.Graph, tree: GrownTree,
               new_attrs: dict[str, Any]) -> None:
    site = tree.site
    offset: dict[int, int] = {id(tree.root): 0}  # a linear's column within its level block
    members: list[GrownLinear] = []
    level_args: list[tuple[int, int, int, str]] = []
    stem = module_stem(site)
    for depth, entries in enumerate(tree.levels()):
        order = _layout([(layer, layer.members) for _, layer in entries])
        for start, member in _running(order):
            offset[id(member)] = start
        members += order
        pairs = [(parent, layer) for parent, layer in entries if len(layer.members) == 2]
        singles = [(parent, layer) for parent, layer in entries if len(layer.members) == 1]
        parts = [torch.tensor(layer.indices) + offset[id(parent)] for parent, layer in
                 pairs + singles]
        name = f"{stem}_packed_index{depth}"
        new_attrs[name] = _index_tensor(parts, site.weight.device)
        level_args.append((sum(m.width for m in order), sum(len(l.indices) for _, l in pairs),
                           sum(len(l.indices) for _, l in singles), name))
    has_bias = site.bias(gm) is not None
    root = tree.root.node
    # The target's own linear reads the tokens as rows: its output is then a tensor of its
    # own, not a view of one, and writing the levels into it in place costs autograd no copy.
    with graph.inserting_before(root):
        rows = graph.call_function(flatten_tokens, (site.input,))
    root.replace_input_with(site.input, rows)
    with graph.inserting_before(tree.root.tip):
        weight = graph.call_function(
            stack_rows, ([graph.get_attr(f"{m.target}.weight") for m in members],))
        bias = graph.call_function(
            stack_rows, ([graph.get_attr(f"{m.target}.bias") for m in members],)
        ) if has_bias else None
        pre = graph.call_function(F.linear, (rows, weight, bias))
        written = _emit_levels(graph, root, pre, level_args)
        out = graph.call_function(unflatten_tokens, (written, site.input))
    tree.root.tip.replace_all_uses_with(out)
    erase_unused(graph, tree.nodes)


def flatten_tokens(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a matrix of rows, one per token (all leading dimensions flattened)."""
    return x.reshape(-1, x.shape[-1])


def unflatten_tokens(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``rows`` back in ``like``'s leading dimensions."""
    return rows.view(*like.shape[:-1], rows.shape[-1])


def _running(order: list[GrownLinear]) -> list[tuple[int, GrownLinear]]:
    """Each member with its first column in the level block."""
    result, start = [], 0
    for member in order:
        result.append((start, member))
        start += member.width
    return result


def _fold_tree(gm: fx.GraphModule, graph: fx.Graph, tree: GrownTree,
               new_attrs: dict[str, Any], names: dict[str, str]) -> None:
    """Replace ``tree``'s members by one folded linear; ``names`` maps a target already
    folded (a module called at several places) to its folded module, which is reused."""
    site = tree.site
    name = names.get(site.target)
    if name is None:
        name = names[site.target] = _free_name(gm, f"{module_stem(site)}_folded", new_attrs)
    has_bias = site.bias(gm) is not None
    with torch.no_grad():
        weights, biases = [], []
        offset: dict[int, int] = {id(tree.root): 0}  # a linear's column in its level block
        level_args: list[tuple[int, int, int, str]] = []
        for depth, entries in enumerate(tree.levels()):
            parts, start = [], 0
            for parent, layer in entries:
                parts.append(torch.tensor(layer.indices) + offset[id(parent)])
                modules = [gm.get_submodule(m.target) for m in layer.members]
                weights.append(sum(m.weight.detach() for m in modules))
                if has_bias:
                    biases.append(sum(m.bias.detach() for m in modules))
                for member in layer.members:
                    offset[id(member)] = start  # both members' growth lands in the sum
                start += len(layer.indices)
            index_name = f"{name}_index{depth}"
            new_attrs[index_name] = _index_tensor(parts, site.weight.device)
            level_args.append((start, 0, start, index_name))
        folded = nn.Linear(site.in_features, sum(w for w, *_ in level_args), bias=has_bias,
                           device="meta")
        trainable = site.weight.requires_grad
        folded.weight = nn.Parameter(torch.cat(weights), requires_grad=trainable)
        if has_bias:
            folded.bias = nn.Parameter(torch.cat(biases), requires_grad=trainable)
    new_attrs[name] = folded
    with graph.inserting_before(tree.root.tip):
        pre = graph.call_module(name, (site.input,))
        out = _emit_levels(graph, tree.root.node, pre, level_args)
    tree.root.tip.replace_all_uses_with(out)
    erase_unused(graph, tree.nodes)


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
