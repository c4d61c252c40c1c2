"""The built-in trainer: AdamW (timm's optimizer factory, which keeps biases and 1-D
parameters out of weight decay), a per-step warm-up + cosine learning-rate schedule,
optional label smoothing and gradient clipping, top-1/top-5 evaluation, and growth through
:class:`fxgrow.training.scaler.Scaler`. Every epoch and every growth round is checkpointed
(:mod:`fxgrow.training.checkpoint`) and logged in the run directory (:mod:`fxgrow.training.rundir`).

Gradient clipping (``clip_grad``) is by global gradient norm: it is the one setting under
which growth changes the next step of existing parameters, because the norm then includes
the new parameters' gradients. Without it, a grown model's existing parameters step
exactly as the ungrown model's would have.

Determinism: batch order is a function of (seed, epoch) (:class:`fxgrow.training.data.EpochSampler`)
and the RNG states are checkpointed, so a run resumed from its run directory ends with the
same weights and metrics, bit for bit on the CPU, as an uninterrupted one (``time`` excepted).

Under torchrun (:mod:`fxgrow.training.distributed`, docs/distributed.md) ``batch_size`` stays the
GLOBAL batch: each of the N ranks trains on ``batch_size / N`` samples of it through DDP, so
step k sees the same samples as step k of a single process, the learning-rate schedule is
the same, and a run directory can be resumed with any number of processes. Validation is
sharded and its sums reduced; rank 0 writes checkpoints and logs.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checkpoint, data as data_mod, distributed
from ..errors import CheckpointError, ScheduleError
from ..recipes import recipe
from .rundir import RunDir, summary_table
from .scaler import Scaler, ScalingSchedule
from .triple import TripleScaler, TripleSchedule


@dataclass
class TrainConfig:
    """Training hyper-parameters. ``warmup_epochs`` is the learning-rate warm-up (linear,
    per step), unrelated to the scaling schedule's warm-up."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    optimizer: str = "adamw"
    label_smoothing: float = 0.0
    clip_grad: float | None = None
    seed: int = 0
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ScheduleError(f"{name} must be an integer, got {value!r}")
        for name in ("lr", "min_lr", "weight_decay", "warmup_epochs", "label_smoothing",
                     *(("clip_grad",) if self.clip_grad is not None else ())):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise ScheduleError(f"{name} must be a finite number, got {value!r}")
        if self.epochs <= 0:
            raise ScheduleError(f"epochs must be positive, got {self.epochs}")
        if self.batch_size <= 0 or self.eval_batch_size <= 0:
            raise ScheduleError("batch sizes must be positive")
        if self.seed < 0:
            raise ScheduleError(f"seed must be >= 0, got {self.seed}")
        if not self.lr > 0 or self.min_lr < 0 or self.weight_decay < 0:
            raise ScheduleError("lr must be positive, min_lr and weight_decay non-negative")
        if self.min_lr > self.lr:
            raise ScheduleError(f"min_lr {self.min_lr} is above lr {self.lr}: the cosine "
                                f"schedule would make the learning rate climb")
        if self.warmup_epochs < 0 or not 0 <= self.label_smoothing < 1:
            raise ScheduleError("warmup_epochs must be >= 0 and label_smoothing in [0, 1)")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ScheduleError(f"clip_grad must be positive, got {self.clip_grad}")
        if not isinstance(self.optimizer, str) or self.optimizer.lower() not in _optimizers():
            raise ScheduleError(f"unknown optimizer {self.optimizer!r}; timm knows e.g. "
                                f"adamw, adam, sgd, lamb, lion")


