"""An experiment matrix: conditions x seeds on one data set, each run in its own run directory
(:func:`fxgrow.training.trainer.fit`), resumable, with a report (docs/study.md).

The conditions separate what growth by the splitting criterion adds from what extra capacity
adds. All share the data, the training configuration and, where they grow, the schedule and
the parameter budget; a seed fixes the initial weights (the reduced models keep the first
rows of the full model's initial weights) and the batch order, so runs of one seed are paired:

==========  ===================================================================================
full        the full-width model from scratch (the paper's homogeneous baseline)
base        the reduced base, never grown
splitting   the reduced base grown by the splitting criterion (the paper's rule)
random      the reduced base grown with neurons drawn at random, same schedule and budget
uniform     the reduced base grown with the same number of neurons in every layer
dense       a dense model with the grown model's final parameter count (the schedule's
            ``total_param_target``) trained from scratch: the reduced base with the MLP hidden
            width (and, if that cannot reach the count, the full head dim) chosen to match
==========  ===================================================================================

Variants (``StudySpec.variants``) add named grown conditions for the paper's optional axes:
a rule, the base's reduction and schedule overrides (docs/study.md, "Variants").

Layout of a study directory::

    STUDY/study.json                 the spec (a rerun with the same spec resumes the study)
    STUDY/runs/{condition}-seed{s}/  one run directory per run (fxgrow.training.rundir)
    STUDY/report.md, report.json     the tables (rewritten after every run)
    STUDY/plots/*.png                learning curves, eigenvalues per round, depth per layer

A rerun skips finished runs and resumes unfinished ones from their latest checkpoint, so a
killed study loses at most the epoch in progress. Runs go seed by seed, every condition of a
seed before the next seed, so a study stopped early holds complete pairs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx

from ..errors import InternalError, StudyError

CONDITIONS = ("full", "base", "splitting", "random", "uniform", "dense")
_RULE = {"splitting": "splitting", "random": "random", "uniform": "uniform"}
REFERENCE = "splitting"
SPEC_FILE = "study.json"
TEACHER_SEED_OFFSET = 1_000_000
VARIANT_KEYS = ("rule", "head_dim", "mlp_hidden", "schedule")
# Run directories are named {variant}-seed{s}: a letter or digit first rules out "." and "..".
_VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Fields a variant's schedule must not override: the study sets them for every condition.
_STUDY_FIELDS = ("epochs", "rule")


@dataclass
class StudySpec:
    """What a study runs. ``data``: ``"digits"``, ``"teacher"`` (the teacher-student task of
    :func:`fxgrow.training.data.teacher_student`, its teacher the full-width ``model`` with
    the initial weights of seed ``1_000_000 + data_seed``) or an ImageFolder root. ``head_dim`` and
    ``mlp_hidden`` are the reduction ratios of the base. ``train`` holds
    :class:`~fxgrow.training.trainer.TrainConfig` fields (``seed`` comes from ``seeds``),
    ``schedule`` :class:`~fxgrow.training.scaler.ScalingSchedule` fields (``epochs`` and
    ``rule`` come from the training length and the condition). ``variants`` maps a name
    (listed in ``conditions`` to run it) to a grown condition derived from ``splitting``:
    ``{"rule": ..., "head_dim": ..., "mlp_hidden": ..., "schedule": {field: value}}``, every
    key optional (defaults: the splitting rule, the base's ratios, the spec's schedule)."""

    data: str = "digits"
    img_size: int = 16
    model: str = "tiny_vit"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    head_dim: float = 0.5
    mlp_hidden: float = 0.5
    conditions: list[str] = field(default_factory=lambda: list(CONDITIONS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    train: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)
    teacher_train_size: int = 2048
    teacher_val_size: int = 1024
    data_seed: int = 0
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.conditions, self.seeds = list(self.conditions), list(self.seeds)
        if not isinstance(self.variants, dict):
            raise StudyError(f"variants must be an object of name -> variant, got "
                             f"{type(self.variants).__name__}")
        for name, variant in self.variants.items():
            _check_variant(name, variant)
        unknown = [c for c in self.conditions if c not in CONDITIONS and c not in self.variants]
        if unknown:
            raise StudyError(f"conditions {unknown} are neither among {CONDITIONS} nor defined "
                             f"in variants {sorted(self.variants)}")
        if not self.conditions or len(set(self.conditions)) != len(self.conditions):
            raise StudyError(f"conditions must be distinct and not empty, got {self.conditions}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(
                isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise StudyError(f"seeds must be distinct non-negative integers, got {self.seeds}")
        for name in ("seed",):
            if name in self.train:
                raise StudyError(f"train must not set {name!r}: it comes from seeds")
        for name in _STUDY_FIELDS:
            if name in self.schedule:
                raise StudyError(f"schedule must not set {name!r}: it comes from the study")
        if self.img_size <= 0 or self.teacher_train_size <= 0 or self.teacher_val_size <= 0:
            raise StudyError("img_size and the teacher sample sizes must be positive")
        self.train_config(0)
        for condition in [*self.conditions, *self.variants]:
            if self.grows(condition):
                self.scaling_schedule(condition)
        if "dense" in self.conditions:
            self.param_target()

    def grows(self, condition: str) -> bool:
        """Whether ``condition`` (one of the six or a variant) is grown by a schedule."""
        return condition in _RULE or condition in self.variants

    def reduction(self, condition: str) -> tuple[float, float]:
        """The (head dim, MLP hidden) ratios of a reduced condition's base."""
        variant = self.variants.get(condition, {})
        return (float(variant.get("head_dim", self.head_dim)),
                float(variant.get("mlp_hidden", self.mlp_hidden)))

    def train_config(self, seed: int):
        from .trainer import TrainConfig

        try:
            return TrainConfig(**self.train, seed=seed)
        except TypeError as exc:
            raise StudyError(f"train: {exc}") from exc

    def scaling_schedule(self, condition: str):
        """The schedule of a grown condition: the spec's, with a variant's overrides."""
        from ..errors import ScheduleError
        from .scaler import ScalingSchedule

        if not self.schedule:
            raise StudyError(f"condition {condition!r} grows: the spec needs a schedule")
        variant = self.variants.get(condition)
        fields = {**self.schedule, **(variant or {}).get("schedule", {})}
        rule = _RULE[condition] if variant is None else variant.get("rule", REFERENCE)
        where = "schedule" if variant is None else f"variant {condition!r}: schedule"
        try:
            return ScalingSchedule(**fields, epochs=self.train_config(0).epochs, rule=rule)
        except (TypeError, ScheduleError) as exc:
            raise StudyError(f"{where}: {exc}") from exc

    def param_target(self) -> int:
        """The grown models' final parameter count the ``dense`` condition matches."""
        target = self.schedule.get("total_param_target")
        if target is None:
            raise StudyError("the dense condition matches the grown model's final parameter "
                             "count: give the schedule a total_param_target")
        return int(target)

    def model_spec(self, num_classes: int) -> dict[str, Any]:
        from .. import models

        kwargs = {**self.model_kwargs}
        kwargs.setdefault("num_classes", num_classes)
        source = "fxgrow" if self.model in models.BUILDERS else "timm"
        if source == "fxgrow":
            kwargs.setdefault("img_size", self.img_size)
        return {"source": source, "name": self.model, "kwargs": kwargs}

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudySpec:
        """A spec from :meth:`to_dict`'s form; fields added since (``variants``) default."""
        try:
            return cls(**data)
        except TypeError as exc:  # a field this version does not know
            raise StudyError(f"not a study spec of this fxgrow: {exc}") from exc


