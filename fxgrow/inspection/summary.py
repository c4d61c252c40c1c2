"""Looking inside a (grown) GraphModule: a per-node summary and growth depths.

Growth facts come from the ``grow`` records of the graph's history (docs/growth.md), read by
:func:`fxgrow.passes.grow.created_modules`: every record lists the modules it created, the
target each grew from and which of the target's neurons each new row copies. From those,
per neuron of a target:

- *layers*: how many pseudo-layers were stacked directly on the neuron (one per growth round
  that selected it);
- *depth*: how many nested pseudo-layers its deepest path passes through. A pseudo-layer on
  the neuron counts 1, plus the depth of the neuron's copies inside that pseudo-layer's new
  linears when a later round grew those (nested growth). An ungrown neuron has depth 0.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .._ops import get_attr_value
from ..errors import FxgrowError, InspectionError
from ..linears import linear_site
from ..passes.grow import Created, created_modules
from ..verify.flops import node_flops
from .diff import callable_name

# --------------------------------------------------------------------------------- growth


@dataclass
class TargetGrowth:
    """How one linear target was grown, over every round of the history."""

    target: str
    root: str  # the original (not created by growth) target this one descends from
    rounds: list[int]  # history indices of the grow records that grew this target
    layers: dict[int, int]  # neuron -> pseudo-layers stacked directly on it
    depth: dict[int, int]  # neuron -> nested pseudo-layers on its deepest path
    new_modules: list[str]
    new_neurons: int  # rows of the new linears attached directly to this target
    new_params: int

    @property
    def neurons_grown(self) -> int:
        """Distinct neurons of the target that received at least one pseudo-layer."""
        return len(self.layers)

    @property
    def pseudo_layers(self) -> int:
        """Pseudo-layers on this target's neurons, summed over neurons and rounds."""
        return sum(self.layers.values())

    @property
    def max_depth(self) -> int:
        return max(self.depth.values(), default=0)

    def row(self) -> dict[str, Any]:
        histogram: dict[int, int] = defaultdict(int)
        for value in self.depth.values():
            histogram[value] += 1
        return {
            "target": self.target,
            "root": self.root,
            "rounds": len(self.rounds),
            "neurons_grown": self.neurons_grown,
            "pseudo_layers": self.pseudo_layers,
            "new_neurons": self.new_neurons,
            "new_params": self.new_params,
            "max_depth": self.max_depth,
            "depth_histogram": dict(sorted(histogram.items())),
        }


def growth(gm: fx.GraphModule) -> dict[str, TargetGrowth]:
    """Per grown target (original or created by an earlier round), how it was grown."""
    created = created_modules(gm)
    by_name = {c.name: c for c in created}
    # One pseudo-layer = the modules one record created on one target.
    layers: dict[tuple[str, int], list[Created]] = defaultdict(list)
    for c in created:
        layers[(c.target, c.round)].append(c)

    depth_cache: dict[tuple[str, int], int] = {}

    def depth(target: str, neuron: int) -> int:
        key = (target, neuron)
        if key not in depth_cache:
            best = 0
            for (t, _), members in layers.items():
                if t != target or neuron not in members[0].indices:
                    continue
                inner = 0
                for member in members:
                    for row, source in enumerate(member.indices):
                        if source == neuron:
                            inner = max(inner, depth(member.name, row))
                best = max(best, 1 + inner)
            depth_cache[key] = best
        return depth_cache[key]

    def root(target: str) -> str:
        while target in by_name:
            target = by_name[target].target
        return target

    result: dict[str, TargetGrowth] = {}
    for (target, round_index), members in layers.items():
        entry = result.get(target)
        if entry is None:
            entry = result[target] = TargetGrowth(target, root(target), [], {}, {}, [], 0, 0)
        entry.rounds.append(round_index)
        for neuron in members[0].indices:
            entry.layers[neuron] = entry.layers.get(neuron, 0) + 1
        for member in members:
            entry.new_modules.append(member.name)
            entry.new_neurons += len(member.indices)
            module = _maybe_submodule(gm, member.name)
            if module is not None:
                entry.new_params += sum(p.numel() for p in module.parameters())
    for entry in result.values():
        entry.rounds = sorted(set(entry.rounds))
        entry.layers = dict(sorted(entry.layers.items()))
        entry.depth = {n: depth(entry.target, n) for n in entry.layers}
    return dict(sorted(result.items()))


def _maybe_submodule(gm: nn.Module, name: str) -> nn.Module | None:
    try:
        return gm.get_submodule(name)
    except AttributeError:
        return None


# -------------------------------------------------------------------------------- summary


