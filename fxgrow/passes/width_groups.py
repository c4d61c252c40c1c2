"""Width groups: which linear output channels may be narrowed, found from the graph alone.

The graph is run once on example inputs with, next to every real value, a tensor of the same
shape holding channel *labels*: each output channel of every linear gets an id, and the shape
ops of the graph (reshape, permute, split, unbind, getitem, ...) are applied to the labels as
they are to the values, so heads, q/k/v segments and splits are followed whatever literals or
computed sizes the code uses. Ops that combine channels position by position (an elementwise
product, the dot product of q and k, a qk-norm weight) couple the ids they meet; ops that hold a
width fixed (an add with the residual stream, a conv, a frozen table, the graph output) *tie*
them, with the node as the reason. Couplings between fx nodes form a networkx graph whose
connected components are the groups (docs/reduction.md).

Only shapes and sizes of the real values matter, so the run happens on the meta device (no
arithmetic; shapes are recorded as they go, which ShapeProp would do in a second run) and
falls back to real values when a label op needs a tensor computed in the graph, such as an
index.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .._ops import (
    ACTIVATION_FUNCTIONS,
    ACTIVATION_METHODS,
    ACTIVATION_MODULES,
    ATEN_VIEWS,
    ATTENTION_FUNCTIONS,
    CHANNEL_LOCAL_MODULES,
    CONCATENATIONS,
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    IDENTITY_FUNCTIONS,
    IDENTITY_METHODS,
    LAYER_NORM_FUNCTIONS,
    MATMUL_FUNCTIONS,
    MATMUL_METHODS,
    REDUCTION_FUNCTIONS,
    REDUCTION_METHODS,
    SHAPE_FUNCTIONS,
    SHAPE_METHODS,
    SIZE_FUNCTIONS,
    STACKS,
    get_attr_value,
    EINSUM_FUNCTIONS,
    is_attention,
    is_einsum,
    is_matmul,
)
from ..errors import ReduceError
from ..errors import ShapeQueryNeedsValues as _NeedsRealValues  # the meta run stops
from ..linears import ancestors, linear_site
from ..tracing import examples_from_record


@dataclass(frozen=True)
class ChannelLabels:
    """Labels of one tensor: ``ids`` has the tensor's shape, -1 where nothing is tracked.
    ``chan`` is True for linear-channel labels, False for a parameter's own element ids.
    ``reduce`` reads them to find every tensor's shape once channels are dropped."""

    ids: torch.Tensor
    chan: bool


# Ops whose output has the shape of their first input: the run on the meta device skips them.
_SAME_SHAPE_MODULES = (*CHANNEL_LOCAL_MODULES, *ACTIVATION_MODULES, nn.LayerNorm,
                       nn.modules.batchnorm._BatchNorm)
_SAME_SHAPE_FUNCTIONS = {*LAYER_NORM_FUNCTIONS, *ACTIVATION_FUNCTIONS, F.dropout}


def _varies(ids: torch.Tensor, dim: int) -> bool:
    if ids.shape[dim] <= 1 or ids.stride(dim) == 0:
        return False
    # cheap probe first: channel dims usually differ already between their ends
    if not torch.equal(ids.select(dim, 0), ids.select(dim, -1)):
        return True
    return not torch.equal(ids, ids.narrow(dim, 0, 1).expand_as(ids))


def compact(ids: torch.Tensor) -> torch.Tensor:
    """``ids`` with every dimension along which it is constant cut to size 1."""
    out = ids
    for d in range(ids.dim()):
        if out.shape[d] > 1 and not _varies(out, d):
            out = out.narrow(d, 0, 1)
    return out


@dataclass
class WidthGroup:
    """A set of linear output channels that must be narrowed together.

    ``producers`` are the linear targets whose output rows the group covers, ``consumers`` the
    targets whose input columns it covers. The channels fall into ``segments`` (one per head
    and q/k/v part, one for an MLP hidden layer) of ``segment_sizes`` channels each; a
    reduction keeps the same number in every segment. ``width`` is the segment size (the head
    dim for attention). ``reason`` says why the group cannot be narrowed (None if it can)."""

    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    kind: str
    width: int
    segment_sizes: tuple[int, ...]
    reason: str | None
    # class ids of each segment, in channel order; class ids index WidthAnalysis.class_of
    segments: list[np.ndarray] = field(default=None, repr=False)  # type: ignore[assignment]
    nodes: frozenset[str] = field(default=frozenset(), repr=False)

    @property
    def reducible(self) -> bool:
        return self.reason is None

    def __repr__(self) -> str:
        sizes = set(self.segment_sizes)
        if len(sizes) == 1:
            shape = f"{len(self.segment_sizes)} x {self.width}"
        elif len(self.segment_sizes) <= 6:
            shape = "+".join(map(str, self.segment_sizes))
        else:
            shape = f"{len(self.segment_sizes)} segments of {min(sizes)}..{max(sizes)}"
        state = "reducible" if self.reducible else f"tied: {self.reason}"
        return (f"WidthGroup({self.kind}, {shape}, producers={list(self.producers)}, "
                f"consumers={list(self.consumers)}, {state})")


@dataclass
class _Consumer:
    node: str
    target: str
    columns: torch.Tensor  # label id per input column, -1 if untracked


