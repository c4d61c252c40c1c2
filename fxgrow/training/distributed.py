"""Growth under ``torchrun`` / DistributedDataParallel (docs/distributed.md).

What fxgrow does across ranks, and nothing more:

- :func:`init_from_env` joins the process group torchrun describes in the environment
  (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; env://), gloo on
  CPU and NCCL on GPUs, with a timeout so that a rank that dies makes the others fail with
  an error instead of waiting forever.
- :func:`gather_batches` all-gathers the analysis batches, so every rank analyses the same
  global batch and computes the same splitting report and plan as one process would;
  :func:`check_same` all-gathers a hash (of the plan, of the grown parameters) and raises if
  the ranks disagree.
- :func:`wrap` puts a GraphModule in DDP, and after growth wraps the grown module anew
  (the old wrapper's gradient hooks are removed; the new one buckets the new parameters).
- :func:`on_main` runs file writes on rank 0 only and hands its failure to every rank;
  :func:`gather_outcomes` runs a step on every rank and hands any rank's failure to all.

Without an initialised process group every function is the single-process identity, so
the same code runs under ``python`` and under ``torchrun``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .. import errors
from ..errors import ConfigError, DataError, DistributedError, FxgrowError

T = TypeVar("T")

#: Seconds a collective waits for the other ranks before failing (torch's default is 30 min).
DEFAULT_TIMEOUT = 600.0


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` in a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Rank 0, or a single process."""
    return rank_world()[0] == 0


def launched_by_torchrun() -> bool:
    """Whether the environment describes a process group (torchrun or a manual launch)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_from_env(backend: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Join the process group described by torchrun's environment variables; return whether
    one was joined (False when not launched by torchrun, or already initialised).

    ``backend`` defaults to ``"nccl"`` when CUDA is available (each rank then uses GPU
    ``LOCAL_RANK``) and ``"gloo"`` otherwise. ``timeout`` (seconds) bounds every collective:
    when a rank dies, the others raise after at most that long (gloo usually notices the
    closed connection sooner).
    """
    if not launched_by_torchrun() or dist.is_initialized():
        return False
    if not timeout > 0:
        raise ConfigError(f"the distributed timeout must be positive, got {timeout}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ConfigError("the nccl backend needs CUDA GPUs; use --backend gloo on the CPU")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, init_method="env://",
                            timeout=timedelta(seconds=timeout))
    return True


def shutdown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device() -> torch.device:
    """Where this rank's collectives and model live: its GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective(what: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except (RuntimeError, dist.DistError) as exc:
        rank, world = rank_world()
        raise DistributedError(
            f"rank {rank}/{world}: {what} failed: another rank failed, exited or did not "
            f"answer within the process group's timeout ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc


def barrier(what: str = "barrier") -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        _collective(what, dist.barrier)


def all_gather_object(value: Any, what: str) -> list[Any]:
    """Every rank's ``value``, in rank order (``[value]`` in a single process)."""
    if not is_distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    _collective(what, lambda: dist.all_gather_object(out, value))
    return out


def all_reduce_sum(values: Sequence[float], what: str = "all-reduce") -> list[float]:
    """Elementwise sum over ranks, in float64."""
    if not is_distributed():
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device())
    _collective(what, lambda: dist.all_reduce(tensor))
    return tensor.cpu().tolist()


def digest(value: str | bytes | nn.Module) -> str:
    """sha256 of a string, bytes, or a module's parameters and buffers (names, dtypes,
    shapes and exact bytes)."""
    h = hashlib.sha256()
    if isinstance(value, nn.Module):
        for name, tensor in [*value.named_parameters(), *value.named_buffers()]:
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(value.encode() if isinstance(value, str) else value)
    return h.hexdigest()


def check_same(value: str | bytes | nn.Module, what: str) -> str:
    """All-gather the digest of ``value`` and raise :class:`DistributedError` naming the
    ranks that differ from rank 0. Returns the digest."""
    mine = digest(value)
    digests = all_gather_object(mine, f"comparing the {what} across ranks")
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise DistributedError(
            f"the {what} differs between rank 0 and ranks {differ} "
            f"(sha256 {digests[0][:12]} vs {[digests[r][:12] for r in differ]})"
        )
    return mine


