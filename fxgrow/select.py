"""Choosing the neurons to grow from a splitting report (docs/selection.md, paper 3.3)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Literal

from .errors import AnalysisError
from .passes.pairs import without_second_members
from .plan import GrowthPlan

if TYPE_CHECKING:
    from .passes.analysis import SplittingReport


def _count(name: str, value: object, *, allow_zero: bool = True) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0 \
            or (value == 0 and not allow_zero):
        raise AnalysisError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} "
                            f"integer, got {value!r}")
    return int(value)


def select(
    report: SplittingReport,
    *,
    budget: int,
    layer_threshold: int = 60,
    budget_unit: Literal["neurons", "params"] = "neurons",
    per_target_limit: int | Mapping[str, int] | None = None,
    targets: Iterable[str] | None = None,
) -> GrowthPlan:
    """The growth plan the paper's rule picks from ``report``.

    1. Eligible neurons: eigenvalue strictly negative, in ``targets`` (default: every target
       of the report). The minus member of a grown pair whose plus twin is in the report is
       never eligible: the twins are one candidate (docs/packing.md).
    2. A target with fewer eligible neurons than ``layer_threshold`` is skipped entirely.
    3. The remaining eligible neurons are ranked most negative first; ties break by the
       target's position in the report, then by neuron index.
    4. Neurons are taken in that order, skipping those of a target that has reached its
       ``per_target_limit`` (an int for all targets or a mapping target -> limit), until
       the budget is spent: ``budget`` counts new neurons (``"neurons"``, the paper's
       parameter budget) or parameters (``"params"``: a neuron of fan-in d costs
       2 (d + 1), or 2 d without bias, as :meth:`GrowthPlan.num_params` counts the paper's
       pair). Selection stops at the first neuron whose cost exceeds what is left, so the
       ranking is never jumped to fit cheaper neurons in.

    Returns a :class:`~fxgrow.plan.GrowthPlan` (empty when nothing qualifies) that records
    each target's width.
    """
    budget = _count("budget", budget)
    layer_threshold = _count("layer_threshold", layer_threshold)
    if budget_unit not in ("neurons", "params"):
        raise AnalysisError(f"budget_unit must be 'neurons' or 'params', got {budget_unit!r}")
    # a pair's twins have equal splitting matrices: one candidate (docs/packing.md)
    order = without_second_members(report.targets)
    if targets is None:
        chosen = order
    else:
        wanted = [targets] if isinstance(targets, str) else list(targets)
        unknown = [t for t in wanted if t not in report.eigenvalues]
        if unknown:
            raise AnalysisError(f"targets not in the report: {unknown}")
        chosen = [t for t in order if t in set(wanted)]
    limits: dict[str, float] = {}
    for t in chosen:
        if per_target_limit is None:
            limits[t] = math.inf
        elif isinstance(per_target_limit, Mapping):
            limits[t] = (_count(f"per_target_limit[{t!r}]", per_target_limit[t])
                         if t in per_target_limit else math.inf)
        else:
            limits[t] = _count("per_target_limit", per_target_limit)
    if isinstance(per_target_limit, Mapping):
        stray = [t for t in per_target_limit if t not in report.eigenvalues]
        if stray:
            raise AnalysisError(f"per_target_limit names targets not in the report: {stray}")

    candidates: list[tuple[float, int, int, str]] = []
    for rank, t in enumerate(chosen):
        values = report.eigenvalues[t].double().cpu()
        eligible = [(float(values[i]), i) for i in range(values.numel()) if values[i] < 0]
        if len(eligible) < layer_threshold or not eligible:
            continue
        candidates.extend((v, rank, i, t) for v, i in eligible)
    candidates.sort()

    picked: dict[str, list[int]] = {}
    left = budget
    for _, _, i, t in candidates:
        if len(picked.get(t, ())) >= limits[t]:
            continue
        cost = 1 if budget_unit == "neurons" else report.neuron_cost(t)
        if cost > left:
            break
        picked.setdefault(t, []).append(i)
        left -= cost
    return GrowthPlan(
        picked, out_features={t: report.eigenvalues[t].numel() for t in picked}
    )
