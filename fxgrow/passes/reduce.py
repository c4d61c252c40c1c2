"""``reduce``: narrow intermediate widths (attention head dim, MLP hidden) of a traced model.

Which channels may go, and what must move with them, comes from
:func:`fxgrow.passes.width_groups`; this pass chooses the channels to keep, slices producer rows
(weights, biases, a computed ``cat(q_bias, k_bias, v_bias)``), consumer columns and every
per-channel parameter met on the way (qk-norm weights, batch norms), and rewrites the shape
literals and computed sizes that depend on the width (docs/reduction.md).

Replay: the pass records the kept row indices of every narrowed producer, and
``reduce(gm, ReduceSpec(indices=...))`` (or ``reduce(gm, **record["args"])``) applies exactly
those, whatever the weights of ``gm``.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .._ops import (ATEN_SPLITS, CONCATENATIONS, DIVISIONS, LAYER_NORM_FUNCTIONS, MULTIPLICATIONS,
                    STACKS, get_attr_value, is_attention, op_name)
from ..errors import ReduceError
from ..linears import linear_sites
from ._rebuild import build_graph_module
from .replay import register_replay
from .width_groups import ChannelLabels, WidthAnalysis, WidthGroup, analyse

Width = float | int | None


@dataclass
class ReduceSpec:
    """What to narrow. ``head_dim`` applies to attention groups, ``mlp_hidden`` to groups that
    pass an elementwise activation into a linear. A float is a ratio of the current width
    (0.5 halves, 1.0 keeps), an int an absolute width. ``widths`` sets an absolute width per
    group, keyed by any producer target of the group. ``keep`` picks the surviving channels:
    ``"norm"`` (largest L2 norm of the producer rows, summed over channels that stay aligned;
    ties go to the lower index) or ``"first"``. ``scale="follow"`` rewrites constant
    attention scales (``q * 0.125``, ``scale=`` of scaled_dot_product_attention) for the new
    head dim; ``"keep"`` keeps the old scale (adding ``scale=`` to fused attention).
    ``indices`` (the replay form) gives the kept output rows per producer target and
    excludes the other selectors."""

    head_dim: Width = None
    mlp_hidden: Width = None
    widths: dict[str, int] = field(default_factory=dict)
    keep: Literal["norm", "first"] = "norm"
    scale: Literal["follow", "keep"] = "follow"
    indices: dict[str, list[int]] | None = None

    @classmethod
    def coerce(cls, spec: ReduceSpec | Mapping[str, Any] | None, **kwargs: Any) -> ReduceSpec:
        """A ReduceSpec from a ReduceSpec, a plain dict with the same keys, or keywords."""
        if spec is None:
            spec = dict(kwargs)
        elif kwargs:
            raise ReduceError("pass either a spec or keyword arguments, not both")
        if isinstance(spec, ReduceSpec):
            out = copy.deepcopy(spec)
        elif isinstance(spec, Mapping):
            names = {f.name for f in fields(cls)}
            unknown = sorted(set(spec) - names)
            if unknown:
                raise ReduceError(f"unknown reduce spec keys {unknown}; expected some of {sorted(names)}")
            out = cls(**{k: copy.deepcopy(v) for k, v in spec.items()})
        else:
            raise ReduceError(f"reduce spec must be a ReduceSpec or a dict, got {type(spec).__name__}")
        out._validate()
        return out

    def _validate(self) -> None:
        for name in ("head_dim", "mlp_hidden"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ReduceError(f"{name} must be a float ratio, an int width or None, got {value!r}")
            if value is not None and not math.isfinite(value):
                raise ReduceError(f"{name}={value!r}: a ratio or width must be finite")
            if value is not None and value <= 0:
                raise ReduceError(f"{name}={value!r}: a width must be positive (width 0 is not allowed)")
        if not isinstance(self.widths, Mapping):
            raise ReduceError(f"widths must map producer targets to ints, got "
                              f"{type(self.widths).__name__}")
        for target, width in self.widths.items():
            if not isinstance(target, str):
                raise ReduceError(f"widths: target {target!r} is not a string")
            if isinstance(width, bool) or not isinstance(width, int) or width <= 0:
                raise ReduceError(f"widths[{target!r}]={width!r}: must be a positive int")
        if self.indices is not None:
            if not isinstance(self.indices, Mapping):
                raise ReduceError(f"indices must map producer targets to lists of row indices, "
                                  f"got {type(self.indices).__name__}")
            for target, rows in self.indices.items():
                if not isinstance(target, str) or isinstance(rows, (str, bytes)) \
                        or not isinstance(rows, Sequence) or not rows or not all(
                            isinstance(i, int) and not isinstance(i, bool) and i >= 0
                            for i in rows):
                    raise ReduceError(f"indices[{target!r}] must be a non-empty list of "
                                      f"non-negative ints, got {rows!r}")
        if self.keep not in ("norm", "first"):
            raise ReduceError(f"keep must be 'norm' or 'first', got {self.keep!r}")
        if self.scale not in ("follow", "keep"):
            raise ReduceError(f"scale must be 'follow' or 'keep', got {self.scale!r}")
        if self.indices is not None and (self.head_dim is not None or self.mlp_hidden is not None
                                         or self.widths):
            raise ReduceError("indices (the replay form) excludes head_dim, mlp_hidden and widths")


# -- choosing channels -------------------------------------------------------------------------

def _class_scores(analysis: WidthAnalysis, group: WidthGroup, sites: Mapping[str, Any]) -> np.ndarray:
    scores = np.zeros(len(analysis.class_of))
    for target in group.producers:
        start, end, _ = analysis.ranges[target]
        weight = sites[target][0].weight.detach()
        norms = torch.linalg.vector_norm(weight, dim=1).double().pow(2).numpy()
        np.add.at(scores, analysis.class_of[start:end], norms)
    return scores


def _new_sizes(group: WidthGroup, request: float | int, what: str) -> list[int]:
    if isinstance(request, float):
        sizes = []
        for size in group.segment_sizes:
            exact = size * request
            if not math.isfinite(exact) or exact > size:
                raise ReduceError(f"{what}: ratio {request} would widen the group of "
                                  f"{group.producers[0]!r}; reduce only narrows")
            if abs(exact - round(exact)) > 1e-9 * max(1, size):
                raise ReduceError(f"{what}: ratio {request} does not divide width {size} of the "
                                  f"group of {group.producers[0]!r} ({size} * {request} = {exact})")
            if round(exact) < 1:
                raise ReduceError(f"{what}: ratio {request} leaves no channel of width {size} "
                                  f"of the group of {group.producers[0]!r} (width 0)")
            if round(exact) > size:
                raise ReduceError(f"{what}: ratio {request} would widen the group of "
                                  f"{group.producers[0]!r}; reduce only narrows")
            sizes.append(int(round(exact)))
        return sizes
    if len(set(group.segment_sizes)) != 1:
        raise ReduceError(f"{what}: the group of {group.producers[0]!r} has segments of different "
                          f"widths {sorted(set(group.segment_sizes))}; give a ratio instead")
    if request > group.width:
        raise ReduceError(f"{what}: width {request} exceeds the current width {group.width} of the "
                          f"group of {group.producers[0]!r}; reduce only narrows")
    return [request] * len(group.segment_sizes)


def _select(analysis: WidthAnalysis, spec: ReduceSpec) -> tuple[np.ndarray, list[WidthGroup]]:
    """Per class: keep or not; and the groups that change."""
    keep = np.ones(int(analysis.class_of.max()) + 1 if len(analysis.class_of) else 0, dtype=bool)
    by_producer = {t: g for g in analysis.groups for t in g.producers}
    if spec.indices is not None:
        return keep, _select_recorded(analysis, spec.indices, by_producer, keep)
    return keep, _select_requested(analysis, spec, by_producer, keep)


def _select_recorded(analysis: WidthAnalysis, indices: Mapping[str, Sequence[int]],
                     by_producer: dict[str, WidthGroup], keep: np.ndarray) -> list[WidthGroup]:
    """The replay form: keep exactly the recorded rows of every producer (and what they
    imply for the rest of its group); ``keep`` is updated in place."""
    wanted: dict[int, set[int]] = {}
    for target, rows in indices.items():
        group = by_producer.get(target)
        if group is None:
            raise ReduceError(f"indices: {target!r} is not the producer of any width group")
        if not group.reducible:
            raise ReduceError(f"indices: the group of {target!r} cannot be narrowed: {group.reason}")
        start, end, _ = analysis.ranges[target]
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0 or rows.min() < 0 or rows.max() >= end - start or len(set(rows.tolist())) != rows.size:
            raise ReduceError(f"indices[{target!r}]: rows must be distinct, in [0, {end - start}) "
                              f"and not empty")
        wanted.setdefault(id(group), set()).update(analysis.class_of[start + rows].tolist())
    changed: list[WidthGroup] = []
    for group in analysis.groups:
        if id(group) not in wanted:
            continue
        kept = wanted[id(group)]
        for segment in group.segments:
            keep[segment] = np.isin(segment, list(kept))
        for target, rows in indices.items():
            if by_producer[target] is group:
                start, end, _ = analysis.ranges[target]
                implied = np.nonzero(keep[analysis.class_of[start:end]])[0]
                if sorted(rows) != implied.tolist():
                    raise ReduceError(f"indices[{target!r}] disagrees with the rows kept in its "
                                      f"group by the other producers (q and k of a head must match)")
        changed.append(group)
    return changed


def _select_requested(analysis: WidthAnalysis, spec: ReduceSpec,
                      by_producer: dict[str, WidthGroup], keep: np.ndarray) -> list[WidthGroup]:
    """Widths by request (ratios or absolute widths): keep the best-scoring or the first
    channels of every segment; ``keep`` is updated in place."""
    groups = analysis.groups
    sites = linear_sites(analysis.gm)
    for target in spec.widths:
        if target not in by_producer:
            raise ReduceError(f"widths: {target!r} is not the producer of any width group")
    for kind, request in (("attn_head", spec.head_dim), ("mlp_hidden", spec.mlp_hidden)):
        if request is not None and request != 1.0 and not any(g.kind == kind for g in groups):
            tied = "; ".join(f"{g.producers[0]!r}: {g.reason}" for g in groups
                             if not g.reducible and "residual" not in g.reason
                             and "graph output" not in g.reason)[:600]
            raise ReduceError(f"{kind} width requested but the graph has no {kind} group"
                              + (f" (groups that are tied: {tied})" if tied else ""))
    changed: list[WidthGroup] = []
    for group in groups:
        explicit = [spec.widths[t] for t in group.producers if t in spec.widths]
        if explicit:
            request, what = explicit[0], f"widths[{group.producers[0]!r}]"
        elif group.kind == "attn_head":
            request, what = spec.head_dim, "head_dim"
        elif group.kind == "mlp_hidden":
            request, what = spec.mlp_hidden, "mlp_hidden"
        else:
            continue
        if request is None or (isinstance(request, float) and request == 1.0):
            continue
        if not group.reducible:
            raise ReduceError(f"{what}: the width group of {group.producers[0]!r} ({group.kind}) "
                              f"cannot be narrowed: {group.reason}")
        sizes = _new_sizes(group, request, what)
        if sizes == list(group.segment_sizes):
            continue
        scores = _class_scores(analysis, group, sites) if spec.keep == "norm" else None
        for segment, size in zip(group.segments, sizes):
            if scores is None:
                chosen = np.arange(size)
            else:  # largest score first, the lower position on ties
                chosen = np.lexsort((np.arange(len(segment)), -scores[segment]))[:size]
            mask = np.zeros(len(segment), dtype=bool)
            mask[chosen] = True
            keep[segment] = mask
        changed.append(group)
    return changed


# -- rewriting ---------------------------------------------------------------------------------

class _Shapes:
    """New shapes of labelled tensors once the dropped channels are gone."""

    def __init__(self, keep_id: torch.Tensor):
        # one extra True at the end: label -1 (untracked) indexes it
        self.keep_ext = np.append(keep_id.numpy(), True)
        self.cache: dict[int, tuple[list[int], int | None]] = {}

    def of(self, lab: ChannelLabels, old: Sequence[int], where: str) -> tuple[list[int], int | None]:
        """(new shape, the dim that changed or None)."""
        if id(lab) not in self.cache:
            self.cache[id(lab)] = self._of(lab, old, where)
        new, dim = self.cache[id(lab)]
        return list(new), dim

    def _of(self, lab: ChannelLabels, old: Sequence[int], where: str) -> tuple[list[int], int | None]:
        ids = lab.ids  # stored compact
        vary = [d for d in range(ids.dim()) if ids.shape[d] > 1]
        new = list(old)
        if not vary or not lab.chan:
            return new, None
        dim = vary[-1]
        counts = self.keep_ext[ids.numpy()].sum(axis=dim)
        low, high = int(counts.min()), int(counts.max())
        if low != high:
            raise ReduceError(f"node {where!r}: the kept channels would give lines of different "
                              f"widths ({low} and {high}) along dim {dim}; every head must keep "
                              f"the same number of channels")
        if high == old[dim]:
            return new, None
        new[dim] = high
        return new, dim


def _float_arg(node: fx.Node, meta: Mapping[str, Any]) -> tuple[int, float] | None:
    """A float literal argument, or one computed in the graph (``head_dim ** -0.5``)."""
    for i, arg in enumerate(node.args):
        if isinstance(arg, fx.Node) and isinstance(meta.get(arg.name), float):
            return i, meta[arg.name]
        if isinstance(arg, float):
            return i, arg
    return None


def _is_mul(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in MULTIPLICATIONS)
            or (node.op == "call_method" and node.target == "mul"))


def _is_div(node: fx.Node) -> bool:
    return ((node.op == "call_function" and node.target in DIVISIONS)
            or (node.op == "call_method" and node.target == "div"))


def _head_dims(analysis: WidthAnalysis, shapes: _Shapes, name: str) -> tuple[int, int] | None:
    """(old, new) size of the innermost channel dim of node ``name``'s labels, if it changes."""
    lab = analysis.labels.get(name)
    old = analysis.meta.get(name)
    if not isinstance(lab, ChannelLabels) or not isinstance(old, tuple):
        return None
    new, dim = shapes.of(lab, old, name)
    return None if dim is None else (old[dim], new[dim])


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6)