def _check_variant(name: Any, variant: Any) -> None:
    """Refuse a malformed variant; the schedule overrides are checked by the spec."""
    if not isinstance(name, str) or not _VARIANT_NAME.fullmatch(name):
        raise StudyError(f"variant name {name!r} must be 1-64 letters, digits, '_', '.' or "
                         f"'-', starting with a letter or digit (it names run directories)")
    if name in CONDITIONS:
        raise StudyError(f"variant name {name!r} is one of the six conditions {CONDITIONS}")
    if not isinstance(variant, dict):
        raise StudyError(f"variant {name!r} must be an object with keys among {VARIANT_KEYS}, "
                         f"got {variant!r}")
    unknown = sorted(set(variant) - set(VARIANT_KEYS))
    if unknown:
        raise StudyError(f"variant {name!r}: unknown keys {unknown}; expected some of "
                         f"{list(VARIANT_KEYS)}")
    if variant.get("rule", REFERENCE) not in _RULE:
        raise StudyError(f"variant {name!r}: rule must be one of {tuple(_RULE)}, got "
                         f"{variant['rule']!r}")
    for key in ("head_dim", "mlp_hidden"):
        ratio = variant.get(key, 1.0)
        # A ratio only: JSON's 1 and 1.0 must both mean "keep the width", never width 1.
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) \
                or not math.isfinite(ratio) or not 0.0 < ratio <= 1.0:
            raise StudyError(f"variant {name!r}: {key} must be a ratio in (0, 1], got {ratio!r}")
    overrides = variant.get("schedule", {})
    if not isinstance(overrides, dict):
        raise StudyError(f"variant {name!r}: schedule must be an object of ScalingSchedule "
                         f"fields, got {overrides!r}")
    for key in _STUDY_FIELDS:
        if key in overrides:
            raise StudyError(f"variant {name!r}: schedule must not set {key!r}: it comes from "
                             f"the study" + (" (give the variant a rule)" if key == "rule" else ""))


