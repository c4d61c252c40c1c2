"""What changed between two GraphModules: nodes, modules and parameters added, removed or
changed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.fx as fx


@dataclass
class GraphDiff:
    """What changed from graph ``a`` to graph ``b``. Nodes are matched by name (passes copy
    the graph, so unchanged nodes keep their names); parameters and buffers by state_dict key,
    modules by qualified name."""

    nodes_added: list[str]
    nodes_removed: list[str]
    nodes_changed: list[tuple[str, str, str]]  # (name, in a, in b)
    modules_added: list[str]
    modules_removed: list[str]
    params_added: dict[str, tuple[int, ...]]
    params_removed: dict[str, tuple[int, ...]]
    params_reshaped: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]

    @property
    def empty(self) -> bool:
        return not any(
            (self.nodes_added, self.nodes_removed, self.nodes_changed, self.modules_added,
             self.modules_removed, self.params_added, self.params_removed, self.params_reshaped)
        )

    def __str__(self) -> str:
        if self.empty:
            return "no differences"
        lines = []

        def section(title: str, items: list[str]) -> None:
            if items:
                lines.append(f"{title} ({len(items)}):")
                lines.extend(f"  {item}" for item in items)

        section("nodes added", self.nodes_added)
        section("nodes removed", self.nodes_removed)
        section("nodes changed", [f"{n}: {a}  ->  {b}" for n, a, b in self.nodes_changed])
        section("modules added", self.modules_added)
        section("modules removed", self.modules_removed)
        section("parameters added", [f"{k} {list(s)}" for k, s in self.params_added.items()])
        section("parameters removed", [f"{k} {list(s)}" for k, s in self.params_removed.items()])
        section("parameters reshaped",
                [f"{k} {list(a)} -> {list(b)}" for k, (a, b) in self.params_reshaped.items()])
        return "\n".join(lines)


def diff(a: fx.GraphModule, b: fx.GraphModule) -> GraphDiff:
    """The nodes, modules and parameters added, removed or changed from ``a`` to ``b``."""
    nodes_a = {n.name: _node_text(n) for n in a.graph.nodes}
    nodes_b = {n.name: _node_text(n) for n in b.graph.nodes}
    modules_a = {name for name, _ in a.named_modules() if name}
    modules_b = {name for name, _ in b.named_modules() if name}
    state_a = {k: tuple(v.shape) for k, v in a.state_dict().items()}
    state_b = {k: tuple(v.shape) for k, v in b.state_dict().items()}
    return GraphDiff(
        nodes_added=[n for n in nodes_b if n not in nodes_a],
        nodes_removed=[n for n in nodes_a if n not in nodes_b],
        nodes_changed=[
            (n, nodes_a[n], nodes_b[n]) for n in nodes_b if n in nodes_a and nodes_a[n] != nodes_b[n]
        ],
        modules_added=sorted(modules_b - modules_a),
        modules_removed=sorted(modules_a - modules_b),
        params_added={k: s for k, s in state_b.items() if k not in state_a},
        params_removed={k: s for k, s in state_a.items() if k not in state_b},
        params_reshaped={
            k: (state_a[k], s) for k, s in state_b.items() if k in state_a and state_a[k] != s
        },
    )


def _node_text(node: fx.Node) -> str:
    def show(value: Any) -> str:
        return repr(fx.node.map_arg(value, lambda n: _Name(n.name)))

    target = node.target if isinstance(node.target, str) else callable_name(node.target)
    text = f"{node.op} {target}{show(tuple(node.args))}"
    if node.kwargs:
        text += f" {show(dict(node.kwargs))}"
    return text


class _Name(str):
    def __repr__(self) -> str:
        return str(self)


def callable_name(fn: Any) -> str:
    """A short readable name for a node's callable target (``F.gelu``, ``operator.add``)."""
    module = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    for prefix, short in (("torch.nn.functional", "F"), ("_operator", "operator"),
                          ("torch._C._nn", "F"), ("torch", "torch")):
        if module.startswith(prefix):
            return f"{short}.{name}"
    return f"{module}.{name}" if module else name