def _rewrite_scale(node: fx.Node, new_node: fx.Node, analysis: WidthAnalysis, shapes: _Shapes,
                   spec: ReduceSpec) -> None:
    if is_attention(node):
        q = node.kwargs.get("query", node.args[0] if node.args else None)
        dims = _head_dims(analysis, shapes, q.name) if isinstance(q, fx.Node) else None
        if dims is None:
            return
        old, new = dims
        scale = node.kwargs.get("scale")
        kwargs = dict(new_node.kwargs)
        if spec.scale == "keep" and scale is None:
            kwargs["scale"] = old ** -0.5
        elif spec.scale == "follow" and isinstance(scale, float) and _close(scale, old ** -0.5):
            kwargs["scale"] = new ** -0.5
        new_node.kwargs = kwargs
        return
    if spec.scale == "keep" or not (_is_mul(node) or _is_div(node)):
        return
    found = _float_arg(node, analysis.meta)
    tensor = next((a for a in node.args if isinstance(a, fx.Node)
                   and isinstance(analysis.meta.get(a.name), tuple)), None)
    if found is None or tensor is None:
        return
    if tensor.name in analysis.logits:
        dims = _head_dims(analysis, shapes, analysis.logits[tensor.name])
    else:
        dims = _head_dims(analysis, shapes, tensor.name)
        group = analysis.group_of_node.get(tensor.name)
        if group is None or analysis.groups[group].kind != "attn_head":
            dims = None
    if dims is None:
        return
    old, new = dims
    i, value = found
    if _is_mul(node) and _close(value, old ** -0.5):
        replacement = new ** -0.5
    elif _is_div(node) and _close(value, old ** 0.5):
        replacement = new ** 0.5
    else:
        return
    args = list(new_node.args)
    args[i] = replacement
    new_node.args = tuple(args)