@dataclass
class WidthAnalysis:
    """Everything :func:`width_groups` learnt from one labelled run (used by ``reduce``)."""

    gm: fx.GraphModule
    groups: list[WidthGroup]
    labels: dict[str, Any]  # node name -> ChannelLabels | tuple | None
    meta: dict[str, Any]  # node name -> example shape (tensors) or plain value (sizes)
    class_of: np.ndarray  # label id -> class id
    ranges: dict[str, tuple[int, int, str]]  # producer target or param path -> (start, end, kind)
    consumers: list[_Consumer]
    logits: dict[str, str]  # matmul/sdpa node name -> its contracted q operand's node name
    group_of_node: dict[str, int]


class ChannelLabeller(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, on_meta: bool):
        super().__init__(gm)
        self.on_meta = on_meta  # real values only matter for their shapes and sizes
        self.meta: dict[str, Any] = {}  # node name -> example shape (tensors) or value
        self.labels: dict[str, Any] = {}
        self.next_id = 0
        self.ranges: dict[str, tuple[int, int, str]] = {}
        self.unions: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.ties: list[tuple[torch.Tensor, str]] = []
        self.edges: list[tuple[str, str]] = []
        self.marks: dict[str, set[str]] = {}
        self.consumers: list[_Consumer] = []
        self.logits: dict[str, str] = {}
        self.producer_nodes: dict[str, list[str]] = {}
        self.frozen: set[str] = set()

    def fetch_attr(self, target: str) -> Any:
        value = super().fetch_attr(target)
        return value.to("meta") if self.on_meta and isinstance(value, torch.Tensor) else value

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        if not self.on_meta:
            return super().call_module(target, args, kwargs)
        module = self.module.get_submodule(target)
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and not kwargs and len(args) == 1:
            # shapes of the common leaves, without running meta kernels
            if type(module) is nn.Linear:
                return x.new_empty((*x.shape[:-1], module.out_features))
            if isinstance(module, _SAME_SHAPE_MODULES):
                return torch.empty_like(x)
        state = {name: t.to("meta") for name, t in
                 [*module.named_parameters(), *module.named_buffers()]}
        return torch.func.functional_call(module, state, args, kwargs)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if self.on_meta and target in _SAME_SHAPE_FUNCTIONS and isinstance(args[0], torch.Tensor):
            return torch.empty_like(args[0])
        return super().call_function(target, args, kwargs)

    # -- ids ---------------------------------------------------------------------------------
    def _alloc(self, key: str, shape: Sequence[int], kind: str) -> torch.Tensor:
        if key not in self.ranges:
            n = int(np.prod(shape)) if len(shape) else 1
            self.ranges[key] = (self.next_id, self.next_id + n, kind)
            self.next_id += n
        start, end, _ = self.ranges[key]
        return torch.arange(start, end).reshape(tuple(shape))

    def _union(self, a: torch.Tensor, b: torch.Tensor, nodes: Sequence[str]) -> None:
        a, b = torch.broadcast_tensors(a, b)
        for d in range(a.dim()):  # pairs repeat along dims where neither side varies
            if a.shape[d] > 1 and not _varies(a, d) and not _varies(b, d):
                a, b = a.narrow(d, 0, 1), b.narrow(d, 0, 1)
        ok = (a >= 0) & (b >= 0)
        if bool(ok.any()):
            self.unions.append((a[ok].reshape(-1), b[ok].reshape(-1)))
        for other in nodes[1:]:
            self.edges.append((nodes[0], other))

    def _tie(self, lab: ChannelLabels, reason: str) -> None:
        ids = compact(lab.ids)
        ids = ids[ids >= 0].unique()
        if ids.numel():
            self.ties.append((ids, reason))

    def _mark(self, name: str, mark: str) -> None:
        self.marks.setdefault(name, set()).add(mark)

    def _lab(self, arg: Any) -> Any:
        """The labels of node ``arg`` at the full shape of its value (a broadcast view)."""
        if not isinstance(arg, fx.Node):
            return None
        return _expand(self.labels.get(arg.name), self.meta.get(arg.name))

    # -- the run -----------------------------------------------------------------------------
    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        try:
            lab = self._label(n, result)
        except (ReduceError, _NeedsRealValues):
            raise
        except Exception as exc:  # a label op the value op accepted: treat as a hard tie
            for arg in _node_args(n):
                lab_in = self._lab(arg)
                if isinstance(lab_in, ChannelLabels) and lab_in.chan:
                    self._tie(lab_in, f"node {n.name!r} ({_describe(n)}) could not be followed: {exc}")
            lab = None
        if lab is not None:
            # stored compact: labels are constant along batch and token dims
            self.labels[n.name] = _compact_lab(lab)
            if not self._explicit_edges(n):
                # a channel-local op: its output carries its inputs' channels
                for arg in _node_args(n):
                    if isinstance(self.labels.get(arg.name), (ChannelLabels, tuple)):
                        self.edges.append((n.name, arg.name))
        self.meta[n.name] = _shapes(result)
        return result

    def _explicit_edges(self, n: fx.Node) -> bool:
        if is_matmul(n) or is_attention(n) or is_einsum(n):
            return True
        return linear_site(self.module, n) is not None

    def _tie_inputs(self, n: fx.Node, why: str) -> None:
        for arg in _node_args(n):
            lab = self._lab(arg)
            for item in (lab if isinstance(lab, tuple) else (lab,)):
                if isinstance(item, ChannelLabels) and item.chan:
                    self._tie(item, f"{why} at node {n.name!r} ({_describe(n)})")

    def _label(self, n: fx.Node, result: Any) -> Any:
        if n.op == "placeholder":
            return None
        if n.op == "output":
            self._tie_inputs(n, "reaches the graph output")
            return None
        if n.op == "get_attr":
            if not isinstance(result, torch.Tensor) or result.dim() == 0:
                return None
            if all(_is_weight_of(n, user, self.module) for user in n.users):
                return None  # a functional linear's weight: its rows are the linear's channels
            frozen = not isinstance(get_attr_value(self.module, n.target), nn.Parameter)
            ids = self._alloc(n.target, result.shape, "frozen" if frozen else "param")
            if frozen:
                self.frozen.add(n.target)
                self.ties.append((ids.reshape(-1), (
                    f"fixed by frozen tensor {n.target!r} of shape {tuple(result.shape)} "
                    f"(get_attr node {n.name!r})")))
            return ChannelLabels(ids, chan=False)
        site = linear_site(self.module, n)
        if site is not None:
            return self._linear(n, site, result)
        in_labs = [self._lab(a) for a in _node_args(n)]
        if not any(isinstance(x, (ChannelLabels, tuple)) for x in in_labs):
            return None
        if n.op == "call_module":
            return self._module(n, self.module.get_submodule(n.target), result)
        target = n.target
        if n.op == "call_method":
            if target in IDENTITY_METHODS:
                return self._lab(n.args[0])
            if target in SHAPE_METHODS:
                return self._shape_op(n, result, method=True)
            if target in ELEMENTWISE_METHODS or target in ACTIVATION_METHODS:
                if target in ACTIVATION_METHODS:
                    self._mark(n.name, "act")
                return self._elementwise(n, result)
            if target in REDUCTION_METHODS:
                return self._reduction(n, result)
            if target in MATMUL_METHODS:
                return self._matmul(n, result)
        elif n.op == "call_function":
            if target in IDENTITY_FUNCTIONS:
                return self._lab(n.args[0])
            if target in SHAPE_FUNCTIONS:
                return self._shape_op(n, result, method=False)
            if target in ACTIVATION_FUNCTIONS or target in ELEMENTWISE_FUNCTIONS:
                if target in ACTIVATION_FUNCTIONS:
                    self._mark(n.name, "act")
                return self._elementwise(n, result)
            if target in REDUCTION_FUNCTIONS:
                return self._reduction(n, result)
            if target in MATMUL_FUNCTIONS:
                return self._matmul(n, result)
            if target in ATTENTION_FUNCTIONS:
                return self._sdpa(n, result)
            if target in EINSUM_FUNCTIONS:
                return self._einsum(n, result)
            if target in CONCATENATIONS:
                return self._cat(n, result)
            if target in LAYER_NORM_FUNCTIONS:
                return self._layer_norm(n, result)
        if not _holds_tensor(result):
            return None  # x.shape, x.size(-1), ...: reading a shape does not tie a width
        self._tie_inputs(n, "used by an op fxgrow cannot narrow")
        return None

    # -- handlers ----------------------------------------------------------------------------
    def _linear(self, n: fx.Node, site: Any, result: torch.Tensor) -> ChannelLabels:
        lab_in = self._lab(site.input)
        packed = None if site.weight_rows is None else (
            f"linear {site.target!r} (node {n.name!r}) has rows {site.weight_rows[0]}:"
            f"{site.weight_rows[1]} of parameter {site.weight_node.target!r} as its weight (a "
            f"packed projection computed in the graph), which fxgrow does not narrow")
        if isinstance(lab_in, ChannelLabels) and lab_in.chan:
            ids = lab_in.ids
            if packed is not None:
                self._tie(lab_in, packed)
            elif any(_varies(ids, d) for d in range(ids.dim() - 1)):
                self._tie(lab_in, f"linear {site.target!r} (node {n.name!r}) mixes channels "
                                  f"across a non-feature dimension")
            else:
                columns = ids.reshape(-1, ids.shape[-1])[0].clone()
                self.consumers.append(_Consumer(site.input.name, site.target, columns))
        ids = self._alloc(site.target, (site.out_features,), "producer")
        self.producer_nodes.setdefault(site.target, []).append(n.name)
        if packed is not None:
            self.ties.append((ids.reshape(-1), packed))
        return ChannelLabels(ids.expand(result.shape), chan=True)

    def _module(self, n: fx.Node, module: nn.Module, result: Any) -> Any:
        lab = self._lab(n.args[0]) if n.args else None
        if not isinstance(lab, ChannelLabels) or not lab.chan:
            return None
        if isinstance(module, ACTIVATION_MODULES):
            self._mark(n.name, "act")
            return lab
        if isinstance(module, CHANNEL_LOCAL_MODULES):
            return lab
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            k = len(module.normalized_shape)
            return self._norm(n, lab, {"weight": module.weight, "bias": getattr(module, "bias", None)},
                              n.target, dims=list(range(-k, 0)))
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = {"weight": module.weight, "bias": module.bias,
                      "running_mean": module.running_mean, "running_var": module.running_var}
            return self._norm(n, lab, params, n.target, dims=[1])
        self._tie(lab, f"used by module {n.target!r} ({type(module).__name__}) at node {n.name!r}")
        return None

    def _norm(self, n: fx.Node, lab: ChannelLabels, params: dict[str, Any], owner: str,
              dims: list[int]) -> ChannelLabels:
        ids = lab.ids
        for name, tensor in params.items():
            if tensor is None:
                continue
            pids = self._alloc(f"{owner}.{name}", tensor.shape, "param")
            shape = [1] * ids.dim()
            for d, size in zip(dims, tensor.shape):
                shape[d] = size
            self._union(ids, pids.reshape(shape), [n.name])
        return lab

    def _layer_norm(self, n: fx.Node, result: torch.Tensor) -> Any:
        lab = self._lab(n.args[0])
        if not isinstance(lab, ChannelLabels) or not lab.chan:
            return None
        args = list(n.args) + [None] * (5 - len(n.args))
        for i, key in enumerate(("input", "normalized_shape", "weight", "bias", "eps")):
            if key in n.kwargs:
                args[i] = n.kwargs[key]
        for arg in (args[2], args[3]):
            plab = self._lab(arg)
            if isinstance(plab, ChannelLabels):
                self._union(lab.ids, plab.ids, [n.name, arg.name])
        return lab

    def _real(self, arg: fx.Node) -> Any:
        """The value of ``arg`` as an argument of a label op: an index tensor must be real."""
        value = self.env[arg]
        if isinstance(value, torch.Tensor) and value.is_meta:
            if arg.op != "get_attr":
                raise _NeedsRealValues(arg.name)
            value = get_attr_value(self.module, arg.target)
        return value

    def _shape_op(self, n: fx.Node, result: Any, method: bool) -> Any:
        first = self._lab(n.args[0])
        if first is None:
            return None
        if isinstance(first, tuple):  # getitem on a split/unbind result
            if n.target is operator.getitem:
                return first[n.args[1]]
            return None
        kwargs = fx.node.map_arg(n.kwargs, self._real)
        rest = list(fx.node.map_arg(tuple(n.args[1:]), self._real))
        if method:
            out = getattr(first.ids, n.target)(*rest, **kwargs)
        elif n.target in ATEN_VIEWS:  # labels are broadcast views: reshape, not view
            out = torch.reshape(first.ids, *rest)
        else:
            out = n.target(first.ids, *rest, **kwargs)
        if isinstance(out, torch.Tensor):
            return ChannelLabels(out, first.chan)
        return tuple(ChannelLabels(o, first.chan) for o in out)

    def _elementwise(self, n: fx.Node, result: Any) -> Any:
        if not isinstance(result, torch.Tensor):
            return None
        chans, params, acts = [], [], []
        for arg in _node_args(n):
            value = self.env[arg]
            if not isinstance(value, torch.Tensor):
                continue
            lab = self._lab(arg)
            if isinstance(lab, ChannelLabels) and lab.chan:
                chans.append((arg, lab))
            elif isinstance(lab, ChannelLabels):
                params.append((arg, lab))
            else:
                acts.append((arg, value))
        if not chans:
            if params and not acts:
                return ChannelLabels(params[0][1].ids.expand(result.shape), False)
            return None
        base_node, base = chans[0]
        out = base.ids.expand(result.shape)
        for arg, lab in chans[1:] + params:
            self._union(out, lab.ids, [n.name, base_node.name, arg.name])
        for arg, _ in chans[1:]:
            self.edges.append((n.name, arg.name))
        self.edges.append((n.name, base_node.name))
        for arg, value in acts:
            if _broadcast_varies(out, value.shape):
                table = self._frozen_source(arg)
                why = (f"combined with a table computed from frozen tensor {table!r} (a position "
                       f"table such as RoPE's cos/sin fixes this width)" if table else
                       "combined with a tensor outside the group (residual stream?)")
                for _, lab in chans:
                    self._tie(lab, f"{why} at node {n.name!r} ({_describe(n)})")
                return None  # tied channels are not narrowed: stop following them
        return ChannelLabels(out, True)

    def _frozen_source(self, node: fx.Node) -> str | None:
        """The frozen tensor (a buffer, not a parameter) that ``node`` is computed from
        without the graph's inputs, if any: a rotary table's ``inv_freq``. Reading a size is
        not reading data (``positions = arange(seq_len)`` is still a table)."""
        sources = ancestors(node, stop=_reads_size)
        if any(n.op == "placeholder" for n in sources):
            return None
        for n in sources:
            value = get_attr_value(self.module, n.target) if n.op == "get_attr" else None
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                return n.target
        return None

    def _reduction(self, n: fx.Node, result: Any) -> Any:
        lab = self._lab(n.args[0])
        if not isinstance(lab, ChannelLabels) or not lab.chan or not isinstance(result, torch.Tensor):
            return None
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
        keepdim = n.kwargs.get("keepdim", n.args[2] if len(n.args) > 2 else False)
        if n.target in ("norm", torch.norm):  # norm(p, dim, keepdim)
            dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else None)
            keepdim = n.kwargs.get("keepdim", n.args[3] if len(n.args) > 3 else False)
        if not isinstance(dim, (int, tuple, list)):
            return None
        dims = [dim] if isinstance(dim, int) else list(dim)
        if any(_varies(lab.ids, d) for d in dims):
            return None
        out = torch.amax(lab.ids, dim=tuple(dims), keepdim=bool(keepdim))
        self.edges.append((n.name, n.args[0].name))
        return ChannelLabels(out, True)

    def _matmul(self, n: fx.Node, result: torch.Tensor) -> Any:
        a_node, b_node = n.args[0], n.args[1]
        a, b = self.env[a_node], self.env[b_node]
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dim() < 2 or b.dim() < 2:
            self._tie_inputs(n, "used by a matmul fxgrow cannot follow")
            return None
        la, lb = self._lab(a_node), self._lab(b_node)
        la = la if isinstance(la, ChannelLabels) and la.chan else None
        lb = lb if isinstance(lb, ChannelLabels) and lb.chan else None
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        ea = la.ids.expand(*batch, *a.shape[-2:]) if la else None
        eb = lb.ids.expand(*batch, *b.shape[-2:]) if lb else None
        a_con = ea is not None and _varies(ea, -1)
        b_con = eb is not None and _varies(eb, -2)
        if a_con and b_con:
            self._union(ea[..., 0, :], eb[..., :, 0], [a_node.name, b_node.name])
            self.edges.append((a_node.name, b_node.name))
            self._mark(a_node.name, "attn")
            self._mark(b_node.name, "attn")
            self.logits[n.name] = a_node.name
        elif a_con or b_con:
            lab = la if a_con else lb
            self._tie(lab, f"contracted by matmul node {n.name!r} with a tensor outside the group")
        a_out = None if (ea is None or a_con) else ea[..., :, :1]
        b_out = None if (eb is None or b_con) else eb[..., :1, :]
        if a_out is not None and b_out is not None:
            a_rows, b_cols = _varies(a_out, -2), _varies(b_out, -1)
            if a_rows and b_cols:
                why = f"mixed with other channels by matmul node {n.name!r} (channel attention)"
                self._tie(la, why)
                self._tie(lb, why)
                self._mark(a_node.name, "attn")
                self._mark(b_node.name, "attn")
                return None
            if b_cols:
                self._tie(la, f"scales value channels per head at matmul node {n.name!r}")
                self._mark(b_node.name, "attn")
                self.edges.append((n.name, b_node.name))
                return ChannelLabels(b_out.expand(result.shape), True)
            if a_rows:
                self._tie(lb, f"scales channels per head at matmul node {n.name!r}")
                self.edges.append((n.name, a_node.name))
                return ChannelLabels(a_out.expand(result.shape), True)
            self._union(a_out[..., :1, :1], b_out[..., :1, :1], [n.name, a_node.name, b_node.name])
            return ChannelLabels(a_out.expand(result.shape), True)
        if b_out is not None:
            if _varies(b_out, -1):
                self._mark(b_node.name, "attn")
            self.edges.append((n.name, b_node.name))
            return ChannelLabels(b_out.expand(result.shape), True)
        if a_out is not None:
            if _varies(a_out, -2):
                self._mark(a_node.name, "attn")
            self.edges.append((n.name, a_node.name))
            return ChannelLabels(a_out.expand(result.shape), True)
        return None

    def _einsum(self, n: fx.Node, result: Any) -> Any:
        """A two-operand einsum as attention writes it (``bhid,bhjd->bhij`` for the logits,
        ``bhij,bhjd->bhid`` for the values): the rules of :meth:`_matmul`, by subscript."""
        equation, operands = n.args[0], list(n.args[1:])
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = list(operands[0])
        parsed = _einsum_subscripts(equation, len(operands))
        if parsed is None or not isinstance(result, torch.Tensor) or not all(
                isinstance(self.env.get(o), torch.Tensor) for o in operands):
            self._tie_inputs(n, "used by an einsum fxgrow cannot follow")
            return None
        (sa, sb), out = parsed
        a_node, b_node = operands
        labs = []
        for node, subs in ((a_node, sa), (b_node, sb)):
            lab = self._lab(node)
            lab = lab if isinstance(lab, ChannelLabels) and lab.chan else None
            ids = lab.ids.expand(self.env[node].shape) if lab else None
            labs.append((node, subs, lab, ids))
        summed = [c for c in dict.fromkeys(sa + sb) if c not in out]
        varying = [[c for c in summed if ids is not None and c in subs
                    and _varies(ids, subs.index(c))] for _, subs, _, ids in labs]
        (va, vb) = varying
        if va and vb and va == vb and all(c in sa and c in sb for c in va):
            pick = [_einsum_pick(ids, subs, va) for _, subs, _, ids in labs]
            self._union(pick[0], pick[1], [a_node.name, b_node.name])
            self.edges.append((a_node.name, b_node.name))
            self._mark(a_node.name, "attn")
            self._mark(b_node.name, "attn")
            self.logits[n.name] = a_node.name
            return None
        for (node, _, lab, _), v in zip(labs, varying):
            if v:
                self._tie(lab, f"contracted by einsum node {n.name!r} with a tensor outside "
                               f"the group")
        outs = [(node, subs, lab, ids) for (node, subs, lab, ids), v in zip(labs, varying)
                if ids is not None and not v]
        carrying = [o for o in outs if any(_varies(o[3], o[1].index(c)) for c in out if c in o[1])]
        if len(carrying) == 2:
            why = f"mixed with other channels by einsum node {n.name!r} (channel attention)"
            for _, _, lab, _ in carrying:
                self._tie(lab, why)
            return None
        if not carrying:
            return None
        node, subs, lab, ids = carrying[0]
        self._mark(node.name, "attn")
        self.edges.append((n.name, node.name))
        return ChannelLabels(_einsum_place(ids, subs, out).expand(result.shape), True)

    def _sdpa(self, n: fx.Node, result: torch.Tensor) -> Any:
        names = ("query", "key", "value")
        nodes = [n.kwargs.get(k, n.args[i] if i < len(n.args) else None) for i, k in enumerate(names)]
        labs = []
        for node in nodes:
            lab = self._lab(node)
            labs.append(lab if isinstance(lab, ChannelLabels) and lab.chan else None)
        lq, lk, lv = labs
        q, k = self.env[nodes[0]], self.env[nodes[1]]
        batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
        eq = lq.ids.expand(*batch, *q.shape[-2:]) if lq else None
        ek = lk.ids.expand(*batch, *k.shape[-2:]) if lk else None
        if any(e is not None and _varies(e, -2) for e in (eq, ek)) or (lv and _varies(lv.ids, -2)):
            why = f"mixed with other channels by attention node {n.name!r} (channel attention)"
            for lab, node in zip(labs, nodes):
                if lab is not None:
                    self._tie(lab, why)
                    self._mark(node.name, "attn")
            return None
        if eq is not None and ek is not None:
            self._union(eq[..., 0, :], ek[..., 0, :], [nodes[0].name, nodes[1].name])
            self.edges.append((nodes[0].name, nodes[1].name))
            self._mark(nodes[0].name, "attn")
            self._mark(nodes[1].name, "attn")
            self.logits[n.name] = nodes[0].name
        elif lq is not None or lk is not None:
            self._tie(lq or lk, f"query/key meet a tensor outside the group at node {n.name!r}")
        for arg in [*n.args[3:], n.kwargs.get("attn_mask")]:
            lab = self._lab(arg)
            if isinstance(lab, ChannelLabels) and lab.chan:
                self._tie(lab, f"used as an attention mask at node {n.name!r}")
        if lv is None:
            return None
        self._mark(nodes[2].name, "attn")
        self.edges.append((n.name, nodes[2].name))
        return ChannelLabels(lv.ids[..., :1, :].expand(result.shape), True)

    def _cat(self, n: fx.Node, result: torch.Tensor) -> Any:
        tensors = n.args[0] if n.args else n.kwargs["tensors"]
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
        labs = [self._lab(t) for t in tensors]
        chans = [lab for lab in labs if isinstance(lab, ChannelLabels) and lab.chan]
        if not chans:
            if all(isinstance(lab, ChannelLabels) for lab in labs):
                return ChannelLabels(n.target([lab.ids for lab in labs], dim), False)
            return None
        if len(chans) != len(labs):
            for lab in chans:
                self._tie(lab, f"concatenated with tensors outside the group at node {n.name!r}")
            return None
        for t in tensors:
            self.edges.append((n.name, t.name))
        if n.target in STACKS or any(_varies(lab.ids, dim) for lab in chans):
            return ChannelLabels(n.target([lab.ids for lab in labs], dim), True)
        first = chans[0].ids.narrow(dim, 0, 1)
        for lab in chans[1:]:
            self._union(first, lab.ids.narrow(dim, 0, 1), [n.name])
        return ChannelLabels(first.expand(result.shape), True)