def _optimizers() -> set[str]:
    from timm.optim import list_optimizers

    return {name.lower() for name in list_optimizers()}


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """timm's ``create_optimizer_v2`` (decay / no-decay groups)."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, config.optimizer, lr=config.lr,
                               weight_decay=config.weight_decay)


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to ``min_lr``, stepped once per optimizer step."""
    total = config.epochs * steps_per_epoch
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    floor = config.min_lr / config.lr

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate(model: fx.GraphModule, loader: Any, *, reduce: bool = False) -> dict[str, float]:
    """Mean cross-entropy, top-1 and top-5 accuracy (%) over ``loader``; with ``reduce``,
    over the union of every rank's ``loader`` (sums all-reduced across ranks)."""
    was_training = model.training
    model.eval()
    loss_sum, top1, top5, count = 0.0, 0, 0, 0
    try:
        for inputs, labels in loader:
            inputs, labels = _to(inputs, labels, _model_device(model))
            logits = model(inputs)
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            best = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            hits = best == labels[:, None]
            top1 += int(hits[:, 0].sum())
            top5 += int(hits.any(dim=-1).sum())
            count += len(labels)
    finally:
        model.train(was_training)
    if reduce:
        loss_sum, top1, top5, count = distributed.all_reduce_sum(
            [loss_sum, top1, top5, count], "reducing the validation metrics")
    return {"val_loss": loss_sum / count, "top1": 100.0 * top1 / count,
            "top5": 100.0 * top5 / count}


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@dataclass
class RunResult:
    """What :func:`fit` returns."""

    model: fx.GraphModule
    metrics: list[dict[str, Any]]
    growth: list[dict[str, Any]]
    summary: str
    expansions: list[dict[str, Any]] = dataclasses.field(default_factory=list)


class _FlopCache:
    def __init__(self, sample: torch.Tensor) -> None:
        self.sample, self.key, self.value = sample, None, 0

    def __call__(self, model: fx.GraphModule) -> int:
        from ..verify import count_flops

        if self.key is not model:
            # Forked so that counting (done only when the model changes, so not at the same
            # points in a resumed run) leaves the RNG stream of training untouched.
            with torch.random.fork_rng():
                self.key, self.value = model, int(count_flops(model, self.sample).total)
        return self.value


def fit(
    model: fx.GraphModule,
    bundle: data_mod.DataBundle,
    config: TrainConfig,
    run_dir: str,
    *,
    schedule: ScalingSchedule | None = None,
    run_config: dict[str, Any] | None = None,
    resume: bool = False,
    quiet: bool = False,
    triple: TripleSchedule | None = None,
    pack: bool = True,
    shard_analysis: bool = True,
) -> RunResult:
    """Train ``model`` (a GraphModule with a base spec, so it can be checkpointed) on
    ``bundle``, growing it on ``schedule``, logging into the new directory ``run_dir``.

    With ``resume=True`` the run continues from the latest checkpoint in ``run_dir``;
    ``model`` then only needs to be the run's starting model (its recipe must match), the
    weights come from the checkpoint. A run killed before its first checkpoint starts
    afresh from ``model``. ``run_config`` is extra JSON the run directory records (what the
    command line was given); a resume with a different one is refused. The run directory
    is locked for the whole call: a second writer is refused. ``pack`` trains grown models
    packed (see :class:`fxgrow.training.scaler.Scaler`). ``shard_analysis`` splits each round's
    analysis across the ranks under torch.distributed (the same report; see the Scaler).

    ``triple`` runs TripLe's serialized schedule (:mod:`fxgrow.training.triple`): the model
    is widened before training and deepened after stage I, with or without growth rounds.

    Raises:
        CheckpointError: ``run_dir`` exists without ``resume``; a foreign checkpoint.
        RunLockedError: another process is writing ``run_dir``.
        StorageError: the disk refused a write.
        ScheduleError: ``resume`` of a run with a TripLe schedule (not supported).
    """
    tripler = None
    if triple is not None:
        if resume:
            raise ScheduleError("resuming a run with a TripLe schedule is not supported")
        triple.check_epochs(config.epochs)
        tripler = TripleScaler(triple)
        model, _ = tripler.start(model)

    rank, world = distributed.rank_world()
    if config.batch_size % world:
        raise ScheduleError(
            f"the global batch_size {config.batch_size} is not divisible by the {world} ranks"
        )
    if config.batch_size > len(bundle.train):
        raise ScheduleError(
            f"batch_size {config.batch_size} exceeds the {len(bundle.train)} training images"
        )
    if resume:
        run = RunDir(run_dir, resume=True)  # read-only on every rank
    else:
        run = distributed.on_main(lambda: RunDir(run_dir), "checking the run directory")
    full_config = {
        "train": dataclasses.asdict(config),
        "schedule": schedule.to_dict() if schedule is not None else None,
        "data": bundle.name,
        "img_size": bundle.img_size,
        "base": recipe(model)["base"],
        "start_history": recipe(model)["history"],
        "extra": run_config or {},
    }
    if triple is not None:
        full_config["triple"] = triple.to_dict()
    full_config = _json_roundtrip(full_config)
    trainer = _Trainer(model, bundle, config, schedule, run_dir, run, full_config, quiet,
                       pack=pack, shard_analysis=shard_analysis)
    trainer.tripler = tripler
    try:
        if resume:
            trainer.resume()
        else:
            trainer.start(create=True)
        return trainer.train()
    finally:
        if run is not None:
            run.unlock()