def _rewrite_entries(entries: list[Any], old: Sequence[int], new: Sequence[int],
                     offset: int) -> list[Any]:
    """Shape entries with the changed size written as a literal (a -1 infers it already; a
    size computed in the graph, such as ``C // num_heads``, would keep the old value)."""
    for d in range(len(entries)):
        if new[d + offset] != old[d + offset] and entries[d] != -1:
            entries[d] = new[d + offset]
    return entries


def _rewrite_shape_args(node: fx.Node, new_node: fx.Node, analysis: WidthAnalysis,
                        shapes: _Shapes) -> None:
    lab = analysis.labels.get(node.name)
    old = analysis.meta.get(node.name)
    method = node.op == "call_method"
    name = node.target if method else op_name(node.target)
    if node.op not in ("call_method", "call_function"):
        return
    if name in ("reshape", "view", "expand") and isinstance(lab, ChannelLabels) and isinstance(old, tuple):
        new, dim = shapes.of(lab, old, node.name)
        if dim is None:
            return
        args = list(new_node.args)
        if len(args) == 2 and isinstance(args[1], fx.Node) and isinstance(
                analysis.meta.get(node.args[1].name), tuple):
            return  # reshape(y.shape): follows y's new shape when the graph runs
        entries = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        if len(entries) != len(old):
            raise ReduceError(f"node {node.name!r}: cannot rewrite the shape argument of {name}")
        if method and len(args) == 2 and isinstance(args[1], (tuple, list)):
            args[1] = type(args[1])(_rewrite_entries(list(args[1]), old, new, 0))
        elif method:
            args[1:] = _rewrite_entries(list(args[1:]), old, new, 0)
        elif len(args) > 1 and isinstance(args[1], (tuple, list)):
            args[1] = type(args[1])(_rewrite_entries(list(args[1]), old, new, 0))
        else:
            raise ReduceError(f"node {node.name!r}: cannot rewrite the shape argument of {name}")
        new_node.args = tuple(args)
    elif name == "unflatten" and isinstance(lab, ChannelLabels) and isinstance(old, tuple):
        new, dim = shapes.of(lab, old, node.name)
        if dim is None:
            return
        args = list(new_node.args)
        in_dims = len(old) - len(args[2]) + 1
        start = args[1] if args[1] >= 0 else args[1] + in_dims
        args[2] = type(args[2])(_rewrite_entries(list(args[2]), old, new, start))
        new_node.args = tuple(args)
    elif name in ("split", "split_with_sizes") and isinstance(lab, tuple) and isinstance(old, tuple):
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0)
        sizes_old, sizes_new = [], []
        for part, part_old in zip(lab, old):
            new = shapes.of(part, part_old, node.name)[0] if isinstance(part, ChannelLabels) else list(part_old)
            sizes_old.append(part_old[dim])
            sizes_new.append(new[dim])
        if sizes_new == sizes_old:
            return
        args = list(new_node.args)
        args[1] = sizes_new
        new_node.args = tuple(args)
        if node.target in ATEN_SPLITS:  # aten.split takes one size, not a list
            new_node.target = torch.ops.aten.split_with_sizes.default
    elif node.op == "call_function" and node.target in LAYER_NORM_FUNCTIONS:
        x = node.args[0]
        x_lab, x_old = analysis.labels.get(x.name), analysis.meta.get(x.name)
        if not isinstance(x_lab, ChannelLabels) or not isinstance(x_old, tuple):
            return
        new, dim = shapes.of(x_lab, x_old, node.name)
        if dim is None:
            return
        normalized = node.kwargs.get("normalized_shape", node.args[1] if len(node.args) > 1 else ())
        set_layer_norm_shape(new_node, tuple(new[-len(normalized):]))