def _einsum_subscripts(equation: Any, count: int) -> tuple[tuple[str, str], str] | None:
    """``("ab", "bc"), "ac"`` for ``"ab,bc->ac"``; None for what the labels do not follow
    (another operand count, an ellipsis, an implicit output, a repeated subscript)."""
    if count != 2 or not isinstance(equation, str) or "->" not in equation or "." in equation:
        return None
    inputs, out = equation.replace(" ", "").split("->")
    parts = inputs.split(",")
    if len(parts) != 2 or any(len(set(p)) != len(p) for p in (*parts, out)):
        return None
    return (parts[0], parts[1]), out


def _einsum_pick(ids: torch.Tensor, subs: str, keep: list[str]) -> torch.Tensor:
    """``ids`` along the subscripts ``keep`` (in that order), every other dim at index 0."""
    index = [slice(None) if c in keep else 0 for c in subs]
    picked = ids[tuple(index)]
    order = [c for c in subs if c in keep]
    return picked.permute([order.index(c) for c in keep])


def _einsum_place(ids: torch.Tensor, subs: str, out: str) -> torch.Tensor:
    """``ids`` of an operand laid out in the output's subscripts (size 1 where it has none)."""
    kept = [c for c in out if c in subs]
    picked = _einsum_pick(ids, subs, kept)
    return picked.reshape([picked.shape[kept.index(c)] if c in kept else 1 for c in out])


