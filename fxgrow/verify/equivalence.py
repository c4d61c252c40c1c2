"""Node-by-node equivalence of two graphs (docs/growth.md: growth is exact on CPU).

``check_equivalence`` runs a reference and a candidate GraphModule on the same inputs with an
``fx.Interpreter`` that records every node's value, compares the nodes the two graphs share,
then backpropagates a scalar through both and compares the gradients of the parameters they
share.

Matching rule: a candidate node matches a reference node when it has the same *name*, the
same ``op`` and the same ``target`` (the string for modules, attributes and methods; the
callable itself for functions). Passes that copy a graph keep node names, so every original
node of a grown graph matches; a node whose name was reused for something else does not.
The output node is always compared. Parameters match by identity first, then by qualified
name.

Exactness: by default a tensor on the CPU in float32 or float64 (and any integer or bool
tensor) must be equal element for element (max abs difference 0.0; -0.0 equals +0.0; NaN
equals NaN at the same position). Other dtypes and devices get a tolerance
``|a - b| <= atol + rtol * |a|`` from their dtype unless ``atol``/``rtol`` are given.

Neither model is changed: gradients are taken with ``torch.autograd.grad`` so no ``.grad``
is written, training flags are left alone, and both runs start from the same RNG state (so
dropout in training mode draws the same masks, as long as the candidate calls the random
ops in the same order) inside ``torch.random.fork_rng``, which leaves the caller's RNG as it
was.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from ..errors import EquivalenceError

_TOLERANCES = {  # (atol, rtol) when not exact
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-10, 1e-10),
}


@dataclass(frozen=True)
class Row:
    """One compared value: a node's output (``kind="value"``) or a parameter's gradient."""

    kind: str  # "value" | "grad"
    name: str  # node name or parameter name
    op: str  # the node's op, or "param"
    shape: tuple[int, ...] | None
    max_abs_diff: float
    ok: bool
    note: str = ""


@dataclass
class EquivalenceReport:
    """The result of :func:`check_equivalence`. ``rows`` follow the reference graph's order,
    value rows first, then gradient rows."""

    rows: list[Row] = field(default_factory=list)
    unmatched_reference: list[str] = field(default_factory=list)
    unmatched_candidate: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every compared value and gradient is within tolerance."""
        return all(r.ok for r in self.rows)

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if not r.ok]

    @property
    def first_divergence(self) -> Row | None:
        """The first failing row in reference graph order (values before gradients)."""
        failures = self.failures
        return failures[0] if failures else None

    @property
    def max_abs_diff(self) -> float:
        return max((r.max_abs_diff for r in self.rows), default=0.0)

    def table(self, *, only_failures: bool = False, max_rows: int | None = None) -> str:
        """A text table of the rows (all, or only failing ones), and a summary line."""
        rows = self.failures if only_failures else self.rows
        shown = rows if max_rows is None else rows[:max_rows]
        header = ("kind", "name", "op", "shape", "max|diff|", "status")
        lines = [
            (r.kind, r.name, r.op, "x".join(map(str, r.shape)) if r.shape is not None else "-",
             f"{r.max_abs_diff:.3g}",
             ("ok" if r.ok else "DIFF") + (f" ({r.note})" if r.note else ""))
            for r in shown
        ]
        widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
                  for i, h in enumerate(header)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
        out += [fmt.format(*line) for line in lines]
        if len(shown) < len(rows):
            out.append(f"... {len(rows) - len(shown)} more rows")
        out.append(self.summary())
        return "\n".join(out)

    def summary(self) -> str:
        values = [r for r in self.rows if r.kind == "value"]
        grads = [r for r in self.rows if r.kind == "grad"]
        state = "EQUIVALENT" if self.ok else f"NOT EQUIVALENT (first: {self.first_divergence.name})"
        return (f"{state}: {sum(r.ok for r in values)}/{len(values)} shared nodes and "
                f"{sum(r.ok for r in grads)}/{len(grads)} shared parameter gradients agree; "
                f"max |diff| {self.max_abs_diff:.3g}; {len(self.unmatched_candidate)} candidate "
                f"and {len(self.unmatched_reference)} reference nodes unmatched")

    def __str__(self) -> str:
        if self.ok:
            return self.summary()
        return self.table(only_failures=True, max_rows=40)


def _node_key(node: fx.Node) -> tuple[str, str, Any]:
    return (node.name, node.op, node.target)


def _leaves(value: Any) -> list[Any]:
    return tree_flatten(value)[0]


