"""The grown subgraph of one linear call, as a tree read back from the graph ``grow`` wrote.

``grow`` leaves, for a linear node O with input x, a chain of write-backs
``O -> add_to_channels(O, index, rows) -> ...`` (one per pseudo-layer grown on it, in round
order); each pseudo-layer's rows come from ``gelu(a) + a`` (then the signed-zero step), with
``a`` the sum of its members' values, and each member is itself an ``nn.Linear`` reading a
``view_as`` of x that may carry write-backs of its own (nested growth). :func:`grown_trees`
finds every such tree and checks that nothing outside it reads its inner values, so a pass
may replace the whole tree by another computation of the root's last value. The passes that
do, :func:`fxgrow.passes.pack` and :func:`fxgrow.passes.fold`, are described in
``docs/packing.md``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import GrownTreeMismatch
from ..linears import LinearSite, linear_site
from .grow import Created, add_to_channels, created_modules, next_write_back


@dataclass
class GrownLinear:
    """A linear of a tree: the root target or one member of a pseudo-layer."""

    node: fx.Node  # its call node (the value before any write-back)
    target: str  # the module path (members) or the root's linear target
    width: int
    layers: list[PseudoLayer] = field(default_factory=list)  # grown on it, in round order
    tip: fx.Node | None = None  # its value after the last write-back


@dataclass
class PseudoLayer:
    """One round's pseudo-layer: its members (plus, minus; or fused), written back into the
    channels ``indices`` of its parent linear."""

    members: list[GrownLinear]
    index_target: str
    indices: tuple[int, ...]
    writeback: fx.Node


@dataclass
class GrownTree:
    """A linear call with everything grown on it. ``nodes`` are the graph nodes a rewrite may
    erase once the root's last value (``root.tip``) has been replaced."""

    site: LinearSite
    root: GrownLinear
    nodes: list[fx.Node]

    def levels(self) -> list[list[tuple[GrownLinear, PseudoLayer]]]:
        """``(parent, pseudo-layer)`` by depth (index 0: the pseudo-layers grown on the root),
        each level in the order a depth-first walk of the rounds meets them."""
        levels: list[list[tuple[GrownLinear, PseudoLayer]]] = []

        def walk(linear: GrownLinear, depth: int) -> None:
            for layer in linear.layers:
                if len(levels) <= depth:
                    levels.append([])
                levels[depth].append((linear, layer))
                for member in layer.members:
                    walk(member, depth + 1)

        walk(self.root, 0)
        return levels


def _only_users(node: fx.Node, *allowed: fx.Node) -> None:
    if set(node.users) != set(allowed):
        raise GrownTreeMismatch(node.name)


def _is(node: object, op: str, target: object) -> bool:
    return isinstance(node, fx.Node) and node.op == op and node.target is target