def gather_batches(batches: Sequence[Any]) -> list[Any]:
    """All-gather each ``(inputs, labels)`` batch along dim 0: batch ``i`` of the result is
    the concatenation, in rank order, of every rank's batch ``i``. Every rank must hold the
    same number of batches, each of the same structure, shapes and dtypes (checked). A
    contiguous split of a global batch by rank therefore gathers back to that global batch.

    Raises:
        DataError: ranks disagree on the number, structure or shapes of their batches.
    """
    if not is_distributed():
        return list(batches)
    flat = [tree_flatten(b) for b in batches]
    layout = [
        (str(spec), [(tuple(x.shape), str(x.dtype)) if isinstance(x, torch.Tensor) else repr(x)
                     for x in leaves])
        for leaves, spec in flat
    ]
    layouts = all_gather_object(layout, "gathering the analysis batches' shapes")
    for rank, other in enumerate(layouts):
        if len(other) != len(layout):
            raise DataError(f"rank {rank} holds {len(other)} analysis batches, rank "
                            f"{dist.get_rank()} holds {len(layout)}")
        for i, (a, b) in enumerate(zip(layouts[0], other)):
            if a != b:
                raise DataError(
                    f"analysis batch {i} differs in structure or shape between rank 0 "
                    f"{a} and rank {rank} {b}: every rank must give batches of equal shape"
                )
    world, here = dist.get_world_size(), device()
    result = []
    for leaves, spec in flat:
        gathered = []
        for x in leaves:
            if not isinstance(x, torch.Tensor):
                gathered.append(x)
                continue
            local = x.detach().to(here).contiguous()
            parts = [torch.empty_like(local) for _ in range(world)]
            _collective("gathering the analysis batches",
                        lambda: dist.all_gather(parts, local))
            gathered.append(torch.cat(parts).to(x.device))
        result.append(tree_unflatten(gathered, spec))
    return result


def wrap(model: nn.Module, previous: nn.Module | None = None, **ddp_kwargs: Any) -> nn.Module:
    """``model`` in DistributedDataParallel (``model`` itself in a single process).

    The first wrap (``previous=None``) broadcasts rank 0's parameters, as DDP does. To
    rewrap after growth, pass the old wrapper as ``previous``: its gradient hooks are removed
    from the (shared) parameters and the new wrapper is built without the broadcast, so the
    grown parameters, which every rank computed itself, are checked identical instead
    (:func:`check_same`) and never silently overwritten.
    """
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if previous is not None:
        if isinstance(previous, DDP):
            _detach_ddp(previous)
        check_same(model, "grown model's parameters")
    ids = [device().index] if device().type == "cuda" else None
    return _collective(
        "wrapping the model in DistributedDataParallel",
        lambda: DDP(model, device_ids=ids, init_sync=previous is None, **ddp_kwargs),
    )


def _detach_ddp(wrapper: nn.Module) -> None:
    """Remove a DDP wrapper's gradient hooks from the parameters it shares with the grown
    model. torch offers no public call for it: this is the one place that uses the private
    ``_remove_autograd_hooks`` (present since torch 2.0), so a torch upgrade breaks here
    loudly rather than leaving a second wrapper's all-reduce on every gradient."""
    remove = getattr(wrapper, "_remove_autograd_hooks", None)
    if remove is None:
        raise errors.InternalError(
            f"torch {torch.__version__}: DistributedDataParallel has no _remove_autograd_hooks; "
            f"fxgrow cannot rewrap a grown model under this torch")
    remove()


def on_main(fn: Callable[[], T], what: str) -> T | None:
    """Run ``fn`` on rank 0 only (file writes), then let every rank continue together.
    An :class:`fxgrow.errors.FxgrowError` raised on rank 0 is raised on every rank (same
    type and message; any other exception as :class:`DistributedError` on the others), so
    no rank waits for a writer that failed. Returns ``fn()`` on rank
    0 and None on the others."""
    if not is_distributed():
        return fn()
    result, failure, error = None, None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as exc:  # every rank must hear of it, whatever it is
            error = exc
            failure = (type(exc).__name__, str(exc))
    box = [failure]
    _collective(what, lambda: dist.broadcast_object_list(box, src=0))
    if error is not None:
        raise error
    if box[0] is not None:
        _raise_remote(0, *box[0], what)
    return result


def gather_outcomes(fn: Callable[[], T], what: str) -> list[T]:
    """Run ``fn`` on every rank and return every rank's result, in rank order. When ``fn``
    fails on any rank, every rank raises: the failing rank its own exception, the others the
    lowest failing rank's (same type and message for an
    :class:`fxgrow.errors.FxgrowError`, else :class:`DistributedError`), so no rank waits
    for a result that never comes."""
    try:
        outcome: tuple[bool, Any] = (True, fn())
        error = None
    except Exception as exc:  # every rank must hear of it, whatever it is
        outcome, error = (False, (type(exc).__name__, str(exc))), exc
    outcomes = all_gather_object(outcome, what)
    if error is not None:
        raise error
    for rank, (ok, value) in enumerate(outcomes):
        if not ok:
            _raise_remote(rank, *value, what)
    return [value for _, value in outcomes]


def _raise_remote(rank: int, name: str, message: str, what: str) -> None:
    """Raise here the exception another rank raised: an fxgrow error as itself."""
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, FxgrowError):
        raise cls(message)
    raise DistributedError(f"rank {rank} failed while {what}: {name}: {message}")


__all__ = [
    "DEFAULT_TIMEOUT", "DistributedError", "all_gather_object", "all_reduce_sum", "barrier",
    "check_same", "device", "digest", "gather_batches", "gather_outcomes", "init_from_env",
    "is_distributed", "is_main", "launched_by_torchrun", "on_main", "rank_world", "shutdown",
    "wrap",
]