def _exact(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def _compare_tensor(
    a: torch.Tensor, b: torch.Tensor, atol: float | None, rtol: float | None
) -> tuple[float, bool, str]:
    if a.shape != b.shape:
        return math.inf, False, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if a.dtype != b.dtype:
        return math.inf, False, f"dtype {a.dtype} vs {b.dtype}"
    if a.device != b.device:
        b = b.to(a.device)
    if a.numel() == 0:
        return 0.0, True, ""
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    if not a.is_floating_point():
        diff = (a.long() - b.long()).abs().max().item() if a.dtype != torch.bool else float(
            (a != b).any().item())
        return float(diff), diff == 0, ""
    a64, b64 = a.detach().double(), b.detach().double()
    nan_a, nan_b = a64.isnan(), b64.isnan()
    if not torch.equal(nan_a, nan_b):
        return math.inf, False, "NaN at different positions"
    both = ~nan_a
    a64, b64 = a64[both], b64[both]
    if a64.numel() == 0:
        return 0.0, True, ""
    same_inf = (a64 == b64) & a64.isinf()
    diff = (a64 - b64).abs().masked_fill(same_inf, 0.0)
    worst = diff.max().item()
    if atol is None and rtol is None and _exact(a):
        return worst, worst == 0.0, ""
    default_atol, default_rtol = _TOLERANCES.get(a.dtype, (1e-5, 1e-5))
    tol = (default_atol if atol is None else atol) + (default_rtol if rtol is None else rtol) * \
        a64.abs().masked_fill(same_inf, 0.0)
    return worst, bool((diff <= tol).all().item()), ""


def _compare(a: Any, b: Any, atol: float | None, rtol: float | None) -> tuple[float, bool, str]:
    leaves_a, spec_a = tree_flatten(a)
    leaves_b, spec_b = tree_flatten(b)
    if spec_a != spec_b:
        return math.inf, False, "different structure"
    worst, ok, note = 0.0, True, ""
    for x, y in zip(leaves_a, leaves_b):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            d, good, why = _compare_tensor(x, y, atol, rtol)
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            d, good, why = math.inf, False, "tensor vs non-tensor"
        else:
            good = _same_object(x, y)
            d, why = (0.0 if good else math.inf), ("" if good else f"{x!r} vs {y!r}")
        worst = max(worst, d)
        if not good and ok:
            ok, note = False, why
    return worst, ok, note


def _same_object(x: Any, y: Any) -> bool:
    if isinstance(x, float) and math.isnan(x):
        return isinstance(y, float) and math.isnan(y)
    try:
        return bool(x == y)
    except Exception:  # an object whose == is not a truth value
        return x is y


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _snapshot(value: Any) -> Any:
    # Clones: a later in-place op in the graph must not change a recorded value. Containers
    # keep their exact type so that the two sides flatten to the same structure.
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if type(value) in (tuple, list):
        return type(value)(_snapshot(v) for v in value)
    if type(value) is dict:
        return {k: _snapshot(v) for k, v in value.items()}
    return value


class _Recorder(fx.Interpreter):
    """Runs a graph and hands every node's value to ``on_value``."""

    def __init__(self, gm: fx.GraphModule, on_value: Callable[[fx.Node, Any], None], label: str):
        super().__init__(gm)
        self._on_value = on_value
        self._label = label

    def run_node(self, n: fx.Node) -> Any:
        try:
            value = super().run_node(n)
        except Exception as exc:
            raise EquivalenceError(
                f"the {self._label} graph failed at node {n.name!r} ({n.op} {n.target}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        self._on_value(n, value)
        return value


def _as_args(inputs: Any) -> tuple[Any, ...]:
    if isinstance(inputs, tuple):
        return inputs
    if isinstance(inputs, list):
        return tuple(inputs)
    return (inputs,)


def _scalar(output: Any, loss_fn: Callable[[Any], torch.Tensor] | None) -> torch.Tensor | None:
    if loss_fn is not None:
        return loss_fn(output)
    terms = [t.sum() for t in _leaves(output)
             if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    if not terms:
        return None
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def _grads(gm: fx.GraphModule, scalar: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    params = [(n, p) for n, p in gm.named_parameters(remove_duplicate=True) if p.requires_grad]
    if scalar is None or not scalar.requires_grad or not params:
        return {n: None for n, _ in params}
    grads = torch.autograd.grad(scalar, [p for _, p in params], allow_unused=True)
    return {n: g for (n, _), g in zip(params, grads)}


def _devices(gms: Sequence[fx.GraphModule]) -> list[int]:
    return sorted({t.device.index or 0 for gm in gms for t in gm.parameters()
                   if t.device.type == "cuda"})


def check_equivalence(
    reference: fx.GraphModule,
    candidate: fx.GraphModule,
    inputs: Any,
    *,
    atol: float | None = None,
    rtol: float | None = None,
    backward: bool = True,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    raise_on_failure: bool = False,
) -> EquivalenceReport:
    """Compare ``candidate`` with ``reference`` node by node on ``inputs`` (a tensor or a
    tuple of positional arguments), then the gradients of their shared parameters after a
    backward pass of ``loss_fn(output)`` (default: the sum of every floating output).

    Exact on CPU float32/float64 unless ``atol``/``rtol`` are given; dtype tolerances
    elsewhere (see the module docstring for the matching rule and the guarantees that
    neither model nor the global RNG is changed). A copy of every shared node's reference
    value is held until the candidate reaches that node: use a small batch on large models.

    Raises:
        EquivalenceError: a graph fails to run (naming the node), or, with
            ``raise_on_failure``, the graphs differ (the message holds the table).
    """
    for label, gm in (("reference", reference), ("candidate", candidate)):
        if not isinstance(gm, fx.GraphModule):
            raise EquivalenceError(f"the {label} must be a torch.fx.GraphModule, "
                                   f"got {type(gm).__name__}")
    args = _as_args(inputs)
    ref_nodes = {n.name: n for n in reference.graph.nodes}
    cand_nodes = {n.name: n for n in candidate.graph.nodes}
    matched = {
        name for name, n in ref_nodes.items()
        if name in cand_nodes and (_node_key(cand_nodes[name]) == _node_key(n) or n.op == "output")
    }
    report = EquivalenceReport(
        unmatched_reference=[n for n in ref_nodes if n not in matched],
        unmatched_candidate=[n for n in cand_nodes if n not in matched],
    )
    recorded: dict[str, Any] = {}
    value_rows: dict[str, Row] = {}

    def record(node: fx.Node, value: Any) -> None:
        if node.name in matched:
            recorded[node.name] = _snapshot(value)

    def compare(node: fx.Node, value: Any) -> None:
        if node.name not in matched:
            return
        ref_value = recorded.pop(node.name)
        worst, ok, note = _compare(ref_value, value, atol, rtol)
        value_rows[node.name] = Row("value", node.name, node.op, _shape(ref_value), worst, ok, note)

    cuda = _devices((reference, candidate))

    def run(gm: fx.GraphModule, hook: Callable, label: str, states: tuple) -> Any:
        torch.set_rng_state(states[0])
        if cuda:
            torch.cuda.set_rng_state_all(states[1])
        with torch.set_grad_enabled(backward):
            return _Recorder(gm, hook, label).run(*args)

    with torch.random.fork_rng(devices=cuda):
        states = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None)
        ref_out = run(reference, record, "reference", states)
        cand_out = run(candidate, compare, "candidate", states)
    report.rows.extend(value_rows[name] for name in ref_nodes if name in value_rows)

    if backward:
        ref_grads = _grads(reference, _scalar(ref_out, loss_fn))
        cand_grads = _grads(candidate, _scalar(cand_out, loss_fn))
        report.rows.extend(_grad_rows(reference, candidate, ref_grads, cand_grads, atol, rtol))
    if raise_on_failure and not report.ok:
        raise EquivalenceError(f"graphs are not equivalent:\n{report.table(only_failures=True)}")
    return report


def _grad_rows(
    reference: fx.GraphModule,
    candidate: fx.GraphModule,
    ref_grads: dict[str, torch.Tensor | None],
    cand_grads: dict[str, torch.Tensor | None],
    atol: float | None,
    rtol: float | None,
) -> Iterator[Row]:
    cand_by_id = {id(p): n for n, p in candidate.named_parameters(remove_duplicate=True)}
    ref_params = dict(reference.named_parameters(remove_duplicate=True))
    for name, g_ref in ref_grads.items():
        param = ref_params[name]
        other = cand_by_id.get(id(param), name if name in cand_grads else None)
        if other is None or other not in cand_grads:
            continue
        g_cand = cand_grads[other]
        shape = tuple(param.shape)
        if g_ref is None and g_cand is None:
            yield Row("grad", name, "param", shape, 0.0, True, "no gradient in either")
            continue
        if g_ref is None or g_cand is None:
            which = "reference" if g_ref is None else "candidate"
            yield Row("grad", name, "param", shape, math.inf, False, f"no gradient in {which}")
            continue
        worst, ok, note = _compare(g_ref, g_cand, atol, rtol)
        yield Row("grad", name, "param", shape, worst, ok, note)


def assert_equivalent(
    reference: fx.GraphModule, candidate: fx.GraphModule, inputs: Any, **kwargs: Any
) -> EquivalenceReport:
    """:func:`check_equivalence` that raises :class:`fxgrow.EquivalenceError` with the table
    of differing nodes when the graphs differ; for use in tests and CI."""
    kwargs["raise_on_failure"] = True
    return check_equivalence(reference, candidate, inputs, **kwargs)
