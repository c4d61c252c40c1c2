"""Drawing a grown target: its pseudo-layer subgraph and the graph around it.

networkx lays the graph out (graphviz ``dot`` through pygraphviz when it is installed, else in
longest-path columns left to right) and matplotlib's Agg backend draws it, so no display is
needed.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import networkx as nx
import torch.fx as fx

from ..errors import InspectionError
from ..linears import linear_sites
from ..passes.grow import created_modules

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_COLORS = {"target": "#d62728", "growth": "#ff9f1c", "context": "#d9d9d9"}


def growth_nodes(gm: fx.GraphModule, target: str) -> tuple[list[fx.Node], list[fx.Node]]:
    """The nodes of ``target`` (its linear calls) and of every pseudo-layer grown on it.

    The growth nodes are the calls of the modules growth created for ``target`` (nested
    growth included) and every node on a path from them to where their result joins the
    target's output.
    """
    sites = linear_sites(gm).get(target)
    if not sites:
        raise InspectionError(f"{target!r} is not a linear target of this graph")
    target_nodes = [site.node for site in sites]
    names = _created_for(gm, target)
    if not names:
        raise InspectionError(f"{target!r} has not been grown (no grow record created modules on it)")
    graph = _to_networkx(gm)
    seeds = {
        node for node in gm.graph.nodes
        if node.op in ("call_module", "get_attr") and _owner(node.target, names)
    }
    downstream = set(seeds)
    for node in seeds:
        downstream |= nx.descendants(graph, node)
    after_target = set(target_nodes)
    for node in target_nodes:
        after_target |= nx.descendants(graph, node)
    # Joins: where a growth branch meets the target's output stream (each round's write-back).
    joins = {
        n for n in downstream & after_target
        if any(p in downstream and p not in after_target for p in graph.predecessors(n))
    }
    upstream = set(joins)
    for node in joins:
        upstream |= nx.ancestors(graph, node)
    region = (downstream & upstream) | joins
    # Nodes that exist only to feed the growth: the input views, the index buffers.
    feeds_target = set(target_nodes)
    for node in target_nodes:
        feeds_target |= nx.ancestors(graph, node)
    changed = True
    while changed:
        extra = {
            p for n in region for p in graph.predecessors(n)
            if p not in region and p not in feeds_target and p.op != "placeholder"
            and all(u in region for u in graph.successors(p))
        }
        region |= extra
        changed = bool(extra)
    return target_nodes, [n for n in gm.graph.nodes if n in region]


def draw_growth(
    gm: fx.GraphModule,
    target: str,
    path: str | os.PathLike | None = None,
    *,
    radius: int = 2,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """Draw the pseudo-layers grown on ``target`` (orange), the target's node (red) and the
    nodes within ``radius`` edges of them (grey). Returns the matplotlib Figure and, when
    ``path`` is given, also saves it there as a PNG.

    Raises:
        InspectionError: ``target`` is not a linear of ``gm`` or has not been grown.
    """
    from matplotlib.figure import Figure  # not pyplot: no global figure state, no display

    target_nodes, grown = growth_nodes(gm, target)
    graph = _to_networkx(gm)
    core = set(target_nodes) | set(grown)
    region = set(core)
    undirected = graph.to_undirected(as_view=True)
    for node in core:
        region |= set(nx.single_source_shortest_path_length(undirected, node, cutoff=radius))
    sub = graph.subgraph(region).copy()
    positions, columns, rows, graphviz = _layout(sub)
    size = figsize or (min(2.0 + 1.9 * columns, 60.0), min(2.5 + 0.8 * rows, 40.0))
    figure = Figure(figsize=size, dpi=100)
    axes = figure.add_subplot()
    # Edges that skip columns bend away from their row, by about one row whatever their
    # length (arc3's bend is relative to the edge's length), so they miss the nodes between.
    for u, v in sub.edges:
        span = abs(positions[v][0] - positions[u][0]) if graphviz is None else 1.0
        bend = 0.05 if span < 1.5 else -min(0.3, 0.7 / span)
        nx.draw_networkx_edges(sub, positions, edgelist=[(u, v)], ax=axes, arrows=True,
                               arrowsize=12, node_size=2600, edge_color="#8c8c8c",
                               connectionstyle=f"arc3,rad={bend}")
    for node in sub.nodes:
        role = "target" if node in target_nodes else "growth" if node in grown else "context"
        axes.annotate(
            _label(node), positions[node], ha="center", va="center", fontsize=8,
            bbox={"boxstyle": "round,pad=0.35", "facecolor": _COLORS[role],
                  "edgecolor": "#404040", "linewidth": 0.7},
        )
    axes.set_title(
        f"growth on {target}: {len(grown)} growth nodes (orange), target (red), "
        f"context within {radius} edges (grey)", fontsize=10,
    )
    xs = [p[0] for p in positions.values()]
    ys = [p[1] for p in positions.values()]
    pad_x, pad_y = 0.03 * (max(xs) - min(xs)) + 0.6, 0.15 * (max(ys) - min(ys)) + 1.0
    axes.set_xlim(min(xs) - pad_x, max(xs) + pad_x)
    axes.set_ylim(min(ys) - pad_y, max(ys) + pad_y)  # room for the bent long edges
    axes.set_axis_off()
    figure.tight_layout()
    if path is not None:
        figure.savefig(os.fspath(path), format="png")
    return figure


def _created_for(gm: fx.GraphModule, target: str) -> set[str]:
    """Names of the modules grown on ``target``, and on those (nested), transitively."""
    created = created_modules(gm)
    names: set[str] = set()
    frontier = {target}
    while frontier:
        grown = {c.name for c in created if c.target in frontier} - names
        names |= grown
        frontier = grown
    return names


def _owner(attr: str, names: set[str]) -> bool:
    return attr in names or any(attr.startswith(name + ".") for name in names)


def _to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        graph.add_node(node)
        for source in node.all_input_nodes:
            graph.add_edge(source, node)
    return graph


def _layout(
    graph: nx.DiGraph,
) -> tuple[dict[fx.Node, tuple[float, float]], int, int, str | None]:
    """Positions left to right, the number of columns and of rows they span, and the
    graphviz program that placed them (None: fxgrow's own layered layout, in columns)."""
    try:
        from networkx.drawing.nx_agraph import graphviz_layout

        renamed = nx.relabel_nodes(graph, {n: n.name for n in graph.nodes})
        by_name = graphviz_layout(renamed, prog="dot", args="-Grankdir=LR")
        xs = sorted({x for x, _ in by_name.values()})
        ys = sorted({y for _, y in by_name.values()})
        return {n: by_name[n.name] for n in graph.nodes}, len(xs), len(ys), "dot"
    except ImportError:
        pass
    # Longest-path layers; a node without inputs in the drawing (a parameter, an index
    # buffer) sits just before its first consumer instead of in the leftmost column.
    column: dict[fx.Node, int] = {}
    order = list(nx.topological_sort(graph))
    for node in order:
        column[node] = max((column[p] + 1 for p in graph.predecessors(node)), default=0)
    for node in reversed(order):
        if graph.in_degree(node) == 0 and graph.out_degree(node):
            column[node] = max(0, min(column[s] for s in graph.successors(node)) - 1)
    layers: dict[int, list[fx.Node]] = {}
    for node in order:
        layers.setdefault(column[node], []).append(node)
    y: dict[fx.Node, float] = {}
    for c in sorted(layers):
        # Barycentre ordering: a node goes near the nodes that feed it, which keeps a
        # pseudo-layer's chain on one line.
        placed = sorted(
            layers[c],
            key=lambda n: (
                sum(y[p] for p in graph.predecessors(n) if p in y)
                / max(1, sum(1 for p in graph.predecessors(n) if p in y)),
                n.name,
            ),
        )
        for row, node in enumerate(placed):
            y[node] = row - (len(placed) - 1) / 2.0
    positions = {n: (float(column[n]), -y[n]) for n in graph.nodes}
    return positions, len(layers), max(len(v) for v in layers.values()), None


def _label(node: fx.Node) -> str:
    if node.op in ("call_module", "get_attr"):
        owner, _, last = node.target.rpartition(".")
        parent = owner.rpartition(".")[2]
        return f"{parent}.{last}" if parent else last
    if node.op in ("call_function", "call_method"):
        target = node.target
        return target if isinstance(target, str) else getattr(target, "__name__", str(target))
    return node.name