def describe_variant(name: str, variant: dict[str, Any], spec: dict[str, Any]) -> str:
    """One line saying what a variant changes against ``splitting`` (``spec``: to_dict form)."""
    changes = [f"rule {variant['rule']}"] if variant.get("rule", REFERENCE) != REFERENCE else []
    for key, label in (("head_dim", "head dim"), ("mlp_hidden", "MLP hidden")):
        if key in variant and float(variant[key]) != float(spec[key]):
            changes.append(f"{label} x{float(variant[key]):g} (base x{float(spec[key]):g})")
    from .scaler import ScalingSchedule

    defaults = {f.name: f.default for f in dataclasses.fields(ScalingSchedule)}
    for key, value in sorted(variant.get("schedule", {}).items()):
        changes.append(f"{key} {value!r} (base {spec['schedule'].get(key, defaults[key])!r})")
    return f"`{name}`: splitting with " + (", ".join(changes) if changes else "no change")


def quick_spec(data: str = "digits") -> StudySpec:
    """The test suite's study: two conditions, one seed, 3 epochs with growth rounds after
    the first two, a 2-block ViT at 8x8."""
    return StudySpec(
        data=data, img_size=8, model="tiny_vit",
        model_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 4},
        conditions=["splitting", "random"], seeds=[0],
        train={"epochs": 3, "batch_size": 128, "lr": 2e-3, "warmup_epochs": 0.5},
        schedule={"warmup_epochs": 1, "interval": 1, "end_epoch": 2,
                  "total_param_target": 24000, "layer_threshold": 2, "analysis_batches": 1},
        teacher_train_size=512, teacher_val_size=256,
    )


FULL_VARIANTS: dict[str, dict[str, Any]] = {
    # paper table 3's reduction grid besides the base's /2, /2
    "attn4-mlp1": {"head_dim": 0.25, "mlp_hidden": 1.0},
    "attn1-mlp4": {"head_dim": 1.0, "mlp_hidden": 0.25},
    # paper table 4's scaling interval besides 4, same warm-up and last round
    "interval2": {"schedule": {"interval": 2}},
    "interval6": {"schedule": {"interval": 6}},
    # one fused linear per grown neuron against the paper's pair
    "fused": {"schedule": {"mode": "fused"}},
}


def full_spec(data: str = "digits") -> StudySpec:
    """The benchmark's study (benchmarks/bench_study.py): the six conditions and the
    :data:`FULL_VARIANTS`, four seeds, the ``make demo`` ViT at 16x16 grown towards the
    demo's 175,000 parameters, 16 epochs with growth rounds after epochs 4, 8 and 12 (the
    interval variants: after 4, 6, 8, 10, 12 and after 4, 10), the teacher-student task
    with 1024 fresh samples per epoch. Sized to the 40-minute budget of docs/study.md."""
    return StudySpec(
        data=data, img_size=16, model="tiny_vit",
        model_kwargs={"embed_dim": 64, "depth": 4, "num_heads": 4},
        conditions=[*CONDITIONS, *FULL_VARIANTS], seeds=[0, 1, 2, 3],
        train={"epochs": 16, "batch_size": 64, "lr": 2e-3},
        schedule={"warmup_epochs": 4, "interval": 4, "end_epoch": 12,
                  "total_param_target": 175000, "layer_threshold": 4},
        teacher_train_size=1024, teacher_val_size=1024,
        variants=json.loads(json.dumps(FULL_VARIANTS)),  # a copy the caller may edit
    )