class _Trainer:
    """The state of one run between epochs (model, DDP wrapper, optimizer, schedule,
    scaler, metrics) and the steps :func:`fit` takes on it."""

    def __init__(self, model: fx.GraphModule, bundle: data_mod.DataBundle, config: TrainConfig,
                 schedule: ScalingSchedule | None, run_dir: str, run: RunDir | None,
                 full_config: dict[str, Any], quiet: bool, *, pack: bool = True,
                 shard_analysis: bool = True) -> None:
        self.rank, self.world = distributed.rank_world()
        self.main = self.rank == 0
        self.model, self.config, self.schedule = model, config, schedule
        self.run, self.full_config, self.quiet, self.pack = run, full_config, quiet, pack
        self.shard_analysis = shard_analysis
        self.run_dir = run_dir  # ``run`` is None on the ranks that never write
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        world, rank = self.world, self.rank
        # tail="drop" + drop_last: step k of the ranks together is step k of one process.
        self.train_loader = data_mod.loader(
            bundle.train, config.batch_size // world, seed=config.seed, drop_last=True,
            num_replicas=world, rank=rank, tail="drop" if world > 1 else "pad")
        self.val_loader = data_mod.loader(bundle.val, config.eval_batch_size, shuffle=False,
                                          num_replicas=world, rank=rank, tail="uneven")
        self.device = distributed.device()  # this rank's GPU under NCCL, else the CPU
        self.analysis: list[Any] = []
        if schedule is not None:
            fixed = data_mod.loader(bundle.train, config.batch_size, shuffle=False)
            # Epoch 0's draw of a data set that redraws per epoch (teacher_student), whatever
            # epoch an earlier run on the same bundle left it at (a study shares one bundle).
            fixed.sampler.set_epoch(0)
            for batch in fixed:
                self.analysis.append(_to(*batch, self.device))
                if len(self.analysis) == schedule.analysis_batches:
                    break
        self.sample = bundle.val[0][0].unsqueeze(0).to(self.device)
        self.flops = _FlopCache(self.sample)
        self.metrics: list[dict[str, Any]] = []
        self.start_epoch = 0
        self.scaler: Scaler | None = None
        self.tripler: TripleScaler | None = None
        self.net: torch.nn.Module = model

    # ------------------------------------------------------------------ starting a run
    def start(self, *, create: bool) -> None:
        """A run from epoch 0 with the model given (a new directory, or one holding no
        checkpoint yet)."""
        seed_everything(self.config.seed + self.rank)  # distinct dropout draws per rank
        if create:
            distributed.on_main(lambda: self.run.create(self.full_config),
                                "creating the run directory")
        self.model.to(self.device).train()
        self.optimizer = make_optimizer(self.model, self.config)
        self.scheduler = make_scheduler(self.optimizer, self.config, len(self.train_loader))
        self._make_scaler()
        self.net = distributed.wrap(self.model)

    def resume(self) -> None:
        """Continue from the latest checkpoint; start afresh if there is none yet."""
        run = self.run  # opened read-only on every rank
        saved = run.config()
        if saved != self.full_config:
            diff = checkpoint.config_diff(saved, self.full_config)
            raise CheckpointError(
                f"{run.path} was started with another configuration:\n  " + "\n  ".join(diff)
            )
        distributed.on_main(run.lock, "locking the run directory")
        if checkpoint.latest(run.path) is None:  # killed before its first checkpoint
            distributed.on_main(lambda: checkpoint.remove_temporaries(run.path),
                                "removing a partial checkpoint")
            self.start(create=False)
            return
        ckpt = checkpoint.load(run.path, self.full_config)
        # load() removes stale temporary directories: no rank may write before all loaded.
        distributed.barrier("loading the checkpoint")
        self.model = ckpt.model
        self.model.to(self.device).train()
        self.optimizer = make_optimizer(self.model, self.config)
        # A new scheduler sets each group's lr to its step-0 value: restore the optimizer
        # (groups' lr included) after creating it, or the first resumed step uses that lr.
        self.scheduler = make_scheduler(self.optimizer, self.config, len(self.train_loader))
        ckpt.restore_optimizer(self.optimizer)
        try:
            self.scheduler.load_state_dict(ckpt.state["scheduler"])
            self._restore_rng(ckpt)
            self._make_scaler(ckpt.state["scaler"])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
            raise CheckpointError(f"{ckpt.path}/state.pt does not fit this run: "
                                  f"{type(exc).__name__}: {exc}") from exc
        self.metrics = list(ckpt.state["metrics"])
        self.start_epoch = ckpt.epoch + 1
        # A kill between the checkpoint and the logs' rewrite left them one epoch behind.
        distributed.on_main(self._write_logs, "rewriting the run's logs")
        self.net = distributed.wrap(self.model)
        self.grow_after(ckpt.epoch)  # the round after the checkpoint's epoch may not have run

    def _restore_rng(self, ckpt: checkpoint.Checkpoint) -> None:
        ranks_rng = ckpt.state.get("rng_ranks")
        if ranks_rng is not None and len(ranks_rng) == self.world:
            checkpoint.restore_rng(ranks_rng[self.rank])
        elif self.main:
            checkpoint.restore_rng(ckpt.state["rng"])
        else:  # saved with another number of ranks: a fresh stream of its own
            seed_everything(self.config.seed + self.rank + 1_000_003 * (ckpt.epoch + 1))

    def _make_scaler(self, state: dict[str, Any] | None = None) -> None:
        if self.schedule is None:
            return
        # Every rank holds the whole dataset, so it builds the global analysis batches
        # itself: the same report and plan as one process, with nothing to gather.
        self.scaler = Scaler(self.model, self.optimizer, self.schedule, self.analysis,
                             self.criterion, flop_inputs=self.sample,
                             progress=not self.quiet and self.main, seed=self.config.seed,
                             gather_analysis=False, pack=self.pack,
                             shard_analysis=self.shard_analysis)
        if state is not None:
            self.scaler.load_state_dict(state)

    # ------------------------------------------------------------------ checkpoints
    @property
    def records(self) -> list[dict[str, Any]]:
        return self.scaler.records if self.scaler is not None else []

    def _write_logs(self) -> None:
        self.run.write_metrics(self.metrics)
        self.run.write_growth(self.records)

    def save(self, epoch: int, stage: str) -> None:
        """Checkpoint, then rewrite the logs. Ranks hold identical weights and optimizer
        states: rank 0 writes, the others wait for it (and fail with its error)."""
        rng_ranks = None
        if self.world > 1:  # each rank's own random stream, so that a resume continues all
            rng_ranks = distributed.all_gather_object(checkpoint.capture_rng(),
                                                      "gathering the RNG states")

        def write() -> None:
            checkpoint.save(self.run_dir, model=self.model, optimizer=self.optimizer,
                            scheduler=self.scheduler, scaler=self.scaler, epoch=epoch,
                            stage=stage, metrics=self.metrics, config=self.full_config,
                            rng_ranks=rng_ranks)
            checkpoint.fault_point("checkpoint_saved")
            self._write_logs()

        distributed.on_main(write, f"writing the {stage} checkpoint")

    # ------------------------------------------------------------------ training
    def grow_after(self, epoch: int) -> bool:
        """Run the round due after ``epoch`` (if any, and not run yet); checkpoint it."""
        if self.scaler is None:
            return False
        rounds = len(self.scaler.records)
        self.model = self.scaler.after_epoch(epoch)
        if len(self.scaler.records) == rounds:
            return False
        record = self.scaler.records[-1]
        if self.main:
            self.run.save_report(self.scaler.last_report, record["round"])
        if record.get("grown"):
            # New parameters: a new DDP wrapper (and gradient buckets) around the grown model.
            self.net = distributed.wrap(self.model, previous=self.net)
            if self.main:
                self.run.plot_round(self.scaler.last_report, record["round"])
        self.save(epoch, "grown")
        return True

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch of steps, then validation: the epoch's metrics record."""
        from ..verify import count_params

        started = time.perf_counter()
        config, model, optimizer = self.config, self.model, self.optimizer
        self.train_loader.sampler.set_epoch(epoch)
        self.net.train()
        loss_sum, steps = 0.0, 0
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=self.quiet or not self.main, leave=False)
        for inputs, labels in bar:
            inputs, labels = _to(inputs, labels, self.device)
            loss = self.criterion(self.net(inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
            optimizer.step()
            if self.tripler is not None:
                self.tripler.after_step()
            self.scheduler.step()
            loss_sum += loss.item()
            steps += 1
            checkpoint.fault_point("step")
        # Equal per-rank batches: the mean over ranks of their mean losses is the global one.
        loss_sum = distributed.all_reduce_sum([loss_sum], "reducing the training loss")[0]
        return {"epoch": epoch, "train_loss": loss_sum / self.world / steps,
                **evaluate(model, self.val_loader, reduce=self.world > 1),
                "params": count_params(model), "flops": self.flops(model),
                "lr": optimizer.param_groups[0]["lr"], "time": time.perf_counter() - started}

    def expand_after(self, epoch: int) -> None:
        """TripLe's expansion due after ``epoch`` (if any): new model, optimizer and wrapper."""
        if self.tripler is None:
            return
        self.model, self.optimizer, changed = self.tripler.after_epoch(epoch, self.model,
                                                                       self.optimizer)
        if changed:
            self.scheduler = _rebind_scheduler(self.scheduler, self.optimizer)
            self.net = distributed.wrap(self.model, previous=self.net)
            if self.scaler is not None:
                self.scaler.model, self.scaler.optimizer = self.model, self.optimizer
            self.save(epoch, "expanded")

    def train(self) -> RunResult:
        for epoch in range(self.start_epoch, self.config.epochs):
            self.metrics.append(self.train_epoch(epoch))
            self.save(epoch, "epoch")
            checkpoint.fault_point("epoch_end")
            self.expand_after(epoch)
            if self.grow_after(epoch):
                checkpoint.fault_point("after_growth")
        records = self.records
        if self.main:
            self.run.plot_metrics(self.metrics, [r["epoch"] for r in records if r.get("grown")])
        return RunResult(self.model, self.metrics, records, summary_table(self.metrics, records),
                         self.tripler.records if self.tripler is not None else [])


def _rebind_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR,
                      optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """The same schedule, at the same step, driving a new optimizer (groups keep their
    ``initial_lr``). The constructor takes one step, hence the step before."""
    factors = scheduler.lr_lambdas
    factors = factors if len(factors) == len(optimizer.param_groups) else factors[0]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors,
                                             last_epoch=scheduler.last_epoch - 1)


def _model_device(model: torch.nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _to(inputs: torch.Tensor, labels: torch.Tensor, device: torch.device) -> tuple:
    return inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def _json_roundtrip(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value))
