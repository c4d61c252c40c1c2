"""The residual stream of a traced transformer and its block boundaries, found from the graph.

The stream is the chain of additions ``x_{t+1} = x_t + branch_t(x_t)``: an ``add`` node one of
whose operands is the previous stream value and whose other operand is computed from it.
The branch of each addition is the set of nodes between the two stream values. Blocks are
read off the branches' structure, not module names: the branch signatures (the ops and module
types of each branch, in order) repeat with some smallest period p (2 in a ViT: attention,
then MLP), and every p consecutive additions form one block. ``docs/triple.md`` describes how
``widen`` and ``deepen`` use this.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from .._ops import get_attr_value

_ADDS = {operator.add, torch.add, operator.iadd}


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "__add__"))


def _ancestors(node: fx.Node, stop: fx.Node) -> set[fx.Node]:
    """Nodes ``node`` depends on, not looking past ``stop``."""
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen or n is stop:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def residual_chain(gm: fx.GraphModule) -> list[fx.Node]:
    """The stream values ``[x_0, x_1, ..., x_n]``: ``x_0`` enters the first addition, ``x_t``
    (t >= 1) is the t-th addition. The longest such chain of the graph; ``[]`` if none."""
    best: list[fx.Node] = []
    following: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if not _is_add(node) or len(node.args) < 2:
            continue
        for stream, branch in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
            if isinstance(stream, fx.Node) and isinstance(branch, fx.Node) and \
                    any(stream in n.all_input_nodes for n in _ancestors(branch, stop=stream)):
                following.setdefault(stream, node)
                break
    starts = [n for n in following if not any(following.get(p) is n for p in following)]
    for start in starts:
        chain = [start]
        while chain[-1] in following:
            chain.append(following[chain[-1]])
        if len(chain) > len(best):
            best = chain
    return best


@dataclass(frozen=True)
class Block:
    """One block: the stream value entering it, the one leaving it, and its nodes (graph
    order, the leaving value last)."""

    entry: fx.Node
    exit: fx.Node
    nodes: tuple[fx.Node, ...]


def _signature(gm: fx.GraphModule, nodes: list[fx.Node]) -> tuple:
    parts = []
    for n in nodes:
        if n.op == "call_module":
            parts.append(("module", type(gm.get_submodule(n.target)).__name__))
        elif n.op == "get_attr":
            value = get_attr_value(gm, n.target)
            parts.append(("attr", tuple(getattr(value, "shape", ()))))
        else:
            parts.append((n.op, str(n.target)))
    return tuple(parts)


def blocks(gm: fx.GraphModule) -> list[Block]:
    """The blocks of ``gm`` in order (see the module docstring); ``[]`` without a stream."""
    chain = residual_chain(gm)
    if len(chain) < 2:
        return []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    all_nodes = list(gm.graph.nodes)
    branches = []
    for a, b in zip(chain, chain[1:]):
        branches.append([n for n in all_nodes[order[a] + 1: order[b] + 1]])
    sigs = [_signature(gm, br) for br in branches]
    n = len(sigs)
    period = next(p for p in range(1, n + 1)
                  if n % p == 0 and all(sigs[t] == sigs[t % p] for t in range(n)))
    result = []
    for start in range(0, n, period):
        nodes = [x for br in branches[start:start + period] for x in br]
        result.append(Block(chain[start], chain[start + period], tuple(nodes)))
    return result