# ------------------------------------------------------------------------------ building


def _reduced(spec: dict[str, Any], head_dim: float, mlp_hidden: float | int) -> fx.GraphModule:
    """A fresh init of ``spec`` narrowed; keep="first": the kept rows of a random init are a
    random init of the narrower model."""
    from .. import models
    from ..passes import ReduceSpec, reduce

    gm = models.build(spec)
    if all(isinstance(r, float) and r == 1.0 for r in (head_dim, mlp_hidden)):
        return gm
    return reduce(gm, ReduceSpec(head_dim=head_dim, mlp_hidden=mlp_hidden, keep="first"))


def dense_widths(spec: StudySpec, num_classes: int) -> dict[str, Any]:
    """The dense condition's reduction: ``{"head_dim": ratio, "mlp_hidden": width, "params":
    count}`` whose count is closest to :meth:`StudySpec.param_target`. The MLP hidden width is
    the free variable (parameters are linear in it); the base's head-dim ratio is kept unless
    even the full MLP width cannot reach the count, then the full head dim is used."""
    from ..verify import count_params

    target = spec.param_target()
    model = spec.model_spec(num_classes)
    with torch.random.fork_rng():  # only counts are wanted: leave the caller's RNG alone
        for head in dict.fromkeys((spec.head_dim, 1.0)):
            one, two = (count_params(_reduced(model, head, w)) for w in (1, 2))
            widest = count_params(_reduced(model, head, 1.0))
            slope = two - one
            top = 1 + (widest - one) // slope
            if target <= widest or head == 1.0:
                width = min(top, max(1, 1 + round((target - one) / slope)))
                params = count_params(_reduced(model, head, width))
                return {"head_dim": head, "mlp_hidden": int(width), "params": int(params),
                        "target": target}
    raise InternalError("dense_widths: the full head dim always gives a width")


def condition_model(spec: StudySpec, condition: str, seed: int, num_classes: int,
                    dense: dict[str, Any] | None = None) -> fx.GraphModule:
    """The starting model of ``condition`` at ``seed`` (seeds torch's global RNG, as a run's
    start does)."""
    from .trainer import seed_everything

    model = spec.model_spec(num_classes)
    seed_everything(seed)
    if condition == "full":
        return _reduced(model, 1.0, 1.0)
    if condition == "dense":
        dense = dense or dense_widths(spec, num_classes)  # leaves the RNG as seeded
        return _reduced(model, dense["head_dim"], dense["mlp_hidden"])
    return _reduced(model, *spec.reduction(condition))


def study_data(spec: StudySpec):
    """The study's :class:`~fxgrow.training.data.DataBundle` (the same for every run)."""
    from . import data

    if spec.data == "digits":
        return data.digits(img_size=spec.img_size, seed=spec.data_seed)
    if spec.data == "teacher":
        with torch.random.fork_rng():
            # Offset from the run seeds: the full condition's initial weights are not the teacher.
            torch.manual_seed(TEACHER_SEED_OFFSET + spec.data_seed)
            from .. import models

            teacher = models.build(spec.model_spec(spec.model_kwargs.get("num_classes", 10)))
        return data.teacher_student(
            teacher, num_classes=spec.model_kwargs.get("num_classes", 10),
            img_size=spec.img_size, train_size=spec.teacher_train_size,
            val_size=spec.teacher_val_size, seed=spec.data_seed, name=f"{spec.model}-full")
    return data.image_folder(spec.data, img_size=spec.img_size)


# ------------------------------------------------------------------------------ running


def run_name(condition: str, seed: int) -> str:
    return f"{condition}-seed{seed}"


def _finished(run_dir: Path, epochs: int) -> bool:
    from .rundir import RunDir

    if not (run_dir / "config.json").is_file() or \
            not (run_dir / "plots" / "metrics.png").is_file():
        return False
    return len(RunDir(run_dir, resume=True).read_jsonl("metrics.jsonl")) == epochs


