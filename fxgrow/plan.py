"""Growth plans: which neurons of which linear layers to grow (docs/selection.md).

A plan is data. It maps a linear's *target* (the naming of :mod:`fxgrow.linears`: the
module path ``blocks.0.mlp.fc1`` for an ``nn.Linear`` call, the weight's path
``blocks.0.attn.qkv.weight`` for ``F.linear``) to sorted, unique neuron indices, i.e. output
channels of that linear. It is validated against a graph before anything is rewritten and
round-trips through JSON, so it can be stored in a model's recipe.
"""

from __future__ import annotations

import difflib
import json
import numbers
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn

from ._ops import get_attr_value
from .errors import PlanError
from .linears import LinearSite, linear_sites

_FORMAT = "fxgrow.GrowthPlan"
_VERSION = 1


def _natural_key(target: str) -> tuple:
    # blocks.2 before blocks.10: numbers compare as numbers
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", target))


def _index(target: str, value: Any) -> int:
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not (
        value.is_floating_point() or value.is_complex() or value.dtype == torch.bool
    ):
        value = value.item()
    # bool is an Integral in Python, but True as a neuron index is a bug in the caller
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise PlanError(f"target {target!r}: neuron index {value!r} is not an integer "
                        f"({type(value).__name__})")
    value = int(value)
    if value < 0:
        raise PlanError(f"target {target!r}: neuron index {value} is negative")
    return value


def _indices(target: str, values: Any) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise PlanError(f"target {target!r}: neuron indices must be a sequence of integers, "
                        f"got {type(values).__name__}")
    if isinstance(values, torch.Tensor):
        values = values.reshape(-1)
    seen: set[int] = set()
    for raw in values:
        i = _index(target, raw)
        if i in seen:
            raise PlanError(f"target {target!r}: neuron index {i} appears more than once")
        seen.add(i)
    if not seen:
        raise PlanError(f"target {target!r} has no neuron indices (leave the target out instead)")
    return tuple(sorted(seen))