@dataclass
class Summary:
    """A per-node table of a GraphModule run on example inputs, with growth per target.

    ``rows`` (one dict per node) and ``growth_rows`` (one per grown target) are plain data for
    notebooks; ``table()`` / ``growth_table()`` / ``str()`` print them.
    """

    rows: list[dict[str, Any]]
    growth_rows: list[dict[str, Any]]
    growth: dict[str, TargetGrowth] = field(repr=False)

    @property
    def total_params(self) -> int:
        return sum(r["params"] for r in self.rows)

    @property
    def total_flops(self) -> int:
        return sum(r["flops"] for r in self.rows)

    def table(self, *, only_counted: bool = False) -> str:
        """The per-node table; ``only_counted`` keeps nodes with parameters, FLOPs or growth."""
        rows = [
            r for r in self.rows
            if not only_counted or r["params"] or r["flops"] or r["grown"] or r["grown_from"]
        ]
        body = [
            [
                r["node"], r["op"], _short(r["target"]), _shape_text(r["shape"]),
                f"{r['params']:,}", f"{r['flops']:,}",
                str(r["grown"] or ""), str(r["depth"] or ""), r["grown_from"] or "",
            ]
            for r in rows
        ]
        body.append(["total", "", "", "", f"{self.total_params:,}", f"{self.total_flops:,}",
                     "", "", ""])
        head = ["node", "op", "target", "shape", "params", "flops", "grown", "depth", "grown from"]
        return _format(head, body, numeric={4, 5, 6, 7})

    def growth_table(self) -> str:
        """One line per grown target: rounds, neurons grown, pseudo-layers, depths."""
        head = ["target", "rounds", "neurons grown", "pseudo-layers", "new neurons",
                "new params", "max depth", "neurons by depth"]
        body = [
            [r["target"], str(r["rounds"]), str(r["neurons_grown"]), str(r["pseudo_layers"]),
             str(r["new_neurons"]), f"{r['new_params']:,}", str(r["max_depth"]),
             " ".join(f"{d}:{n}" for d, n in r["depth_histogram"].items())]
            for r in self.growth_rows
        ]
        return _format(head, body, numeric={1, 2, 3, 4, 5, 6})

    def __str__(self) -> str:
        text = self.table(only_counted=True)
        if self.growth_rows:
            text += "\n\n" + self.growth_table()
        return text


def summary(gm: fx.GraphModule, inputs: Any) -> Summary:
    """Run ``gm`` once on ``inputs`` (a tensor or a tuple of positional inputs) and tabulate,
    per node: op, target, output shape, parameters it owns, FLOPs, and growth.

    FLOPs follow :func:`fxgrow.verify.count_flops` (fvcore's convention): one multiply-add of a
    linear, convolution, matmul or of the QK^T and AV products of
    ``scaled_dot_product_attention`` is one flop, a layer norm costs 5 (4 without affine)
    per element, elementwise ops cost 0. A parameter is counted at the first node that uses it, so the column sums
    to the parameters the graph uses. ``grown``/``depth`` on a target's node are the number of
    its neurons that received pseudo-layers and their largest nesting depth; ``grown from``
    marks the nodes of modules created by growth. Runs under ``no_grad`` with the RNG state
    restored afterwards; ``gm`` (its graph, node meta, mode and weights) is not changed.
    """
    args = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    try:
        shapes, arg_shapes = _ShapeRecorder(gm).collect(*args)
    except FxgrowError:
        raise
    except Exception as exc:  # the model's own check or kernel: name the input that failed
        given = ", ".join(f"tensor of shape {tuple(a.shape)}" if isinstance(a, torch.Tensor)
                          else type(a).__name__ for a in args)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InspectionError(f"summary: the graph cannot run on ({given}): "
                              f"{type(exc).__name__}: {first}") from exc
    grown = growth(gm)
    created = {c.name: c for c in created_modules(gm)}
    seen_params: set[int] = set()
    rows = []
    for node in gm.graph.nodes:
        target = node.target if isinstance(node.target, str) else callable_name(node.target)
        site = linear_site(gm, node) if node.op in ("call_module", "call_function") else None
        key = site.target if site is not None else (node.target if node.op == "call_module" else None)
        entry = grown.get(key) if key is not None else None
        origin = created.get(key) if key is not None else None
        rows.append({
            "node": node.name,
            "op": node.op,
            "target": target,
            "shape": shapes.get(node.name),
            "params": _owned_params(gm, node, seen_params),
            "flops": node_flops(gm, node, *arg_shapes.get(node.name, ((), {})),
                                shapes.get(node.name)),
            "grown": entry.neurons_grown if entry else 0,
            "depth": entry.max_depth if entry else 0,
            "grown_from": f"{origin.target} ({origin.role})" if origin else None,
        })
    return Summary(rows, [g.row() for g in grown.values()], grown)


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph and keeps each node's output shape (and the input shapes FLOP formulas
    need) in dicts of its own: unlike ShapeProp it writes nothing into the graph's nodes."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm, garbage_collect_values=True)
        self.shapes: dict[str, Any] = {}
        self.arg_shapes: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        self.arg_shapes[n.name] = (_shape_of(args), _shape_of(kwargs))
        result = super().run_node(n)
        self.shapes[n.name] = _shape_of(result)
        return result

    def collect(self, *args: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Per node name: the output's shape, and the shapes of its ``(args, kwargs)``."""
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            self.run(*args)
        return self.shapes, self.arg_shapes


def _shape_of(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, torch.Size):
        return None
    if isinstance(value, (tuple, list)):
        return tuple(_shape_of(v) for v in value)
    if isinstance(value, dict):
        return {k: _shape_of(v) for k, v in value.items()}
    return None


def _owned_params(gm: fx.GraphModule, node: fx.Node, seen: set[int]) -> int:
    if node.op == "call_module":
        tensors = list(gm.get_submodule(node.target).parameters())
    elif node.op == "get_attr":
        value = get_attr_value(gm, node.target)
        tensors = [value] if isinstance(value, nn.Parameter) else []
    else:
        return 0
    total = 0
    for tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel()
    return total


# -------------------------------------------------------------------------------- helpers


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


def _shape_text(shape: Any) -> str:
    if shape is None:
        return ""
    if isinstance(shape, tuple) and all(isinstance(d, int) for d in shape):
        return "x".join(map(str, shape)) or "scalar"
    return str(shape).replace(" ", "")


def _format(head: list[str], body: list[list[str]], numeric: set[int]) -> str:
    widths = [max(len(head[i]), *(len(r[i]) for r in body)) if body else len(head[i])
              for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(head), rule, *(line(r) for r in body)])
