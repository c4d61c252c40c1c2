"""Choosing the neurons to grow from a splitting report (docs/selection.md, paper 3.3)."""

from __future__ import annotations

import math
import numbers
import random
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Literal

from .errors import PlanError
from .passes.pairs import without_second_members
from .plan import GrowthPlan

if TYPE_CHECKING:
    from .passes.analysis import SplittingReport


def _count(name: str, value: object, *, allow_zero: bool = True) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0 \
            or (value == 0 and not allow_zero):
        raise PlanError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} "
                            f"integer, got {value!r}")
    return int(value)


def why_nothing_selected(
    report: SplittingReport, *, layer_threshold: int = 60, targets: Iterable[str] | None = None
) -> str:
    """Why :func:`select` returns an empty plan for ``report``: every eigenvalue exactly zero
    (no loss gradient reaches the analysed layers, as with a zero-initialised classifier
    head), no negative eigenvalue, or no layer with ``layer_threshold`` eligible neurons."""
    chosen = report.targets if targets is None else [t for t in report.targets
                                                     if t in set(targets)]
    values = {t: report.eigenvalues[t] for t in chosen}
    if values and all(not bool(v.any()) for v in values.values()):
        return ("every splitting eigenvalue is exactly 0: no loss gradient reaches the analysed "
                "layers (a zero-initialised classifier head, as torchvision's ViT and timm's "
                "Hiera have, blocks it until the head has trained)")
    negative = {t: int((v < 0).sum()) for t, v in values.items()}
    if not any(negative.values()):
        return "no neuron has a negative splitting eigenvalue: splitting would not lower the loss"
    best = max(negative, key=negative.get)
    return (f"no layer has layer_threshold={layer_threshold} neurons with a negative eigenvalue "
            f"(most: {negative[best]} in {best!r})")


def select(
    report: SplittingReport,
    *,
    budget: int,
    layer_threshold: int = 60,
    budget_unit: Literal["neurons", "params"] = "neurons",
    per_target_limit: int | Mapping[str, int] | None = None,
    targets: Iterable[str] | None = None,
    rule: Literal["splitting", "random", "uniform"] = "splitting",
    seed: int = 0,
) -> GrowthPlan:
    """The growth plan a selection rule picks from ``report``; ``rule="splitting"`` is the
    paper's rule, described below. The ablation rules spend the same budget differently
    (see :func:`select_random` and :func:`select_uniform`, which ``rule`` dispatches to
    with ``budget``, ``budget_unit``, ``targets`` and, for ``"random"``, ``seed``).

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

    Returns a :class:`~fxgrow.plan.GrowthPlan` (empty when nothing qualifies, see
    :func:`why_nothing_selected`) that records each target's width.
    """
    if rule == "random":
        return select_random(report, budget=budget, budget_unit=budget_unit, targets=targets,
                             seed=seed)
    if rule == "uniform":
        return select_uniform(report, budget=budget, budget_unit=budget_unit, targets=targets)
    if rule != "splitting":
        raise PlanError(f"rule must be one of {RULES}, got {rule!r}")
    budget = _count("budget", budget)
    layer_threshold = _count("layer_threshold", layer_threshold)
    # a pair's twins have equal splitting matrices: one candidate (docs/packing.md)
    allowed = set(_chosen_targets(report, targets, budget_unit))
    chosen = [t for t in without_second_members(report.targets) if t in allowed]
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
            raise PlanError(f"per_target_limit names targets not in the report: {stray}")

    candidates: list[tuple[float, int, int, str]] = []
    for rank, t in enumerate(chosen):
        values = report.eigenvalues[t].double().cpu()
        eligible = [(float(values[i]), i) for i in range(values.numel()) if values[i] < 0]
        if len(eligible) < layer_threshold or not eligible:
            continue
        candidates.extend((v, rank, i, t) for v, i in eligible)
    candidates.sort()

    return _take(report, [(t, i) for _, _, i, t in candidates], budget, budget_unit, limits)


RULES = ("splitting", "random", "uniform")