def _reads_size(n: fx.Node) -> bool:
    return (n.target in SIZE_FUNCTIONS or (n.op == "call_method" and n.target in ("size", "dim"))
            or (n.target is getattr and n.args[1:] == ("shape",)))


def _broadcast_varies(ids: torch.Tensor, other_shape: Sequence[int]) -> bool:
    """Whether a tensor of ``other_shape`` differs along a dim where ``ids`` varies."""
    offset = ids.dim() - len(other_shape)
    for d, size in enumerate(other_shape):
        if size > 1 and _varies(ids, d + offset):
            return True
    return False


def _node_args(n: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((n.args, n.kwargs), lambda a: found.append(a) or a)
    return found


def _compact_lab(lab: Any) -> Any:
    if isinstance(lab, tuple):
        return tuple(_compact_lab(x) for x in lab)
    return ChannelLabels(compact(lab.ids), lab.chan) if isinstance(lab, ChannelLabels) else lab


def _expand(lab: Any, shape: Any) -> Any:
    if isinstance(lab, tuple):
        return tuple(_expand(x, s) for x, s in zip(lab, shape))
    if isinstance(lab, ChannelLabels) and isinstance(shape, tuple):
        return ChannelLabels(lab.ids.expand(shape), lab.chan)
    return lab


def _is_weight_of(node: fx.Node, user: fx.Node, gm: fx.GraphModule) -> bool:
    site = linear_site(gm, user)
    return site is not None and site.weight_node is node


def _is_chan(lab: Any) -> bool:
    if isinstance(lab, tuple):
        return any(_is_chan(x) for x in lab)
    return isinstance(lab, ChannelLabels) and lab.chan


def _shapes(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return tuple(_shapes(v) for v in value)
    return value if isinstance(value, (int, float, bool, torch.Size)) else None


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(v) for v in value)
    return False


def _describe(n: fx.Node) -> str:
    if n.op == "call_module":
        return f"call_module {n.target}"
    name = getattr(n.target, "__name__", str(n.target))
    return f"{n.op} {name}"


def _asserted_side(placeholder: fx.Node) -> int | None:
    """The image height a graph checks its input against (timm: ``x.shape[2] == 224``)."""
    for shape in placeholder.users:
        if not (shape.op == "call_function" and shape.args[1:] == ("shape",)):
            continue
        for item in shape.users:
            if item.target is not operator.getitem or item.args[1] != 2:
                continue
            for use in item.users:
                if use.target is operator.eq and isinstance(use.args[1], int):
                    return use.args[1]
    return None


def synthesise_inputs(gm: fx.GraphModule) -> tuple[torch.Tensor, ...]:
    """Example inputs for a graph with one tensor input: an image batch of one when the input
    first meets a Conv2d (its ``in_channels``; the side the graph asserts, else the base spec's
    ``img_size``, else 224), a (1, 8, in_features) sequence when it first meets a linear.
    A graph that :func:`fxgrow.trace` exported gets zeros of its recorded example inputs'
    shapes. Zeros: only shapes matter, and the caller's random state is left alone."""
    record = (((gm.meta.get("fxgrow") or {}).get("base") or {}).get("trace") or {})
    if record.get("method") == "export":
        args, kwargs = examples_from_record(record)
        positional = iter(args)
        return tuple(kwargs[n.name] if n.name in kwargs else next(positional)
                     for n in gm.graph.nodes if n.op == "placeholder")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder" and not n.args]
    if len(placeholders) != 1:
        raise ReduceError(f"graph has {len(placeholders)} inputs: pass example_inputs")
    frontier, seen = [placeholders[0]], set()
    while frontier:
        node = frontier.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, nn.Conv2d):
                # A traced timm model keeps no patch_embed.img_size: the side the graph
                # asserts, else the base spec's img_size, else 224.
                base_size = ((gm.meta.get("fxgrow") or {}).get("base") or {}).get(
                    "kwargs", {}).get("img_size", 224)
                side = _asserted_side(placeholders[0]) or int(
                    base_size[0] if isinstance(base_size, (tuple, list)) else base_size)
                return (torch.zeros(1, module.in_channels, side, side),)
            if isinstance(module, nn.Linear):
                return (torch.zeros(1, 8, module.in_features),)
        site = linear_site(gm, node)
        if site is not None:
            return (torch.zeros(1, 8, site.in_features),)
        frontier.extend(node.users)
    raise ReduceError("cannot guess an example input for this graph: pass example_inputs")