class _Reader:
    def __init__(self, gm: fx.GraphModule, created: dict[str, Created]):
        self.gm = gm
        self.created = created
        self.nodes: list[fx.Node] = []

    def linear(self, node: fx.Node, target: str, width: int) -> GrownLinear:
        linear = GrownLinear(node, target, width)
        tip = node
        while (writeback := next_write_back(tip)) is not None:
            _only_users(tip, writeback)
            linear.layers.append(self.layer(writeback, target))
            tip = writeback
        linear.tip = tip
        return linear

    def layer(self, writeback: fx.Node, parent: str) -> PseudoLayer:
        _, index, rows = writeback.args
        if not (_is(rows, "call_function", operator.neg) and len(rows.args) == 1):
            raise GrownTreeMismatch(writeback.name)
        sub = rows.args[0]
        if not (_is(sub, "call_function", operator.sub) and sub.args[0] == 0.0):
            raise GrownTreeMismatch(rows.name)
        delta = sub.args[1]
        if not (_is(delta, "call_function", operator.add) and len(delta.args) == 2):
            raise GrownTreeMismatch(sub.name)
        act, a = delta.args
        if not (_is(act, "call_function", F.gelu) and act.args == (a,) and not act.kwargs):
            raise GrownTreeMismatch(delta.name)
        for node, users in ((rows, (writeback,)), (sub, (rows,)), (delta, (sub,)),
                            (act, (delta,)), (a, (act, delta)), (index, (writeback,))):
            _only_users(node, *users)
        self.nodes += [index, a, act, delta, sub, rows, writeback]
        tips = list(a.args) if _is(a, "call_function", operator.add) else [a]
        if _is(a, "call_function", operator.add):
            for tip in tips:
                _only_users(tip, a)
        prefix = index.target[: -len("index")]
        members = []
        for tip in tips:
            member = self.member(tip, parent, prefix)
            if member.tip is not tip:
                raise GrownTreeMismatch(tip.name)
            members.append(member)
        roles = sorted(self.created[m.target].role for m in members)
        if roles not in (["minus", "plus"], ["fused"]):
            raise GrownTreeMismatch(writeback.name)
        indices = self.created[members[0].target].indices
        if any(m.width != len(indices) for m in members):
            raise GrownTreeMismatch(writeback.name)
        # the plus member first: the layout of pack puts all plus rows before all minus rows
        members.sort(key=lambda m: self.created[m.target].role != "plus")
        return PseudoLayer(members, index.target, indices, writeback)

    def member(self, tip: fx.Node, parent: str, prefix: str) -> GrownLinear:
        node = tip
        while node.op == "call_function" and node.target is add_to_channels:
            node = node.args[0]
        if node.op != "call_module" or not isinstance(node.target, str):
            raise GrownTreeMismatch(tip.name)
        info = self.created.get(node.target)
        if info is None or info.target != parent or not node.target.startswith(prefix):
            raise GrownTreeMismatch(node.name)
        module = self.gm.get_submodule(node.target)
        if not isinstance(module, nn.Linear) or len(node.args) != 1 or node.kwargs:
            raise GrownTreeMismatch(node.name)
        view = node.args[0]
        if not (isinstance(view, fx.Node) and view.op == "call_method"
                and view.target == "view_as"):
            raise GrownTreeMismatch(node.name)
        self.nodes += [node, view]
        return self.linear(node, node.target, module.out_features)


def _source(view: fx.Node) -> fx.Node:
    while isinstance(view, fx.Node) and view.op == "call_method" and view.target == "view_as":
        view = view.args[0]
    return view


def grown_trees(gm: fx.GraphModule) -> list[GrownTree]:
    """Every linear call of ``gm`` with pseudo-layers grown on it whose subgraph is still the
    one ``grow`` wrote, in graph order. Linears that were never grown are not listed; a
    subgraph edited since (a value of it read elsewhere) is skipped."""
    created = {c.name: c for c in created_modules(gm)}
    trees = []
    for node in gm.graph.nodes:
        if next_write_back(node) is None:
            continue
        site = linear_site(gm, node)
        if site is None or site.target in created:
            continue  # members are read as part of their root's tree
        reader = _Reader(gm, created)
        try:
            root = reader.linear(node, site.target, site.out_features)
            nodes = [node, *reader.nodes]
            inside = set(nodes)
            for member in nodes:
                if member.op == "call_method" and member.target == "view_as":
                    if _source(member) is not site.input:
                        raise GrownTreeMismatch(member.name)
                    if any(user not in inside for user in member.users):
                        raise GrownTreeMismatch(member.name)
        except GrownTreeMismatch:
            continue
        trees.append(GrownTree(site, root, nodes))
    return trees


def erase_unused(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    """Erase those of ``nodes`` left without users, latest first, until none is left over."""
    position = {n: i for i, n in enumerate(graph.nodes)}
    pending = sorted(set(nodes), key=position.__getitem__, reverse=True)
    changed = True
    while changed:
        changed = False
        for node in list(pending):
            if not node.users:
                graph.erase_node(node)
                pending.remove(node)
                changed = True
