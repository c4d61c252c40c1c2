"""Training-aware scaling: grow a model every few epochs while it trains (paper section 3.3;
docs/selection.md), keeping the same optimizer object.

Drop it into any training loop::

    import fxgrow
    from fxgrow.training.scaler import Scaler, ScalingSchedule

    gm = fxgrow.models.tiny_vit(num_classes=10)             # any traced GraphModule
    optimizer = torch.optim.AdamW(gm.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=30)
    schedule = ScalingSchedule(warmup_epochs=5, interval=5, end_epoch=20, epochs=30,
                               budget_per_round=64, layer_threshold=4)
    analysis = [next(iter(train_loader))]                   # fixed (inputs, labels) batches
    scaler = Scaler(gm, optimizer, schedule, analysis, torch.nn.functional.cross_entropy)
    for epoch in range(30):
        train_one_epoch(gm, optimizer, scheduler, train_loader)
        gm = scaler.after_epoch(epoch)                      # possibly grown; same optimizer
    print(scaler.records[-1]["loss_before"] == scaler.records[-1]["loss_after"])  # True

``epoch`` is the 0-based index of the epoch just finished; growth happens after epoch ``e``
when ``e + 1`` (the number of epochs completed) is ``warmup_epochs + k * interval`` and at
most ``end_epoch``. A round runs the splitting analysis (``fxgrow.passes.analyze``) on the
analysis batches, selects a plan (``fxgrow.select``), grows (``fxgrow.passes.grow``), checks
that the function is preserved - the loss on a fixed batch before and after growth must be
bitwise equal on the CPU, and ``fxgrow.verify.check_equivalence`` must pass - and adds the
new parameters to the optimizer (:func:`fxgrow.training.optim.add_grown_params`). Existing parameters
and their optimizer state are untouched, so the next step moves them exactly as it would
have without growth (unless global gradient-norm clipping sees the new gradients).

By default the grown model is returned packed (:func:`fxgrow.passes.pack`: everything grown
on a target one GEMM, the same parameter objects): analysis, growth and the bitwise loss
check run on the exact form (:func:`fxgrow.passes.exact_form` of the packed model), which
growth preserves bit for bit, and only the checked result is packed, its outputs checked against
the exact form within float tolerance (docs/packing.md). ``pack=False`` trains the exact form.

The scaler holds no random state of its own and does the same on every process. Under
torch.distributed (docs/distributed.md) each rank passes its own shard of the analysis data:
the scaler all-gathers the batches (:func:`fxgrow.training.distributed.gather_batches`), so every rank
analyses the global batch and selects the plan a single process would, and checks that all
ranks hold the same plan before growing. The analysis is sharded by default: each rank
analyses its share of the targets and the reports are gathered
(:func:`fxgrow.training.sharding.analyze_sharded`; the same report as one process). Rewrap
the grown model with :func:`fxgrow.training.distributed.wrap` (passing the old wrapper).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from . import distributed
from ..errors import EquivalenceError, ScheduleError
from ..select import RULES as _RULES
from .optim import add_grown_params

_METHODS = ("fast", "exact")
_FORMS = ("operator", "activation")
_MODES = ("paper", "fused")
_UNITS = ("neurons", "params")


@dataclass
class ScalingSchedule:
    """When and how much to grow. Epoch counts are numbers of completed epochs.

    Give exactly one of ``budget_per_round`` (new neurons or parameters per round, see
    ``budget_unit``) and ``total_param_target`` (the model's parameter count after the last
    round; each round spends the remaining difference divided by the remaining rounds).
    ``epochs`` (the run's length), when given, must leave at least one epoch of training
    after every growth. A parameter budget counts the parameters growth really adds: 2(d+1)
    per neuron of fan-in d in ``mode="paper"``, d+1 in ``mode="fused"``.
    ``rule`` is the selection rule of :func:`fxgrow.select` (``"splitting"``, the paper's;
    ``"random"`` and ``"uniform"`` spend the same budget without the criterion, seeded by
    the scaler's seed and the round); ``layer_threshold`` applies to the splitting rule.
    """

    warmup_epochs: int
    interval: int
    end_epoch: int
    budget_per_round: int | None = None
    total_param_target: int | None = None
    budget_unit: str = "neurons"
    layer_threshold: int = 60
    targets: list[str] | None = None
    analysis_batches: int = 4
    method: str = "fast"
    form: str = "operator"
    reservoir: int | None = None
    scale: float = 0.2
    mode: str = "paper"
    init_state: str = "fresh"
    epochs: int | None = None
    rule: str = "splitting"

    def __post_init__(self) -> None:
        for name in ("warmup_epochs", "interval", "end_epoch", "analysis_batches",
                     "layer_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ScheduleError(f"{name} must be an integer, got {value!r}")
        if self.interval <= 0:
            raise ScheduleError(f"interval must be at least 1 epoch, got {self.interval}")
        if self.warmup_epochs < 0:
            raise ScheduleError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.analysis_batches <= 0:
            raise ScheduleError(f"analysis_batches must be >= 1, got {self.analysis_batches}")
        if self.layer_threshold < 0:
            raise ScheduleError(f"layer_threshold must be >= 0, got {self.layer_threshold}")
        if (self.budget_per_round is None) == (self.total_param_target is None):
            raise ScheduleError("give exactly one of budget_per_round and total_param_target")
        for name in ("budget_per_round", "total_param_target"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ScheduleError(f"{name} must be an integer, got {value!r}")
        if self.budget_per_round is not None and not self.budget_per_round > 0:
            raise ScheduleError(f"budget_per_round must be positive, got {self.budget_per_round}")
        if self.total_param_target is not None:
            if not self.total_param_target > 0:
                raise ScheduleError(
                    f"total_param_target must be positive, got {self.total_param_target}"
                )
            self.budget_unit = "params"
        for name, allowed in (("budget_unit", _UNITS), ("method", _METHODS),
                              ("form", _FORMS), ("mode", _MODES),
                              ("init_state", ("fresh", "parent")), ("rule", _RULES)):
            if getattr(self, name) not in allowed:
                raise ScheduleError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) \
                or not math.isfinite(self.scale) or not self.scale > 0:
            raise ScheduleError(f"growth scale must be a positive finite number, got {self.scale!r}")
        for name in ("reservoir", "epochs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ScheduleError(f"{name} must be an integer, got {value!r}")
        if self.reservoir is not None and self.reservoir <= 0:
            raise ScheduleError(f"reservoir must be positive, got {self.reservoir}")
        if self.targets is not None and (
                isinstance(self.targets, str) or not isinstance(self.targets, (list, tuple))
                or not self.targets or not all(isinstance(t, str) and t for t in self.targets)):
            raise ScheduleError(f"targets must be a non-empty list of linear target names, "
                                f"got {self.targets!r}")
        if self.epochs is not None:
            if self.epochs <= 0:
                raise ScheduleError(f"epochs must be positive, got {self.epochs}")
            if self.end_epoch > self.epochs:
                raise ScheduleError(
                    f"end_epoch {self.end_epoch} is after the last epoch ({self.epochs}): "
                    f"growth must happen during training"
                )
        if not self.growth_epochs():
            raise ScheduleError(
                f"the schedule never grows: first growth after epoch {self.warmup_epochs}, "
                f"last allowed {self._last_allowed()}"
            )

    def _last_allowed(self) -> int:
        # Growth after the final epoch would leave the new neurons untrained.
        return self.end_epoch if self.epochs is None else min(self.end_epoch, self.epochs - 1)

    def growth_epochs(self) -> list[int]:
        """Numbers of completed epochs after which a round runs (the paper: 50, 80, ...)."""
        first = max(self.warmup_epochs, 1)
        return list(range(first, self._last_allowed() + 1, self.interval))

    def is_growth_epoch(self, epoch: int) -> bool:
        """Whether a round runs after the epoch with 0-based index ``epoch``."""
        return (epoch + 1) in self.growth_epochs()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScalingSchedule:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ScheduleError(f"unknown schedule fields {unknown}")
        return cls(**data)


def _model_loss(model: fx.GraphModule, batch: Sequence[Any], loss_fn: Callable) -> torch.Tensor:
    inputs, labels = batch[0], batch[1]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return loss_fn(model(inputs), labels).detach()
    finally:
        model.train(was_training)


def _eigen_stats(report: Any, target: str) -> dict[str, float | int]:
    values = report.eigenvalues[target].double()
    negative = values[values < 0]
    return {
        "neurons": int(values.numel()),
        "negative": int(negative.numel()),
        "min": float(values.min()) if values.numel() else math.nan,
        "median": float(values.median()) if values.numel() else math.nan,
        "mean_negative": float(negative.mean()) if negative.numel() else 0.0,
    }


def _packed(exact: fx.GraphModule, inputs: torch.Tensor) -> fx.GraphModule:
    """``exact`` packed, its outputs checked against the exact form's (float tolerance: the
    packed GEMM may sum in another order)."""
    from ..passes import pack

    packed = pack(exact)
    was_training = exact.training
    exact.eval()
    try:
        with torch.no_grad():
            want, got = exact(inputs), packed(inputs)
    finally:
        exact.train(was_training)
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max())):
        raise EquivalenceError(
            f"the packed model differs from the exact form: max |difference| "
            f"{float((got - want).abs().max())!r}"
        )
    return packed


class Scaler:
    """Grows ``model`` on ``schedule`` inside any training loop; see the module docstring.

    Args:
        model: the traced GraphModule being trained (not wrapped in DDP).
        optimizer: its optimizer; new parameters are added to it in place.
        schedule: a :class:`ScalingSchedule`.
        analysis_data: re-iterable ``(inputs, labels)`` batches; each round analyses the
            first ``schedule.analysis_batches`` of them.
        loss_fn: ``loss_fn(outputs, labels) -> scalar``.
        check_batch: the fixed batch whose loss must be bitwise equal before and after
            growth (default: the first analysis batch).
        flop_inputs: an input for FLOP counts in the growth records (``None``: not counted).
        progress: show the analysis progress bar.
        seed: the analysis seed (reservoir sampling).
        gather_analysis: under torch.distributed, all-gather the analysis batches across
            ranks (each rank gives its shard; default). ``False`` when every rank already
            passes the same global batches.
        pack: return grown models packed for training (default) or in the exact form.
        shard_analysis: under torch.distributed, each rank analyses its share of the targets
            and the reports are gathered (default; the same report); ``False``: every rank
            analyses every target.
    """

    def __init__(
        self,
        model: fx.GraphModule,
        optimizer: torch.optim.Optimizer,
        schedule: ScalingSchedule,
        analysis_data: Iterable[Sequence[Any]],
        loss_fn: Callable[[Any, Any], torch.Tensor],
        *,
        check_batch: Sequence[Any] | None = None,
        flop_inputs: torch.Tensor | None = None,
        progress: bool = False,
        seed: int = 0,
        gather_analysis: bool = True,
        pack: bool = True,
        shard_analysis: bool = True,
    ) -> None:
        if not isinstance(schedule, ScalingSchedule):
            raise ScheduleError(f"schedule must be a ScalingSchedule, got {type(schedule).__name__}")
        self.model = model
        self.optimizer = optimizer
        self.schedule = schedule
        self.analysis_data = analysis_data
        self.loss_fn = loss_fn
        self.check_batch = check_batch
        self.flop_inputs = flop_inputs
        self.progress = progress
        self.seed = seed
        self.gather_analysis = gather_analysis
        self.pack = pack
        self.shard_analysis = shard_analysis
        self.records: list[dict[str, Any]] = []
        self.last_report: Any = None
        self._done: list[int] = []

    @property
    def rounds_done(self) -> list[int]:
        """Epoch indices after which a round has run (including rounds that grew nothing)."""
        return list(self._done)

    def after_epoch(self, epoch: int) -> fx.GraphModule:
        """Call after each epoch (0-based index); returns the model to train from now on.
        Idempotent: a round already run for ``epoch`` is not run again (resume relies on it)."""
        if self.schedule.is_growth_epoch(epoch) and epoch not in self._done:
            self.grow_round(epoch)
        return self.model

    def _budget(self, round_index: int, params_now: int) -> tuple[int, str]:
        schedule = self.schedule
        if schedule.total_param_target is None:
            return schedule.budget_per_round, schedule.budget_unit
        remaining_rounds = len(schedule.growth_epochs()) - round_index
        return max(0, (schedule.total_param_target - params_now) // remaining_rounds), "params"

    def _analysis_batches(self) -> list[Sequence[Any]]:
        batches = list(itertools.islice(iter(self.analysis_data), self.schedule.analysis_batches))
        if not batches:
            raise ScheduleError("the scaler's analysis data yielded no batch")
        if self.gather_analysis:
            batches = distributed.gather_batches(batches)
        return batches

    def grow_round(self, epoch: int) -> dict[str, Any]:
        """Run one round now (analysis, selection, growth, checks, optimizer surgery) and
        return its record."""
        from .. import select
        from ..passes import exact_form, grow
        from ..verify import check_equivalence, count_flops, count_params

        schedule = self.schedule
        old = exact_form(self.model)
        batches = self._analysis_batches()
        check = self.check_batch if self.check_batch is not None else batches[0]
        params_before = count_params(old)
        budget, unit = self._budget(len(self._done), params_before)
        record: dict[str, Any] = {
            "epoch": epoch, "round": len(self._done), "budget": budget, "budget_unit": unit,
            "params_before": params_before,
        }
        started = time.perf_counter()
        kwargs: dict[str, Any] = dict(
            targets=schedule.targets, form=schedule.form, method=schedule.method,
            progress=self.progress, seed=self.seed,
        )
        if schedule.reservoir is not None:
            kwargs["reservoir_tokens"] = schedule.reservoir
        report = self._analyze(old, batches, kwargs, record)
        record["analysis_seconds"] = time.perf_counter() - started
        self.last_report = report
        record["eigenvalues"] = {t: _eigen_stats(report, t) for t in report.eigenvalues}
        # select prices a neuron as the paper's pair, 2(d+1) parameters; a fused neuron
        # adds d+1, so a parameter budget buys twice the neurons in fused mode.
        fused_params = unit == "params" and schedule.mode == "fused"
        plan = select(report, budget=budget * 2 if fused_params else budget,
                      layer_threshold=schedule.layer_threshold, budget_unit=unit,
                      rule=schedule.rule, seed=self.seed * 1_000_003 + len(self._done))
        distributed.check_same(plan.to_json(), f"growth plan after epoch {epoch}")
        record["plan"] = plan.to_dict()
        record["plan_size"] = {t: len(idx) for t, idx in plan.items()}
        if plan.num_neurons == 0:
            from ..select import why_nothing_selected

            record.update(grown=False, params_after=params_before,
                          why_not_grown=why_nothing_selected(
                              report, layer_threshold=schedule.layer_threshold))
            self._finish(epoch, record)
            return record
        loss_before = _model_loss(old, check, self.loss_fn)
        started = time.perf_counter()
        new = grow(old, plan, scale=schedule.scale, mode=schedule.mode)
        record["grow_seconds"] = time.perf_counter() - started
        loss_after = _model_loss(new, check, self.loss_fn)
        record.update(
            grown=True,
            loss_before=float(loss_before), loss_after=float(loss_after),
            loss_before_hex=float(loss_before).hex(), loss_after_hex=float(loss_after).hex(),
            loss_equal=bool(torch.equal(loss_before, loss_after)),
        )
        equivalence = check_equivalence(old, new, check[0][:8])
        record["equivalent"] = bool(equivalence.ok)
        if not (record["loss_equal"] and equivalence.ok):
            raise EquivalenceError(
                f"growth after epoch {epoch} changed the function: loss {loss_before.item()!r} "
                f"-> {loss_after.item()!r}\n{equivalence}"
            )
        record["new_params"] = add_grown_params(
            self.optimizer, new, init_state=schedule.init_state
        )
        record["params_after"] = count_params(new)
        if self.flop_inputs is not None:
            record["flops_before"] = int(count_flops(old, self.flop_inputs).total)
            record["flops_after"] = int(count_flops(new, self.flop_inputs).total)
        record["packed"] = self.pack
        if self.pack:
            new = _packed(new, check[0][:8])
        self.model = new
        self._finish(epoch, record)
        return record

    def _analyze(self, model: fx.GraphModule, batches: list[Sequence[Any]],
                 options: dict[str, Any], record: dict[str, Any]) -> Any:
        """The round's splitting report; sharded across ranks under torch.distributed
        (unless ``shard_analysis`` is off), with each rank's share and seconds recorded."""
        from ..passes import analyze

        if not (self.shard_analysis and distributed.is_distributed()):
            return analyze(model, batches, self.loss_fn, **options)
        from .sharding import analyze_sharded

        sharded = analyze_sharded(model, batches, self.loss_fn, **options)
        record["analysis_shards"] = sharded.shares
        record["analysis_record_seconds"] = sharded.record_seconds
        record["analysis_solve_seconds"] = sharded.solve_seconds
        return sharded.report

    def _finish(self, epoch: int, record: dict[str, Any]) -> None:
        self._done.append(epoch)
        self.records.append(record)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: the schedule, the rounds run and their records."""
        return {"schedule": self.schedule.to_dict(), "done": list(self._done),
                "records": [dict(r) for r in self.records]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["schedule"] != self.schedule.to_dict():
            raise ScheduleError(
                "the saved scaler ran another schedule: "
                f"{state['schedule']} != {self.schedule.to_dict()}"
            )
        self._done = list(state["done"])
        self.records = [dict(r) for r in state["records"]]


__all__ = ["Scaler", "ScalingSchedule"]
