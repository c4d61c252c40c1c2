"""Sharded splitting analysis under torch.distributed (docs/distributed.md): each rank
analyses its share of the targets on the global batch, and the shares' reports are gathered
so that every rank holds the report one process would compute."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..passes.analysis.report import SplittingReport, merge_reports
from ..passes.analysis.shards import partition, target_costs
from . import distributed


@dataclass
class ShardedAnalysis:
    """The gathered report, the targets each rank analysed (``shares[r]``, in graph
    order) and each rank's seconds recording and solving its share."""

    report: SplittingReport
    shares: list[list[str]]
    record_seconds: list[float]
    solve_seconds: list[float]


def analyze_sharded(
    gm: fx.GraphModule, batches: Sequence[Any], loss_fn: Callable[[Any, Any], torch.Tensor],
    **options: Any,
) -> ShardedAnalysis:
    """:func:`fxgrow.passes.analyze` with its targets split across the ranks
    (:func:`fxgrow.passes.analysis.shards.partition` of their estimated costs). Every rank
    passes the same global ``batches`` and ``options`` (those of ``analyze``); each records
    and solves its share only, and every rank returns the same report, equal to the report
    of one ``analyze`` call with these arguments (a target's result does not depend on the
    other targets of the call). In a single process, one share: ``analyze`` itself.

    Raises:
        AnalysisError: as ``analyze``, on every rank when it fails on any.
        DistributedError: a rank failed otherwise, or did not answer.
    """
    from ..passes import analyze

    rank, world = distributed.rank_world()
    costs = target_costs(gm, options.get("targets"), options.get("form", "operator"),
                         options.get("method", "fast"))
    shares = partition(costs, world)
    mine = shares[rank]

    def run() -> SplittingReport | None:
        if not mine:  # more ranks than targets
            return None
        return analyze(gm, batches, loss_fn, **{**options, "targets": mine})

    parts = distributed.gather_outcomes(run, "analysing this rank's share of the targets")
    done = [p for p in parts if p is not None]
    return ShardedAnalysis(
        report=merge_reports(done, list(costs)), shares=shares,
        record_seconds=[p.seconds["record"] if p is not None else 0.0 for p in parts],
        solve_seconds=[p.seconds["solve"] if p is not None else 0.0 for p in parts],
    )


__all__ = ["ShardedAnalysis", "analyze_sharded"]
