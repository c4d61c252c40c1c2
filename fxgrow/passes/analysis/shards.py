"""Splitting the analysis's targets into shares of about equal cost, the same on every
process: each rank of a sharded analysis (docs/distributed.md) analyses one share."""

from __future__ import annotations

import heapq
from collections.abc import Iterable

import torch.fx as fx

from ...errors import AnalysisError
from .targets import resolve_targets


def target_costs(
    gm: fx.GraphModule, targets: Iterable[str] | None = None, form: str = "operator",
    method: str = "fast",
) -> dict[str, int]:
    """The relative cost of analysing each target (default: :func:`default_targets`), in
    graph order: per token, a Lanczos product of the fast method costs out_features x D
    (D = fan_in + bias) per step, and the exact method's sums out_features x D^2; a linear
    called at several sites sees that many times the tokens. The number of Lanczos steps,
    which depends on the spectra, is not known before the solve and is not counted."""
    chosen = resolve_targets(gm, targets, form)
    costs = {}
    for t, sites in chosen.items():
        dim = sites[0].in_features + int(sites[0].has_bias(gm))
        per_token = sites[0].out_features * (dim if method == "fast" else dim * dim)
        costs[t] = per_token * len(sites)
    return costs


def partition(costs: dict[str, int], shares: int) -> list[list[str]]:
    """``costs``'s targets in ``shares`` disjoint lists covering them all, of about equal
    total cost: the most expensive target first, each to the share with the least cost so
    far (ties: the earlier target, the lower share), each list in ``costs``'s order. A
    function of its arguments only, so every rank computes the same shares."""
    if isinstance(shares, bool) or not isinstance(shares, int) or shares < 1:
        raise AnalysisError(f"the number of shares must be a positive int, got {shares!r}")
    order = {t: i for i, t in enumerate(costs)}
    loads = [(0, s) for s in range(shares)]
    owner: dict[str, int] = {}
    for t in sorted(costs, key=lambda t: (-costs[t], order[t])):
        load, share = heapq.heappop(loads)
        owner[t] = share
        heapq.heappush(loads, (load + costs[t], share))
    return [[t for t in costs if owner[t] == s] for s in range(shares)]