# The names grow gives its new linears (passes/grow.py): ``{stem}_grow{r}_{role}``.
_PSEUDO_LAYER = re.compile(r"_grow\d+_(plus|minus|fused)(\.weight)?$")


def _chosen_targets(
    report: SplittingReport, targets: Iterable[str] | None, budget_unit: str
) -> list[str]:
    """``targets`` (default: all) in the report's order, checked against the report."""
    if budget_unit not in ("neurons", "params"):
        raise PlanError(f"budget_unit must be 'neurons' or 'params', got {budget_unit!r}")
    if targets is None:
        return list(report.targets)
    wanted = [targets] if isinstance(targets, str) else list(targets)
    unknown = [t for t in wanted if t not in report.eigenvalues]
    if unknown:
        raise PlanError(f"targets not in the report: {unknown}")
    return [t for t in report.targets if t in set(wanted)]


def _plan(report: SplittingReport, picked: Mapping[str, list[int]]) -> GrowthPlan:
    return GrowthPlan(
        {t: v for t, v in picked.items() if v},
        out_features={t: report.eigenvalues[t].numel() for t in picked if picked[t]},
    )


def _cost(report: SplittingReport, target: str, budget_unit: str) -> int:
    return 1 if budget_unit == "neurons" else report.neuron_cost(target)


def _take(
    report: SplittingReport, ranked: Iterable[tuple[str, int]], budget: int, budget_unit: str,
    limits: Mapping[str, float] | None = None,
) -> GrowthPlan:
    """Neurons in ``ranked`` order until the first whose cost exceeds what is left (never
    jumping the ranking to fit cheaper ones in); a target at its limit is passed over."""
    picked: dict[str, list[int]] = {}
    left = budget
    for t, i in ranked:
        if limits is not None and len(picked.get(t, ())) >= limits[t]:
            continue
        cost = _cost(report, t, budget_unit)
        if cost > left:
            break
        picked.setdefault(t, []).append(i)
        left -= cost
    return _plan(report, picked)


def select_random(
    report: SplittingReport,
    *,
    budget: int,
    budget_unit: Literal["neurons", "params"] = "neurons",
    targets: Iterable[str] | None = None,
    seed: int = 0,
) -> GrowthPlan:
    """The ablation of the criterion: neurons drawn uniformly at random (a permutation of
    every neuron of ``targets`` fixed by ``seed``), eigenvalues and the layer threshold
    ignored, taken in that order until the budget is spent with the stopping rule of
    :func:`select` (the first neuron that costs more than what is left ends the round)."""
    budget = _count("budget", budget)
    chosen = _chosen_targets(report, targets, budget_unit)
    pool = [(t, i) for t in chosen for i in range(report.eigenvalues[t].numel())]
    random.Random(_count("seed", seed)).shuffle(pool)
    return _take(report, pool, budget, budget_unit)


def select_uniform(
    report: SplittingReport,
    *,
    budget: int,
    budget_unit: Literal["neurons", "params"] = "neurons",
    targets: Iterable[str] | None = None,
) -> GrowthPlan:
    """The ablation of the allocation: the same number k of neurons in every layer of the
    model being grown (the targets that are not themselves new linears of an earlier growth),
    k the largest the budget pays for (capped by the narrowest layer). Within a layer the
    k most negative eigenvalues are taken, sign and layer threshold ignored (ties by
    index), so this rule differs from the splitting rule only in how the budget is spread
    over the layers."""
    budget = _count("budget", budget)
    layers = [t for t in _chosen_targets(report, targets, budget_unit)
              if not _PSEUDO_LAYER.search(t)]
    if not layers:
        return GrowthPlan()
    per_step = sum(_cost(report, t, budget_unit) for t in layers)
    k = min(budget // per_step, min(report.eigenvalues[t].numel() for t in layers))
    picked: dict[str, list[int]] = {}
    for t in layers:
        values = report.eigenvalues[t].double().cpu()
        order = sorted(range(values.numel()), key=lambda i: (float(values[i]), i))
        picked[t] = order[:k]
    return _plan(report, picked)