def run_one(spec: StudySpec, condition: str, seed: int, run_dir: str | os.PathLike, *,
            bundle: Any = None, quiet: bool = True) -> str:
    """Train one run of the matrix into ``run_dir``: start it, resume it from its latest
    checkpoint, or skip it if it finished. Returns ``"done"``, ``"resumed"``, ``"started"``."""
    from .trainer import fit

    run_dir = Path(run_dir)
    config = spec.train_config(seed)
    if _finished(run_dir, config.epochs):
        return "done"
    bundle = bundle if bundle is not None else study_data(spec)
    dense = dense_widths(spec, bundle.num_classes) if condition == "dense" else None
    model = condition_model(spec, condition, seed, bundle.num_classes, dense)
    schedule = spec.scaling_schedule(condition) if spec.grows(condition) else None
    resume = (run_dir / "config.json").is_file()
    if run_dir.is_dir() and not resume and not any(p for p in run_dir.rglob("*") if p.is_file()):
        shutil.rmtree(run_dir)  # killed between creating the directory and its config
    extra = {"study": {"condition": condition, "dense": dense,
                       "variant": spec.variants.get(condition)}}
    fit(model, bundle, config, str(run_dir), schedule=schedule, run_config=extra,
        resume=resume, quiet=quiet)
    return "resumed" if resume else "started"


def run_study(spec: StudySpec, study_dir: str | os.PathLike, *, quiet: bool = True,
              log: Callable[[str], None] | None = None, plots: bool = True) -> dict[str, Any]:
    """Run (or resume) every condition x seed of ``spec`` in ``study_dir``, seed by seed, and
    write the report; returns :func:`write_report`'s result.

    Raises:
        StudyError: ``study_dir`` holds another study (nothing is written).
    """
    root = Path(study_dir)
    saved = root / SPEC_FILE
    if saved.is_file():
        # Through from_dict: a study.json written before a field existed gets its default.
        old = StudySpec.from_dict(json.loads(saved.read_text())).to_dict()
        if old != spec.to_dict():
            diff = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in spec.to_dict().items()
                    if old.get(k) != v]
            raise StudyError(f"{root} holds another study:\n  " + "\n  ".join(diff))
    elif root.exists() and any(root.iterdir()):
        raise StudyError(f"{root} exists and is not a study directory (no {SPEC_FILE}); "
                         f"choose a new directory (nothing was written)")
    else:
        root.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(spec.to_dict(), indent=1, sort_keys=True))
    bundle = None
    for seed in spec.seeds:
        for condition in spec.conditions:
            run_dir = root / "runs" / run_name(condition, seed)
            if bundle is None and not _finished(run_dir, spec.train_config(seed).epochs):
                bundle = study_data(spec)
            status = run_one(spec, condition, seed, run_dir, bundle=bundle, quiet=quiet)
            write_report(root, plots=False)
            if log is not None:
                log(f"{run_name(condition, seed)}: {status}")
    return write_report(root, plots=plots)


# ------------------------------------------------------------------------------ reading


def _recipe_history(run_dir: Path) -> list[dict[str, Any]]:
    from ..io import read_recipe
    from .checkpoint import latest

    path = latest(run_dir)
    return [] if path is None else list(read_recipe(path / "model").get("history", []))


def neuron_depths(history: list[dict[str, Any]], widths: dict[str, int]) -> dict[str, list[int]]:
    """Per layer of the base (``widths``: target -> neuron count), every neuron's depth: 0 if
    never grown, else 1 + the largest depth among the neurons of the pseudo-layers grown from
    it (a pseudo-layer's own neurons may have been grown in a later round: nested growth)."""
    from ..passes import grow_lineage

    children: dict[tuple[str, int], list[tuple[str, int]]] = {}
    created: dict[str, int] = {}
    for record in history:
        if record.get("pass") != "grow":
            continue
        for param, (parent, indices, _role, kind) in grow_lineage(record).items():
            if kind != "weight":
                continue
            module = param[: -len(".weight")]
            created[module] = len(indices)
            for row, neuron in enumerate(indices):
                children.setdefault((parent, neuron), []).append((module, row))

    memo: dict[tuple[str, int], int] = {}

    def depth(node: tuple[str, int]) -> int:
        if node not in memo:
            memo[node] = max((1 + depth(c) for c in children.get(node, ())), default=0)
        return memo[node]

    return {t: [depth((t, j)) for j in range(n)] for t, n in widths.items()}


def run_depths(run_dir: str | os.PathLike) -> dict[str, list[int]] | None:
    """:func:`neuron_depths` of a run's latest model, for the layers its first growth round
    analysed (the base's); ``None`` before the first round."""
    from ..passes.analysis import SplittingReport

    first = Path(run_dir) / "reports" / "round0.safetensors"
    if not first.is_file():
        return None
    report = SplittingReport.load(first)
    widths = {t: report.eigenvalues[t].numel() for t in report.targets}
    return neuron_depths(_recipe_history(Path(run_dir)), widths)