def _hash_lines(node_index: int, lines: torch.Tensor) -> torch.Tensor:
    # splitmix64 of (node, line): a set hash that separates segments seen on different lines
    x = lines.to(torch.int64) + (node_index + 1) * 0x9E3779B97F4A7C15 % (1 << 62)
    x = (x ^ (x >> 30)) * 0x5F6A7C15B4F7
    x = (x ^ (x >> 27)) * 0x94D049BB1331
    return x ^ (x >> 31)


def analyse(gm: fx.GraphModule, example_inputs: Sequence[Any] | None = None) -> WidthAnalysis:
    """Run the labelled interpretation of ``gm`` and build its width groups."""
    labeller = _labelled_run(gm, example_inputs)
    class_of, tie_of = label_classes(labeller)
    reasons = [reason for _, reason in labeller.ties]
    node_index = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    producers_by_node = {node: target for target, nodes in labeller.producer_nodes.items()
                         for node in nodes}
    consumers_by_node: dict[str, list[str]] = {}
    for c in labeller.consumers:
        consumers_by_node.setdefault(c.node, []).append(c.target)

    groups: list[WidthGroup] = []
    group_of_node: dict[str, int] = {}
    for component in _channel_components(labeller, node_index):
        producers = sorted({producers_by_node[x] for x in component if x in producers_by_node},
                           key=lambda t: node_index[labeller.producer_nodes[t][0]])
        if not producers:
            continue
        consumers = sorted({t for x in component for t in consumers_by_node.get(x, ())})
        unit_ids = np.concatenate([np.arange(*labeller.ranges[t][:2]) for t in producers])
        classes, segments = _segments(labeller, component, class_of, unit_ids, node_index)
        sizes = tuple(len(s) for s in segments)
        marks = set().union(*(labeller.marks.get(x, set()) for x in component))
        kind = "attn_head" if "attn" in marks else "mlp_hidden" if "act" in marks else "other"
        held = tie_of[classes]
        held = held[held >= 0]
        reason = reasons[int(held.min())] if held.size else None
        for x in component:
            group_of_node[x] = len(groups)
        groups.append(WidthGroup(tuple(producers), tuple(consumers), kind,
                                 max(sizes) if sizes else 0, sizes, reason, segments,
                                 frozenset(component)))
    return WidthAnalysis(gm, groups, labeller.labels, labeller.meta, class_of,
                         labeller.ranges, labeller.consumers, labeller.logits, group_of_node)


