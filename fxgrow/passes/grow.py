"""The growth pass: paired, skip-connected neurons added to linear layers (docs/growth.md).

For a target linear ``O = x W^T + b`` and its selected neurons S (k of them, fan-in d), one
round adds a *pseudo-layer*::

    x_g  = x.view_as(x)                  # the target's own input, no copy
    A    = plus(x_g) + minus(x_g)        # paper:  plus = (+a W_S, +a b_S), minus = -plus
         = fused(x_g)                    # fused:  one linear, weight and bias exact zeros
    D    = gelu(A) + A
    R    = -(0.0 - D)                    # D, with a zero of either sign made -0.0
    O'   = add_to_channels(O, S, R)      # O'[..., S] = O[..., S] + R, index_put(accumulate)

so O'_S = O_S + D and the other channels are O's, and every former user of ``O`` reads
``O'``. Why each piece is there:

- ``minus`` holds the bitwise negation of ``plus``, so on the same kernel ``A`` is exactly
  0.0, ``gelu(0) = 0`` and the written-back value equals ``O`` bit for bit.
- Adding +0.0 would turn an output that is exactly -0.0 into +0.0. ``0.0 - D`` is +0.0 for a
  zero of either sign, and negating it gives -0.0, the one value whose addition leaves every
  float unchanged; a non-zero D passes through both steps exactly.
- :func:`add_to_channels` saves only the index for backward and keeps the gradient's
  layout, so the parent linear's gradients are summed exactly as before.
- The view gives the pair its own gradient buffer: autograd sums the two members' input
  gradients there (exactly zero, they are negations of each other) before adding the result
  to ``x``'s gradient, so every existing gradient stays bitwise what it was. Reading ``x``
  directly, the sum could be formed as (g + g_plus) + g_minus, which rounds. A view shares
  ``x``'s storage, so autograd still saves one copy of the input for all pseudo-layers.

Modes and their cost per target (k neurons, fan-in d, bias present):

- ``"paper"`` (default, the paper's form and FLOP accounting): two linears ``*_grow{r}_plus``
  and ``*_grow{r}_minus``; 2k(d+1) parameters, 2kd multiply-adds per token.
- ``"fused"``: one linear ``*_grow{r}_fused`` whose parameters *are* the pair's sum
  W+ + W- and b+ + b- (exact zeros at growth, whatever ``scale``); k(d+1) parameters, kd
  multiply-adds per token. It computes the same function as the pair, and its gradient
  equals each pair member's gradient (1 + gelu'(0)) g x^T = 1.5 g x^T at growth. The pair's
  sum moves by the sum of both members' updates, so the fused neuron follows the pair's
  trajectory under SGD or Adam with twice the learning rate (and under AdamW half the
  decoupled weight decay), provided nothing couples parameters: global gradient-norm
  clipping sees the pair's gradient twice and the fused gradient once.

A target without bias grows neurons without bias (d instead of d+1 above). A target called
at several nodes (a shared module) gets the same new modules at every call, each call with
its own pseudo-layer nodes: the module stays one module, so the tie is kept.
"""

from __future__ import annotations

import copy
import math
import numbers
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, PlanError
from ..linears import LinearSite, linear_input
from ..plan import GrowthPlan
from ..recipes import history
from ._rebuild import build_graph_module
from .replay import register_replay

PASS_NAME = "grow"
_ROLES = ("plus", "minus", "fused")
_INDEX_SUFFIX = re.compile(r"_grow\d+_index$")


