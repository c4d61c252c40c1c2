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
from ..errors import ScheduleError
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
        if self.epochs <= 0:
            raise ScheduleError(f"epochs must be positive, got {self.epochs}")
        if self.batch_size <= 0 or self.eval_batch_size <= 0:
            raise ScheduleError("batch sizes must be positive")
        if not self.lr > 0 or self.min_lr < 0 or self.weight_decay < 0:
            raise ScheduleError("lr must be positive, min_lr and weight_decay non-negative")
        if self.warmup_epochs < 0 or not 0 <= self.label_smoothing < 1:
            raise ScheduleError("warmup_epochs must be >= 0 and label_smoothing in [0, 1)")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ScheduleError(f"clip_grad must be positive, got {self.clip_grad}")


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
) -> RunResult:
    """Train ``model`` (a GraphModule with a base spec, so it can be checkpointed) on
    ``bundle``, growing it on ``schedule``, logging into the new directory ``run_dir``.

    With ``resume=True`` the run continues from the latest checkpoint in ``run_dir``;
    ``model`` then only needs to be the run's starting model (its recipe must match), the
    weights come from the checkpoint. ``run_config`` is extra JSON the run directory
    records (what the command line was given); a resume with a different one is refused.
    ``pack`` trains grown models packed (see :class:`fxgrow.training.scaler.Scaler`).

    ``triple`` runs TripLe's serialized schedule (:mod:`fxgrow.training.triple`): the model
    is widened before training and deepened after stage I, with or without growth rounds.

    Raises:
        CheckpointError: ``run_dir`` exists without ``resume``; no or a foreign checkpoint.
        ScheduleError: ``resume`` of a run with a TripLe schedule (not supported).
    """
    from ..verify import count_params

    tripler = None
    if triple is not None:
        if resume:
            raise ScheduleError("resuming a run with a TripLe schedule is not supported")
        triple.check_epochs(config.epochs)
        tripler = TripleScaler(triple)
        model, _ = tripler.start(model)

    rank, world = distributed.rank_world()
    main = rank == 0
    if config.batch_size % world:
        raise ScheduleError(
            f"the global batch_size {config.batch_size} is not divisible by the {world} ranks"
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
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    if config.batch_size > len(bundle.train):
        raise ScheduleError(
            f"batch_size {config.batch_size} exceeds the {len(bundle.train)} training images"
        )
    # tail="drop" + drop_last: step k of the ranks together is step k of one process.
    train_loader = data_mod.loader(bundle.train, config.batch_size // world, seed=config.seed,
                                   drop_last=True, num_replicas=world, rank=rank,
                                   tail="drop" if world > 1 else "pad")
    val_loader = data_mod.loader(bundle.val, config.eval_batch_size, shuffle=False,
                                 num_replicas=world, rank=rank, tail="uneven")
    device = distributed.device()  # this rank's GPU under NCCL, else the CPU
    analysis: list[Any] = []
    if schedule is not None:
        fixed = data_mod.loader(bundle.train, config.batch_size, shuffle=False)
        for batch in fixed:
            analysis.append(_to(*batch, device))
            if len(analysis) == schedule.analysis_batches:
                break
    sample = bundle.val[0][0].unsqueeze(0).to(device)
    flops = _FlopCache(sample)

    if resume:
        if run.config() != full_config:
            diff = checkpoint._config_diff(run.config(), full_config)
            raise checkpoint.CheckpointError(
                f"{run_dir} was started with another configuration:\n  " + "\n  ".join(diff)
            )
        ckpt = checkpoint.load(run_dir, full_config)
        # load() removes stale temporary directories: no rank may write before all loaded.
        distributed.barrier("loading the checkpoint")
        model = ckpt.model
        model.to(device).train()
        optimizer = make_optimizer(model, config)
        # A new scheduler sets each group's lr to its step-0 value: restore the optimizer
        # (groups' lr included) after creating it, or the first resumed step uses that lr.
        scheduler = make_scheduler(optimizer, config, len(train_loader))
        ckpt.restore_optimizer(optimizer)
        scheduler.load_state_dict(ckpt.state["scheduler"])
        ranks_rng = ckpt.state.get("rng_ranks")
        if ranks_rng is not None and len(ranks_rng) == world:
            checkpoint.restore_rng(ranks_rng[rank])
        elif main:
            checkpoint.restore_rng(ckpt.state["rng"])
        else:  # saved with another number of ranks: a fresh stream of its own
            seed_everything(config.seed + rank + 1_000_003 * (ckpt.epoch + 1))
        metrics = list(ckpt.state["metrics"])
        start = ckpt.epoch + 1
    else:
        seed_everything(config.seed + rank)  # distinct dropout/augmentation draws per rank
        distributed.on_main(lambda: run.create(full_config), "creating the run directory")
        model.to(device).train()
        optimizer = make_optimizer(model, config)
        scheduler = make_scheduler(optimizer, config, len(train_loader))
        metrics, start, ckpt = [], 0, None
    scaler = None
    if schedule is not None:
        # Every rank holds the whole dataset, so it builds the global analysis batches
        # itself: the same report and plan as one process, with nothing to gather.
        scaler = Scaler(model, optimizer, schedule, analysis, criterion,
                        flop_inputs=sample, progress=not quiet and main, seed=config.seed,
                        gather_analysis=False, pack=pack)
        if ckpt is not None:
            scaler.load_state_dict(ckpt.state["scaler"])

    def write(epoch: int, stage: str, rng_ranks: list[Any] | None) -> None:
        checkpoint.save(run_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                        scaler=scaler, epoch=epoch, stage=stage, metrics=metrics,
                        config=full_config, rng_ranks=rng_ranks)
        run.write_metrics(metrics)
        run.write_growth(scaler.records if scaler is not None else [])

    def save(epoch: int, stage: str) -> None:
        # Ranks hold identical weights and optimizer states: rank 0 writes, the others wait
        # for it (and fail with its error if it fails).
        rng_ranks = None
        if world > 1:  # each rank's own random stream, so that a resume continues all of them
            rng_ranks = distributed.all_gather_object(checkpoint.capture_rng(),
                                                      "gathering the RNG states")
        distributed.on_main(lambda: write(epoch, stage, rng_ranks),
                            f"writing the {stage} checkpoint")

    net = distributed.wrap(model)

    def grow_after(epoch: int) -> bool:
        """Run the round due after ``epoch`` (if any, and not run yet); checkpoint it."""
        nonlocal model, net
        if scaler is None:
            return False
        rounds = len(scaler.records)
        model = scaler.after_epoch(epoch)
        if len(scaler.records) == rounds:
            return False
        record = scaler.records[-1]
        if main:
            run.save_report(scaler.last_report, record["round"])
        if record.get("grown"):
            # New parameters: a new DDP wrapper (and gradient buckets) around the grown model.
            net = distributed.wrap(model, previous=net)
            if main:
                run.plot_round(scaler.last_report, record["round"])
        save(epoch, "grown")
        return True

    if ckpt is not None:  # the round after the checkpoint's epoch may not have run yet
        grow_after(ckpt.epoch)
    for epoch in range(start, config.epochs):
        started = time.perf_counter()
        train_loader.sampler.set_epoch(epoch)
        net.train()
        loss_sum, steps = 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=quiet or not main, leave=False)
        for inputs, labels in bar:
            inputs, labels = _to(inputs, labels, device)
            loss = criterion(net(inputs), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
            optimizer.step()
            if tripler is not None:
                tripler.after_step()
            scheduler.step()
            loss_sum += loss.item()
            steps += 1
            checkpoint.fault_point("step")
        # Equal per-rank batches: the mean over ranks of their mean losses is the global one.
        loss_sum = distributed.all_reduce_sum([loss_sum], "reducing the training loss")[0]
        record = {"epoch": epoch, "train_loss": loss_sum / world / steps,
                  **evaluate(model, val_loader, reduce=world > 1),
                  "params": count_params(model), "flops": flops(model),
                  "lr": optimizer.param_groups[0]["lr"], "time": time.perf_counter() - started}
        metrics.append(record)
        save(epoch, "epoch")
        checkpoint.fault_point("epoch_end")
        if tripler is not None:
            model, optimizer, changed = tripler.after_epoch(epoch, model, optimizer)
            if changed:
                scheduler = _rebind_scheduler(scheduler, optimizer)
                net = distributed.wrap(model, previous=net)
                if scaler is not None:
                    scaler.model, scaler.optimizer = model, optimizer
                save(epoch, "expanded")
        if grow_after(epoch):
            checkpoint.fault_point("after_growth")
    records = scaler.records if scaler is not None else []
    if main:
        run.plot_metrics(metrics, [r["epoch"] for r in records if r.get("grown")])
    summary = summary_table(metrics, records)
    return RunResult(model, metrics, records, summary,
                     tripler.records if tripler is not None else [])


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