def set_layer_norm_shape(node: fx.Node, shape: tuple[int, ...]) -> None:
    """Give an ``F.layer_norm`` node the normalized shape ``shape`` (positional or keyword)."""
    if "normalized_shape" in node.kwargs:
        node.kwargs = {**node.kwargs, "normalized_shape": shape}
    else:
        args = list(node.args)
        args[1] = shape
        node.args = tuple(args)


def clone_module(module: nn.Module, tensors: Mapping[str, torch.Tensor], attrs: Mapping[str, Any]) -> nn.Module:
    new = copy.copy(module)
    new._parameters = module._parameters.copy()
    new._buffers = module._buffers.copy()
    new._modules = module._modules.copy()
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    for name, tensor in tensors.items():
        if name in module._parameters and module._parameters[name] is not None:
            new._parameters[name] = nn.Parameter(tensor, requires_grad=module._parameters[name].requires_grad)
        else:
            new._buffers[name] = tensor
    for key, value in attrs.items():
        setattr(new, key, value)
    return new


def _slice(tensor: torch.Tensor, index: Sequence[torch.Tensor | None]) -> torch.Tensor:
    out = tensor.detach()
    for d, idx in enumerate(index):
        if idx is not None:
            out = out.index_select(d, idx)  # a copy: the input's weights are never shared
    return out.clone() if all(i is None for i in index) else out