def _labelled_run(gm: fx.GraphModule, example_inputs: Sequence[Any] | None) -> ChannelLabeller:
    """The labeller after one run of ``gm``: on the meta device where the graph allows it,
    else on the real example inputs."""
    if example_inputs is None:
        example_inputs = synthesise_inputs(gm)
    elif isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    with torch.no_grad():
        try:  # shapes on the meta device cost nothing; some graphs need real values
            labeller = ChannelLabeller(gm, on_meta=True)
            labeller.run(*[x.to("meta") if isinstance(x, torch.Tensor) else x
                           for x in example_inputs])
        except ReduceError:
            raise
        except Exception:
            labeller = ChannelLabeller(gm, on_meta=False)
            try:
                labeller.run(*example_inputs)
            except ReduceError:
                raise
            except Exception as exc:
                raise ReduceError(f"the graph does not run on the example inputs: "
                                  f"{type(exc).__name__}: {exc}") from exc
    return labeller


def label_classes(labeller: ChannelLabeller) -> tuple[np.ndarray, np.ndarray]:
    """Per label id its class (ids coupled by some op share one), and per class the index
    of the first tie that holds it (-1 if none does)."""
    n_ids = labeller.next_id
    if labeller.unions:
        a = torch.cat([u[0] for u in labeller.unions]).numpy()
        b = torch.cat([u[1] for u in labeller.unions]).numpy()
    else:
        a = b = np.zeros(0, dtype=np.int64)
    adjacency = scipy.sparse.coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n_ids, n_ids))
    _, class_of = scipy.sparse.csgraph.connected_components(adjacency, directed=False)
    class_of = class_of.astype(np.int64)
    n_classes = int(class_of.max()) + 1 if len(class_of) else 0
    tie_of = np.full(n_classes, -1)
    for i, (ids, _) in enumerate(labeller.ties):
        hit = np.unique(class_of[ids.numpy()])
        tie_of[hit[tie_of[hit] < 0]] = i
    return class_of, tie_of