def grow(
    gm: fx.GraphModule,
    plan: GrowthPlan | Mapping[str, Any],
    *,
    scale: float = 0.2,
    mode: Literal["paper", "fused"] = "paper",
) -> fx.GraphModule:
    """Grow the neurons of ``plan`` in ``gm``; return a new GraphModule computing the same
    function (bitwise on CPU) with the same gradients for every existing parameter.

    Each target gets one new pseudo-layer per call (see the module docstring for the exact
    subgraph). New modules are named ``{parent}.{name}_grow{r}_{plus|minus|fused}`` plus an
    index buffer ``..._grow{r}_index``, with ``r`` the first round number free for that
    target; growing a target again adds round r+1, and a plan may target the new linears
    of an earlier round (nested growth). Costs: paper mode adds 2k(d+1) parameters and 2kd
    multiply-adds per token per target, fused mode k(d+1) and kd.

    ``gm`` is never modified; its modules and parameters are shared with the result. A
    packed ``gm`` (:func:`fxgrow.passes.pack`) is grown in its exact form, where growth is
    bitwise (pack the result again to train it packed). The result's history gains a
    ``"grow"`` record with the plan, ``scale``, ``mode`` and, for every created module, the
    target it grew from, the neuron indices (row i came from neuron ``indices[i]``) and its
    role (see :func:`grow_lineage`).

    Raises:
        PlanError: a plan that does not fit ``gm`` (checked before anything is built), an
            unknown mode or a non-finite scale.
    """
    if not isinstance(gm, fx.GraphModule):
        raise PlanError(f"grow expects a torch.fx.GraphModule (see fxgrow.trace), "
                        f"got {type(gm).__name__}")
    from .pack import exact_form  # growth is exact only on the unpacked form (docs/packing.md)

    gm = exact_form(gm)
    plan = plan if isinstance(plan, GrowthPlan) else GrowthPlan(plan)
    if mode not in ("paper", "fused"):
        raise PlanError(f"mode must be 'paper' or 'fused', got {mode!r}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise PlanError(f"scale must be a finite real number, got {scale!r}")
    scale = float(scale)
    sites = plan.validate(gm)

    graph = copy.deepcopy(gm.graph)
    nodes = {n.name: n for n in graph.nodes}
    new_attrs: dict[str, Any] = {}
    created: dict[str, dict[str, Any]] = {}
    taken: set[str] = set()
    for target, indices in plan.items():
        stem = module_stem(sites[target][0])
        r = _free_round(gm, stem, taken)
        names = {role: f"{stem}_grow{r}_{role}" for role in (*_ROLES, "index")}
        taken.update(names.values())
        modules = _new_linears(gm, sites[target][0], indices, scale, mode)
        index = torch.tensor(indices, dtype=torch.long, device=sites[target][0].weight.device)
        new_attrs[names["index"]] = index
        for role, module in modules.items():
            new_attrs[names[role]] = module
            created[names[role]] = {
                "target": target,
                "indices": list(indices),
                "role": role,
                "bias": module.bias is not None,
            }
        for site in sites[target]:
            _rewrite(graph, nodes[site.node.name], names, list(modules))

    record = {
        "pass": PASS_NAME,
        "args": {"plan": plan.to_dict(), "scale": scale, "mode": mode, "created": created},
    }
    return build_graph_module(gm, graph, new_attrs, record)


@dataclass(frozen=True)
class Created:
    """One module a grow record created: the target it grew from and from which neurons."""

    name: str
    target: str
    indices: tuple[int, ...]  # row i of the new linear copies neuron indices[i] of target
    role: str  # "plus", "minus" or "fused"
    bias: bool
    round: int  # index of the grow record in the history (0 for a lone record)


def created_modules(source: fx.GraphModule | Mapping[str, Any]) -> list[Created]:
    """Every module the grow records of ``source`` created, oldest first. ``source`` is a
    grown GraphModule (all grow records of its history) or one grow record.

    Raises:
        PlanError: ``source`` is neither a GraphModule nor a grow record.
    """
    if isinstance(source, fx.GraphModule):
        records = [(i, r) for i, r in enumerate(history(source)) if r.get("pass") == PASS_NAME]
    elif isinstance(source, Mapping) and source.get("pass") == PASS_NAME:
        records = [(0, source)]
    else:
        raise PlanError("expected a GraphModule or a 'grow' pass record")
    return [
        Created(name, info["target"], tuple(info["indices"]), info["role"], info["bias"], index)
        for index, record in records
        for name, info in record["args"]["created"].items()
    ]


def grow_lineage(
    source: fx.GraphModule | Mapping[str, Any],
) -> dict[str, tuple[str, tuple[int, ...], str, str]]:
    """Where each grown parameter came from: ``{param name: (parent target, indices, role,
    "weight" | "bias")}``, row i of the parameter having grown from neuron ``indices[i]`` of
    the parent target. ``source`` is a grown GraphModule (all grow records of its history)
    or one grow record."""
    lineage: dict[str, tuple[str, tuple[int, ...], str, str]] = {}
    for c in created_modules(source):
        lineage[f"{c.name}.weight"] = (c.target, c.indices, c.role, "weight")
        if c.bias:
            lineage[f"{c.name}.bias"] = (c.target, c.indices, c.role, "bias")
    return lineage


def replay_grow(gm: fx.GraphModule, record_args: Mapping[str, Any]) -> fx.GraphModule:
    """Apply a recorded growth (the ``args`` of a ``grow`` history entry) to ``gm``, and check
    that it created the modules the record names, so saved weights land where they were.

    Raises:
        CheckpointError: the replay created other modules than the record names.
    """
    result = grow(gm, GrowthPlan.from_dict(record_args["plan"]), scale=record_args["scale"],
                  mode=record_args["mode"])
    made = history(result)[-1]["args"]["created"]
    if sorted(made) != sorted(record_args["created"]):
        raise CheckpointError(
            f"replayed growth created {sorted(made)}, the record says "
            f"{sorted(record_args['created'])}"
        )
    return result


register_replay(PASS_NAME, replay_grow)


def module_stem(site: LinearSite) -> str:
    """The name new modules derive from: the module path, or for ``F.linear`` the path of
    the weight's owner when the weight is called ``weight``."""
    if site.kind == "functional" and site.target.endswith(".weight"):
        return site.target[: -len(".weight")]
    return site.target


def _exists(gm: fx.GraphModule, qualname: str) -> bool:
    owner_path, _, field = qualname.rpartition(".")
    try:
        owner = gm.get_submodule(owner_path) if owner_path else gm
    except AttributeError:
        return False
    return hasattr(owner, field)


def _free_round(gm: fx.GraphModule, stem: str, taken: set[str]) -> int:
    r = 0
    while any(
        _exists(gm, f"{stem}_grow{r}_{role}") or f"{stem}_grow{r}_{role}" in taken
        for role in (*_ROLES, "index")
    ):
        r += 1
    return r


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    # built on the meta device: its own initialisation would be thrown away
    module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    module.weight = nn.Parameter(weight)
    if bias is not None:
        module.bias = nn.Parameter(bias)
    return module


def _new_linears(
    gm: fx.GraphModule, site: LinearSite, indices: tuple[int, ...], scale: float, mode: str
) -> dict[str, nn.Linear]:
    with torch.no_grad():
        rows = torch.tensor(indices, dtype=torch.long, device=site.weight.device)
        bias = site.bias(gm)
        if mode == "fused":
            weight = torch.zeros(len(indices), site.in_features,
                                 dtype=site.weight.dtype, device=site.weight.device)
            return {"fused": _linear(weight, None if bias is None else
                                     torch.zeros(len(indices), dtype=bias.dtype,
                                                 device=bias.device))}
        w_plus = site.weight.detach().index_select(0, rows) * scale
        b_plus = None if bias is None else bias.detach().index_select(0, rows) * scale
        # minus is the bitwise negation of plus, so A+ + A- is exactly zero on one kernel
        return {
            "plus": _linear(w_plus, b_plus),
            "minus": _linear(-w_plus, None if b_plus is None else -b_plus),
        }


def add_to_channels(output: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``output`` with ``rows`` added to its last-dim channels ``index`` (out of place):
    ``result[..., index[i]] = output[..., index[i]] + rows[..., i]``.

    The write-back of every pseudo-layer. ``index_put`` with ``accumulate=True`` keeps only
    the index for backward and passes ``output``'s gradient through as it is, strides
    included (``index_add`` would also keep ``rows`` alive until backward; a reshape to 2-D
    would hand the parent a gradient of another layout, summed in another order)."""
    indices: list[torch.Tensor | None] = [None] * (output.dim() - 1)
    return torch.ops.aten.index_put.default(output, [*indices, index], rows, True)


def next_write_back(node: fx.Node) -> fx.Node | None:
    """The value an earlier round wrote back over ``node``, if any."""
    for user in node.users:
        if user.target is not add_to_channels or user.args[0] is not node:
            continue
        index = user.args[1]
        if isinstance(index, fx.Node) and index.op == "get_attr" and \
                _INDEX_SUFFIX.search(index.target):
            return user
    return None


def _tip(node: fx.Node) -> fx.Node:
    """The last value of ``node`` after the write-backs of earlier rounds."""
    while (later := next_write_back(node)) is not None:
        node = later
    return node


def _rewrite(
    graph: fx.Graph, node: fx.Node, names: dict[str, str], roles: list[str]
) -> None:
    """Insert one pseudo-layer for the linear ``node`` (a node of ``graph``)."""
    # The input is read from the node as it is now: an earlier target in this plan may
    # have redirected it to that target's grown value.
    x = linear_input(node)
    tip = _tip(node)
    with graph.inserting_before(tip.next):
        x_g = graph.call_method("view_as", (x, x))
        branches = [graph.call_module(names[role], (x_g,)) for role in roles]
        a = branches[0]
        for other in branches[1:]:
            a = graph.call_function(operator.add, (a, other))
        act = graph.call_function(F.gelu, (a,))
        delta = graph.call_function(operator.add, (act, a))
        rows = graph.call_function(operator.neg, (graph.call_function(operator.sub, (0.0, delta)),))
        index = graph.get_attr(names["index"])
        out = graph.call_function(add_to_channels, (tip, index, rows))
    tip.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