def _like(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    if isinstance(old, nn.Parameter):
        return nn.Parameter(new, requires_grad=old.requires_grad)
    return new


def reduce(
    gm: fx.GraphModule,
    spec: ReduceSpec | Mapping[str, Any] | None = None,
    example_inputs: Sequence[Any] | torch.Tensor | None = None,
    **spec_kwargs: Any,
) -> fx.GraphModule:
    """A new GraphModule with narrower intermediate widths (see :class:`ReduceSpec`).

    ``example_inputs`` are run once to find the width groups (shapes only matter); if None
    they are synthesised from the graph (:func:`fxgrow.passes.width_groups.synthesise_inputs`:
    one image at the model's ``img_size`` or 224, or an 8-token sequence). The spec can also be
    given as keywords, so ``reduce(gm, **record["args"])`` replays a recorded reduction. The
    input is never modified; unchanged modules and parameters are shared with it.

    Raises:
        ReduceError: naming the group, node and reason when a request cannot be honoured.
    """
    spec = ReduceSpec.coerce(spec, **spec_kwargs)
    analysis = analyse(gm, example_inputs)
    keep_class, changed = _select(analysis, spec)
    keep_id = torch.from_numpy(keep_class[analysis.class_of]) if len(analysis.class_of) else torch.zeros(0, dtype=torch.bool)
    shapes = _Shapes(keep_id)
    changed_nodes = set().union(*(g.nodes for g in changed)) if changed else set()

    # Every tensor of a changed group must keep a rectangular shape.
    for name in changed_nodes:
        lab, old = analysis.labels.get(name), analysis.meta.get(name)
        for part, part_old in (zip(lab, old) if isinstance(lab, tuple) else [(lab, old)]):
            if isinstance(part, ChannelLabels) and isinstance(part_old, tuple):
                shapes.of(part, part_old, name)

    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(gm.graph, val_map)
    graph.output(output)
    if changed:
        for node in gm.graph.nodes:
            new_node = val_map.get(node)
            if new_node is None:  # the output node
                continue
            _rewrite_shape_args(node, new_node, analysis, shapes)
            _rewrite_scale(node, new_node, analysis, shapes, spec)

    new_attrs = _new_attrs(gm, analysis, keep_id) if changed else {}
    indices: dict[str, list[int]] = {}
    for group in changed:
        for target in group.producers:
            start, end, _ = analysis.ranges[target]
            indices[target] = np.nonzero(keep_id[start:end].numpy())[0].tolist()
    record = {"pass": "reduce", "args": {"indices": indices, "scale": spec.scale}}
    try:
        return build_graph_module(gm, graph, new_attrs, record)
    except RuntimeError as exc:
        raise ReduceError(f"the reduced graph is invalid: {exc}") from exc


def _new_attrs(gm: fx.GraphModule, analysis: WidthAnalysis, keep_id: torch.Tensor) -> dict[str, Any]:
    """Every module and tensor that loses channels, sliced: linears (rows and columns),
    functional linears' biases, and the per-channel parameters met on the way."""
    new_attrs = _sliced_linears(gm, _kept_rows(analysis, keep_id), _kept_columns(analysis, keep_id))
    new_attrs.update(_sliced_parameters(gm, analysis, keep_id))
    return new_attrs


def _kept_rows(analysis: WidthAnalysis, keep_id: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per producer that loses rows: the indices of the rows it keeps."""
    rows: dict[str, torch.Tensor] = {}
    for target, (start, end, kind) in analysis.ranges.items():
        if kind == "producer":
            kept = keep_id[start:end]
            if not bool(kept.all()):
                rows[target] = torch.nonzero(kept).flatten()
    return rows


def _kept_columns(analysis: WidthAnalysis, keep_id: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per consumer that loses input columns: the indices of the columns it keeps."""
    cols: dict[str, torch.Tensor] = {}
    for consumer in analysis.consumers:
        columns = consumer.columns
        kept = torch.where(columns >= 0, keep_id[columns.clamp(min=0)], True)
        index = torch.nonzero(kept).flatten()
        previous = cols.get(consumer.target)
        if previous is not None and not torch.equal(previous, index):
            raise ReduceError(f"linear {consumer.target!r} is applied to inputs that would keep "
                              f"different columns")
        if not bool(kept.all()):
            cols[consumer.target] = index
    return cols


def _sliced_linears(gm: fx.GraphModule, rows: Mapping[str, torch.Tensor],
                    cols: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    new_attrs: dict[str, Any] = {}
    sites = linear_sites(gm)
    for target in sorted(set(rows) | set(cols)):
        site = sites[target][0]
        row, col = rows.get(target), cols.get(target)
        weight = _slice(site.weight, [row, col])
        if site.kind == "module":
            module = gm.get_submodule(target)
            tensors = {"weight": weight}
            if module.bias is not None and row is not None:
                tensors["bias"] = _slice(module.bias, [row])
            new_attrs[target] = clone_module(module, tensors, {
                "in_features": weight.shape[1], "out_features": weight.shape[0]})
        else:
            stored = get_attr_value(gm, site.weight_node.target)
            new_attrs[site.weight_node.target] = _like(stored, site.stored(weight).contiguous())
            if row is not None:
                for site_i in sites[target]:
                    new_attrs.update(_sliced_bias(gm, site_i, row))
    return new_attrs


def _sliced_parameters(gm: fx.GraphModule, analysis: WidthAnalysis,
                       keep_id: torch.Tensor) -> dict[str, Any]:
    """Per-channel parameters of the narrowed groups (norm weights, qk-norms, batch norms):
    free-standing tensors sliced, and the modules that hold them cloned with their slices."""
    new_attrs: dict[str, Any] = {}
    called_modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    module_tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, (start, end, kind) in analysis.ranges.items():
        if kind != "param":
            continue
        kept = keep_id[start:end]
        if bool(kept.all()):
            continue
        owner, _, name = key.rpartition(".")
        tensor = get_attr_value(gm, key)
        sliced = _slice(tensor, _rectangular_index(key, kept.reshape(tensor.shape)))
        if owner in called_modules:
            module_tensors.setdefault(owner, {})[name] = sliced
        else:
            new_attrs[key] = _like(tensor, sliced)
    for owner, tensors in module_tensors.items():
        module = gm.get_submodule(owner)
        attrs: dict[str, Any] = {}
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            k = len(module.normalized_shape)
            attrs["normalized_shape"] = tuple(tensors["weight"].shape[-k:]) if "weight" in tensors \
                else module.normalized_shape
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            attrs["num_features"] = next(iter(tensors.values())).shape[0]
        else:
            raise ReduceError(f"module {owner!r} ({type(module).__name__}) holds channels that "
                              f"are narrowed but fxgrow does not know how to slice it")
        new_attrs[owner] = clone_module(module, tensors, attrs)
    return new_attrs


def _rectangular_index(key: str, mask: torch.Tensor) -> list[torch.Tensor | None]:
    """Per dim of parameter ``key``, the indices kept along it (None: all), for a ``mask``
    of kept elements that must be a product of one index set per dim."""
    index = []
    for d in range(mask.dim()):
        others = [x for x in range(mask.dim()) if x != d]
        along = mask.any(dim=others) if others else mask
        index.append(None if bool(along.all()) else torch.nonzero(along).flatten())
    expected = torch.ones_like(mask)
    for d, idx in enumerate(index):
        if idx is not None:
            line = torch.zeros(mask.shape[d], dtype=torch.bool)
            line[idx] = True
            expected = expected & line.reshape([-1 if x == d else 1 for x in range(mask.dim())])
    if not torch.equal(expected, mask):
        raise ReduceError(f"parameter {key!r} would lose a non-rectangular set of elements")
    return index


def _sliced_bias(gm: fx.GraphModule, site: Any, row: torch.Tensor) -> dict[str, Any]:
    """New tensors for a functional linear's bias: a parameter, or ``cat`` of parameters and
    buffers (BEiT/EVA ``cat(q_bias, k_bias, v_bias)``), each operand sliced to its rows."""
    bias = site.bias_node
    if bias is None:
        return {}
    if bias.op == "get_attr":
        tensor = get_attr_value(gm, bias.target)
        return {bias.target: _like(tensor, _slice(tensor, [row]))}
    if bias.op == "call_function" and bias.target in CONCATENATIONS - STACKS:
        parts = bias.args[0] if bias.args else bias.kwargs["tensors"]
        dim = bias.kwargs.get("dim", bias.args[1] if len(bias.args) > 1 else 0)
        if all(isinstance(p, fx.Node) and p.op == "get_attr" for p in parts) and dim in (0, -1):
            out: dict[str, Any] = {}
            offset = 0
            for part in parts:
                tensor = get_attr_value(gm, part.target)
                size = tensor.shape[0]
                local = row[(row >= offset) & (row < offset + size)] - offset
                out[part.target] = _like(tensor, _slice(tensor, [local]))
                offset += size
            return out
    raise ReduceError(f"linear {site.target!r}: cannot slice its bias computed by node {bias.name!r}")


def replay_reduce(gm: fx.GraphModule, record_args: Mapping[str, Any],
                  example_inputs: Sequence[Any] | torch.Tensor | None = None) -> fx.GraphModule:
    """Apply a recorded reduction (the ``args`` of a ``reduce`` history entry) to ``gm``."""
    return reduce(gm, dict(record_args), example_inputs)


register_replay("reduce", replay_reduce)