def _channel_components(labeller: ChannelLabeller, node_index: dict[str, int]) -> list[set[str]]:
    """The nodes carrying linear channels, in connected components of the edges the run
    recorded, ordered by their first node in the graph."""
    graph = nx.Graph()
    for name, lab in labeller.labels.items():
        if _is_chan(lab):
            graph.add_node(name)
    for u, v in labeller.edges:
        if u in labeller.labels and v in labeller.labels:
            graph.add_edge(u, v)
    return sorted(nx.connected_components(graph), key=lambda c: min(node_index[x] for x in c))


def _segments(
    labeller: ChannelLabeller, component: set[str], class_of: np.ndarray, unit_ids: np.ndarray,
    node_index: dict[str, int],
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The classes of a group's producer channels, and those classes split into segments:
    classes that sit on exactly the same lines of the group's tensors, in channel order."""
    # unit ids ascend, so a class's first occurrence is its lowest channel
    classes, first = np.unique(class_of[unit_ids], return_index=True)
    first_unit = unit_ids[first]
    key = torch.zeros(len(classes), dtype=torch.int64)
    for name in component:
        lab = labeller.labels.get(name)
        if not isinstance(lab, ChannelLabels) or not lab.chan:
            continue
        ids = compact(lab.ids)
        vary = [d for d in range(ids.dim()) if ids.shape[d] > 1]
        if not vary:
            continue
        rows = ids.movedim(vary[-1], -1).reshape(-1, ids.shape[vary[-1]])
        lines = torch.arange(rows.shape[0]).unsqueeze(1).expand_as(rows)
        keep = rows >= 0
        cls = torch.from_numpy(np.searchsorted(classes, class_of[rows[keep].numpy()]))
        n_lines = rows.shape[0]
        pairs = np.unique(cls.numpy() * n_lines + lines[keep].numpy())
        key.index_add_(0, torch.from_numpy(pairs // n_lines),
                       _hash_lines(node_index[name], torch.from_numpy(pairs % n_lines)))
    order = np.argsort(first_unit, kind="stable")
    ordered = classes[order]
    seg_key = key.numpy()[order]
    _, first_seen, seg_index = np.unique(seg_key, return_index=True, return_inverse=True)
    return classes, [ordered[seg_index == s] for s in np.argsort(first_seen, kind="stable")]


def width_groups(gm: fx.GraphModule, example_inputs: Sequence[Any] | None = None) -> list[WidthGroup]:
    """The width groups of ``gm``, in graph order (see the module docstring).

    ``example_inputs`` are run through the graph once to learn shapes; if None they are
    synthesised (see :func:`synthesise_inputs`). Raises ReduceError if the graph cannot run."""
    return analyse(gm, example_inputs).groups