def load_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """One run's figures: final metrics, totals, growth checks, per-epoch curves."""
    from .rundir import RunDir

    run_dir = Path(run_dir)
    run = RunDir(run_dir, resume=True)
    config = run.config()
    metrics = run.read_jsonl("metrics.jsonl")
    growth = run.read_jsonl("growth.jsonl")
    epochs = config["train"]["epochs"]
    grown = [r for r in growth if r.get("grown")]
    last = metrics[-1] if metrics else {}
    return {
        "condition": config["extra"]["study"]["condition"],
        "seed": config["train"]["seed"],
        "dense": config["extra"]["study"].get("dense"),
        "epochs_done": len(metrics), "epochs": epochs,
        "finished": len(metrics) == epochs and (run_dir / "plots" / "metrics.png").is_file(),
        "top1": last.get("top1"), "top5": last.get("top5"), "val_loss": last.get("val_loss"),
        "train_loss": last.get("train_loss"), "params": last.get("params"),
        "flops": last.get("flops"),
        "base_params": metrics[0]["params"] if metrics else None,
        "wall_seconds": sum(m["time"] for m in metrics) + sum(
            r.get("analysis_seconds", 0.0) + r.get("grow_seconds", 0.0) for r in growth),
        "rounds": len(growth), "rounds_grown": len(grown),
        "loss_checks": [{"round": r["round"], "loss_equal": r["loss_equal"],
                         "before": r["loss_before_hex"], "after": r["loss_after_hex"],
                         "equivalent": r["equivalent"]} for r in grown],
        "curve": {k: [m[k] for m in metrics] for k in ("top1", "val_loss", "train_loss",
                                                      "params")},
        "eigenvalues": [{"round": r["round"], "epoch": r["epoch"], "stats": r["eigenvalues"]}
                        for r in growth],
    }


def _stats(values: list[float]) -> dict[str, Any]:
    values = [float(v) for v in values]
    return {"n": len(values),
            "mean": statistics.fmean(values) if values else math.nan,
            "std": statistics.stdev(values) if len(values) > 1 else math.nan,
            "min": min(values) if values else math.nan,
            "max": max(values) if values else math.nan}


_COLUMNS = ("top1", "val_loss", "params", "flops", "wall_seconds")


def summarise(runs: list[dict[str, Any]], conditions: list[str]) -> dict[str, Any]:
    """Per condition, mean/std/min/max over finished seeds of :data:`_COLUMNS`; per condition
    but the reference, the paired differences to the reference on the seeds both finished."""
    done = [r for r in runs if r["finished"]]
    table = {}
    for c in conditions:
        rows = sorted((r for r in done if r["condition"] == c), key=lambda r: r["seed"])
        table[c] = {"seeds": [r["seed"] for r in rows],
                    **{k: _stats([r[k] for r in rows]) for k in _COLUMNS}}
    reference = {r["seed"]: r for r in done if r["condition"] == REFERENCE}
    paired = {}
    for c in conditions:
        if c == REFERENCE:
            continue
        pairs = sorted(((r["seed"], r) for r in done if r["condition"] == c
                        and r["seed"] in reference), key=lambda p: p[0])
        diffs = {k: [r[k] - reference[s][k] for s, r in pairs] for k in ("top1", "val_loss")}
        paired[c] = {"seeds": [s for s, _ in pairs],
                     "top1_diff": diffs["top1"], "val_loss_diff": diffs["val_loss"],
                     "top1": _stats(diffs["top1"]), "val_loss": _stats(diffs["val_loss"]),
                     "wins": sum(d > 0 for d in diffs["top1"]),
                     "losses": sum(d < 0 for d in diffs["top1"])}
    return {"table": table, "paired": paired}


def _fmt(stats: dict[str, Any], scale: float = 1.0, digits: int = 2) -> str:
    if not stats["n"]:
        return "-"
    mean = f"{stats['mean'] / scale:,.{digits}f}"
    return mean if stats["n"] < 2 else f"{mean} ± {stats['std'] / scale:,.{digits}f}"


