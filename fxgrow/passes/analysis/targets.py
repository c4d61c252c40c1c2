"""Which linears the splitting analysis looks at: the default targets, the validation of
given ones, and the elementwise activation behind a linear (for the activation form)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
import torch.fx as fx

from ..._ops import is_activation
from ...errors import AnalysisError
from ...linears import LinearSite, linear_sites
from ..pairs import second_members


def _reaches_output_directly(node: fx.Node, linear_nodes: set[fx.Node]) -> bool:
    stack, seen = list(node.users), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "output":
            return True
        if n in linear_nodes:
            continue
        stack.extend(n.users)
    return False


def elementwise_activation(gm: fx.GraphModule, site: LinearSite) -> tuple[fx.Node, Callable] | None:
    """The elementwise activation that is the only user of the site's output, and a
    function applying it to a tensor; None if there is none."""
    users = list(site.node.users)
    if len(users) != 1:
        return None
    (act,) = users
    if not act.args or act.args[0] is not site.node:
        return None
    rest = act.args[1:]
    if not is_activation(gm, act) or any(
        isinstance(a, fx.Node) for a in (*rest, *act.kwargs.values())
    ):
        return None
    if act.op == "call_module":
        return (act, gm.get_submodule(act.target)) if not rest and not act.kwargs else None
    if act.op == "call_function":
        return act, functools.partial(_call_first, act.target, rest, dict(act.kwargs))
    return act, functools.partial(_call_method, act.target, rest, dict(act.kwargs))


def _call_first(fn: Callable, rest: tuple, kwargs: dict, x: torch.Tensor) -> torch.Tensor:
    return fn(x, *rest, **kwargs)


def _call_method(name: str, rest: tuple, kwargs: dict, x: torch.Tensor) -> torch.Tensor:
    return getattr(x, name)(*rest, **kwargs)


def default_targets(gm: fx.GraphModule, form: str = "operator") -> list[str]:
    """The targets :func:`analyze` uses when none are given: every linear of
    :func:`fxgrow.linear_sites` except classifier heads (linears from whose output the graph
    output is reachable without passing through another linear), in graph order. For the
    activation form, only linears whose output feeds solely an elementwise activation. Of a
    grown pair only the plus member is a target: its twin has the same splitting matrices
    (docs/packing.md)."""
    sites = linear_sites(gm)
    linear_nodes = {s.node for ss in sites.values() for s in ss}
    twins = second_members(gm)
    chosen = []
    for target, ss in sites.items():
        if target in twins or any(_reaches_output_directly(s.node, linear_nodes) for s in ss):
            continue
        if form == "activation" and not all(elementwise_activation(gm, s) for s in ss):
            continue
        chosen.append(target)
    return chosen


def resolve_targets(
    gm: fx.GraphModule, targets: Iterable[str] | None, form: str
) -> dict[str, list[LinearSite]]:
    sites = linear_sites(gm)
    if targets is None:
        names = default_targets(gm, form)
        if not names:
            raise AnalysisError(f"the graph has no linear to analyse in the {form} form")
        return {t: sites[t] for t in names}
    if isinstance(targets, str):
        targets = [targets]
    names = list(dict.fromkeys(targets))
    if not names:
        raise AnalysisError("targets is empty")
    missing = [t for t in names if t not in sites]
    if missing:
        described = []
        for t in missing:
            exists = any(
                n.op in ("call_module", "get_attr") and n.target == t for n in gm.graph.nodes
            )
            described.append(f"{t!r} ({'not a linear' if exists else 'not in the graph'})")
        raise AnalysisError(
            f"targets that are not linears of the graph: {', '.join(described)}; "
            f"linears: {list(sites)[:12]}{' ...' if len(sites) > 12 else ''}"
        )
    if form == "activation":
        bare = [t for t in names if not all(elementwise_activation(gm, s) for s in sites[t])]
        if bare:
            raise AnalysisError(
                f"targets whose output does not feed (only) an elementwise activation, so the "
                f"activation form is undefined for them: {bare}; use form='operator'"
            )
    order = {t: i for i, t in enumerate(sites)}
    return {t: sites[t] for t in sorted(names, key=order.__getitem__)}