def _target(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise PlanError(f"a plan target must be a non-empty string, got {value!r}")
    return value


class GrowthPlan(Mapping[str, tuple[int, ...]]):
    """Linear target -> sorted unique neuron indices to grow.

    ``out_features`` optionally records each target's width in the graph the plan was made
    for (:meth:`for_graph` fills it); :meth:`validate` then rejects a graph whose widths
    differ, i.e. a plan made for another graph. Targets iterate in natural order
    (``blocks.2`` before ``blocks.10``), so the plan, its JSON and the pass built from it
    are deterministic.
    """

    __slots__ = ("_neurons", "_out_features")

    def __init__(
        self,
        neurons: Mapping[str, Iterable[int]] | None = None,
        *,
        out_features: Mapping[str, int] | None = None,
    ) -> None:
        if neurons is None:
            neurons = {}
        if isinstance(neurons, GrowthPlan):
            out_features = {**neurons.out_features, **(out_features or {})}
        if not isinstance(neurons, Mapping):
            raise PlanError(f"a growth plan is a mapping target -> neuron indices, "
                            f"got {type(neurons).__name__}")
        parsed = {_target(t): _indices(t, v) for t, v in neurons.items()}
        self._neurons = {t: parsed[t] for t in sorted(parsed, key=_natural_key)}
        if out_features is not None and not isinstance(out_features, Mapping):
            raise PlanError(f"out_features must be a mapping target -> width, got "
                            f"{type(out_features).__name__}")
        widths: dict[str, int] = {}
        for target, width in (out_features or {}).items():
            if target not in self._neurons:
                raise PlanError(f"out_features given for {target!r}, which the plan does not grow")
            if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width <= 0:
                raise PlanError(f"target {target!r}: out_features must be a positive integer, "
                                f"got {width!r}")
            width = int(width)
            top = self._neurons[target][-1]
            if top >= width:
                raise PlanError(f"target {target!r}: neuron index {top} is out of range for "
                                f"out_features {width}")
            widths[target] = width
        self._out_features = {t: widths[t] for t in self._neurons if t in widths}

    # Mapping protocol ------------------------------------------------------------------
    def __getitem__(self, target: str) -> tuple[int, ...]:
        return self._neurons[target]

    def __iter__(self) -> Iterator[str]:
        return iter(self._neurons)

    def __len__(self) -> int:
        return len(self._neurons)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GrowthPlan):
            return NotImplemented
        return self._neurons == other._neurons and self._out_features == other._out_features

    def __hash__(self) -> int:
        return hash((tuple(self._neurons.items()), tuple(self._out_features.items())))

    def __repr__(self) -> str:
        body = ", ".join(f"{t!r}: {list(v)}" for t, v in self._neurons.items())
        return f"GrowthPlan({{{body}}})"

    # Construction ----------------------------------------------------------------------
    @property
    def out_features(self) -> dict[str, int]:
        """Widths of the targets in the graph the plan was made for (may be empty)."""
        return dict(self._out_features)

    @classmethod
    def for_graph(cls, gm: fx.GraphModule, neurons: Mapping[str, Iterable[int]]) -> GrowthPlan:
        """A plan validated against ``gm`` that remembers each target's width in ``gm``."""
        plan = cls(neurons)
        sites = plan.validate(gm)
        return cls(plan, out_features={t: sites[t][0].out_features for t in plan})

    def merge(self, other: GrowthPlan | Mapping[str, Iterable[int]]) -> GrowthPlan:
        """The union of two plans (indices united per target). Recorded widths must agree."""
        other = other if isinstance(other, GrowthPlan) else GrowthPlan(other)
        neurons = {t: set(v) for t, v in self._neurons.items()}
        for t, v in other.items():
            neurons.setdefault(t, set()).update(v)
        widths = dict(self._out_features)
        for t, w in other._out_features.items():
            if widths.setdefault(t, w) != w:
                raise PlanError(f"cannot merge plans made for different graphs: target {t!r} "
                                f"has out_features {widths[t]} in one and {w} in the other")
        return GrowthPlan(neurons, out_features=widths)

    __or__ = merge

    # Accounting ------------------------------------------------------------------------
    @property
    def num_neurons(self) -> int:
        """Selected neurons over all targets (each becomes a pair, or one neuron when fused)."""
        return sum(len(v) for v in self._neurons.values())

    def num_params(self, gm: fx.GraphModule, mode: Literal["paper", "fused"] = "paper") -> int:
        """Parameters that :func:`fxgrow.passes.grow` adds to ``gm`` for this plan:
        2k(d+1) per target in the paper's form, k(d+1) fused (d = fan-in; the +1 only when
        the target has a bias)."""
        if mode not in ("paper", "fused"):
            raise PlanError(f"mode must be 'paper' or 'fused', got {mode!r}")
        sites = self.validate(gm)
        per_neuron = 2 if mode == "paper" else 1
        total = 0
        for target, indices in self._neurons.items():
            site = sites[target][0]
            total += per_neuron * len(indices) * (site.in_features + int(site.has_bias(gm)))
        return total

    # Validation ------------------------------------------------------------------------
    def validate(self, gm: fx.GraphModule) -> dict[str, list[LinearSite]]:
        """Check the plan against ``gm``; return the linear sites of its targets.

        Raises:
            PlanError: empty plan, unknown target (with close names), a target that is not
                a linear, an index out of range, or widths that differ from the ones
                recorded (a plan made for another graph).
        """
        if not isinstance(gm, fx.GraphModule):
            raise PlanError(f"a plan is validated against a torch.fx.GraphModule, "
                            f"got {type(gm).__name__}")
        if not self._neurons:
            raise PlanError("the growth plan is empty: it selects no neurons")
        sites = linear_sites(gm)
        found: dict[str, list[LinearSite]] = {}
        for target, indices in self._neurons.items():
            if target not in sites:
                raise PlanError(_missing(gm, target, sites))
            width = sites[target][0].out_features
            recorded = self._out_features.get(target)
            if recorded is not None and recorded != width:
                raise PlanError(
                    f"the plan was made for another graph: target {target!r} has "
                    f"out_features {recorded} in the plan but {width} in this graph"
                )
            if indices[-1] >= width:
                raise PlanError(f"target {target!r}: neuron index {indices[-1]} is out of range "
                                f"(out_features {width})")
            found[target] = sites[target]
        return found

    # Serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data; :meth:`from_dict` inverts it."""
        data: dict[str, Any] = {
            "format": _FORMAT,
            "version": _VERSION,
            "neurons": {t: list(v) for t, v in self._neurons.items()},
        }
        if self._out_features:
            data["out_features"] = dict(self._out_features)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GrowthPlan:
        """Rebuild a plan from :meth:`to_dict` output, validating every field."""
        if not isinstance(data, Mapping):
            raise PlanError(f"a stored plan must be a JSON object, got {type(data).__name__}")
        if data.get("format") != _FORMAT:
            raise PlanError(f"not a stored growth plan (format {data.get('format')!r})")
        if data.get("version") != _VERSION:
            raise PlanError(f"unsupported growth plan version {data.get('version')!r}")
        unknown = set(data) - {"format", "version", "neurons", "out_features"}
        if unknown:
            raise PlanError(f"unknown fields in stored plan: {sorted(unknown)}")
        return cls(data.get("neurons"), out_features=data.get("out_features"))

    def to_json(self, **kwargs: Any) -> str:
        """The plan as JSON text (``json.dumps`` keyword arguments are passed through)."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> GrowthPlan:
        """Parse :meth:`to_json` output."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise PlanError(f"growth plan is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


def _missing(gm: fx.GraphModule, target: str, sites: Mapping[str, list[LinearSite]]) -> str:
    """The message for a target with no linear site: not a linear, or unknown."""
    try:
        obj: Any = gm.get_submodule(target)
    except AttributeError:
        try:
            obj = get_attr_value(gm, target)
        except (AttributeError, AssertionError):  # torch asserts on a missing inner attribute
            obj = None
    if isinstance(obj, nn.Linear):
        return f"target {target!r} is an nn.Linear that the graph never calls"
    if obj is not None:
        kind = type(obj).__name__
        if isinstance(obj, torch.Tensor):
            kind = f"tensor of shape {tuple(obj.shape)}, not the weight of a linear call"
        return f"target {target!r} is not a linear ({kind})"
    close = difflib.get_close_matches(target, list(sites), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown target {target!r}: no linear of the graph has this name{hint}"