def markdown(summary: dict[str, Any], runs: list[dict[str, Any]], spec: dict[str, Any]) -> str:
    """The report's tables as markdown."""
    lines = [f"# Study: {spec['model']} on {spec['data']}", "",
             "Mean ± standard deviation over the finished seeds (n); wall time in seconds "
             "includes the growth analysis.", "",
             "| condition | n | top-1 (%) | val loss | params | MFLOPs | wall (s) |",
             "|---|---|---|---|---|---|---|"]
    for c, row in summary["table"].items():
        lines.append(f"| {c} | {row['top1']['n']} | {_fmt(row['top1'])} | "
                     f"{_fmt(row['val_loss'], digits=3)} | {_fmt(row['params'], digits=0)} | "
                     f"{_fmt(row['flops'], 1e6)} | {_fmt(row['wall_seconds'], digits=0)} |")
    if summary["paired"]:
        lines += ["", f"Paired against `{REFERENCE}` (same seed): top-1 difference "
                  f"(condition minus {REFERENCE}) per seed, mean ± std, and how often the "
                  f"condition was better / worse.", "",
                  "| condition | seeds | top-1 diff per seed | mean ± std | min .. max | "
                  "better / worse | val loss diff mean |", "|---|---|---|---|---|---|---|"]
        for c, p in summary["paired"].items():
            if not p["seeds"]:
                continue
            per_seed = ", ".join(f"{d:+.2f}" for d in p["top1_diff"])
            lines.append(f"| {c} | {p['top1']['n']} | {per_seed} | {_fmt(p['top1'])} | "
                         f"{p['top1']['min']:+.2f} .. {p['top1']['max']:+.2f} | "
                         f"{p['wins']} / {p['losses']} | {p['val_loss']['mean']:+.3f} |")
    variants = spec.get("variants", {})
    listed = [c for c in spec["conditions"] if c in variants]
    if listed:
        lines += ["", "Variants (grown, paired with `splitting` like the rules above):", ""]
        lines += [f"- {describe_variant(c, variants[c], spec)}" for c in listed]
    dense = next((r["dense"] for r in runs if r["dense"]), None)
    if dense:
        lines += ["", f"dense: head-dim ratio {dense['head_dim']}, MLP hidden width "
                  f"{dense['mlp_hidden']}, {dense['params']:,} parameters (the grown models' "
                  f"target {dense['target']:,})."]
    checks = [c for r in runs for c in r["loss_checks"]]
    if checks:
        ok = sum(c["loss_equal"] and c["before"] == c["after"] and c["equivalent"]
                 for c in checks)
        lines += ["", f"Growth rounds whose loss on the fixed batch was bitwise equal before "
                  f"and after growth (and passed the equivalence check): {ok} of {len(checks)}."]
    unfinished = [f"{r['condition']}-seed{r['seed']} ({r['epochs_done']}/{r['epochs']} epochs)"
                  for r in runs if not r["finished"]]
    if unfinished:
        lines += ["", "Not finished (left out of the tables): " + ", ".join(unfinished) + "."]
    return "\n".join(lines) + "\n"


def write_report(study_dir: str | os.PathLike, *, plots: bool = True) -> dict[str, Any]:
    """Read every run of the study in ``study_dir``; write ``report.md``, ``report.json``
    and (with ``plots``) the figures in ``plots/``. Returns the report's JSON content."""
    root = Path(study_dir)
    if not (root / SPEC_FILE).is_file():
        raise StudyError(f"{root} is not a study directory (no {SPEC_FILE})")
    spec = json.loads((root / SPEC_FILE).read_text())
    runs = [load_run(d) for d in sorted((root / "runs").glob("*"))
            if (d / "config.json").is_file()] if (root / "runs").is_dir() else []
    summary = summarise(runs, spec["conditions"])
    report = {"spec": spec, "runs": runs, **summary}
    (root / "report.json").write_text(json.dumps(report, indent=1))
    (root / "report.md").write_text(markdown(summary, runs, spec))
    if plots and runs:
        from . import study_plots

        report["plots"] = [str(p) for p in study_plots.plot_all(root, runs)]
    return report


__all__ = ["CONDITIONS", "FULL_VARIANTS", "StudyError", "StudySpec", "VARIANT_KEYS",
           "condition_model", "dense_widths", "describe_variant", "full_spec", "load_run",
           "neuron_depths", "quick_spec", "run_depths", "run_one", "run_study", "study_data",
           "summarise", "write_report"]
