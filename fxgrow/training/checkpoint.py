"""Run checkpoints: everything needed to continue a training run bit for bit.

A run directory holds ``checkpoints/ckpt-NNNNNN/`` directories and a ``checkpoints/LATEST``
file naming the newest complete one. A checkpoint is written into a temporary directory
(the model through :func:`fxgrow.save`: base spec, pass history and safetensors weights;
``state.pt``: optimizer state with the parameter names of every group, scheduler, scaler,
RNG states, epoch, metrics; ``meta.json``: run config, epoch, stage), fsynced, renamed into
place with ``os.replace``, and only then does ``LATEST`` move to it (again an fsynced temp
file and ``os.replace``). A process killed at any point therefore leaves ``LATEST`` naming a
complete checkpoint: the previous one until the new one is fully on disk. ``state.pt`` is
read with ``torch.load(weights_only=True)``; no code is ever unpickled.

``stage`` is ``"epoch"`` for the checkpoint written when an epoch ends and ``"grown"`` for
the one written right after a growth round that followed it; a run resumed from an
``"epoch"`` checkpoint calls ``Scaler.after_epoch`` for that epoch again, which runs the round
if it had not run (rounds are idempotent per epoch).

Fault injection for tests: ``FXGROW_FAULT=<hook>[:<n>][@<rank>]`` kills the process with
SIGKILL the ``n``-th time (default 1) execution reaches :func:`fault_point` with that hook
name; with ``@<rank>`` only the process whose ``RANK`` (torchrun's variable) is ``rank``.

Under torch.distributed every rank holds the same state; rank 0 alone writes (the trainer
calls :func:`save` through :func:`fxgrow.training.distributed.on_main`) and every rank loads.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from .. import _fsio
from ..errors import CheckpointError, FxgrowError

FORMAT_VERSION = 1
_DIR = "checkpoints"
_LATEST = "LATEST"
_NAME = re.compile(r"ckpt-(\d{6})")
_STATE_KEYS = ("epoch", "stage", "optimizer", "optimizer_groups", "scheduler", "scaler", "rng",
               "metrics")
_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Kill this process here if ``FXGROW_FAULT`` asks for it (see the module docstring)."""
    spec = os.environ.get("FXGROW_FAULT")
    if not spec:
        return
    spec, _, rank = spec.partition("@")
    hook, _, count = spec.partition(":")
    if hook != name or (rank and rank != os.environ.get("RANK", "0")):
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def capture_rng() -> dict[str, Any]:
    """torch, numpy and Python RNG states, in a form ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "state": list(internal), "gauss": gauss},
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def config_diff(saved: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """One line per top-level key on which two run configurations differ."""
    keys = sorted(set(saved) | set(expected))
    return [f"{k}: {saved.get(k)!r} (checkpoint) != {expected.get(k)!r}" for k in keys
            if saved.get(k) != expected.get(k)]


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (rebuilt from its recipe) and the saved state."""

    path: Path
    model: fx.GraphModule
    epoch: int
    stage: str
    state: dict[str, Any]
    config: dict[str, Any]

    def restore_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Load the optimizer state into ``optimizer`` (built over ``self.model`` with the
        same param-group layout), first pointing its groups at the saved parameter names so
        that groups and order are those of the saved run. Create any LR scheduler on the
        optimizer BEFORE calling this: a new scheduler resets the groups' ``lr``."""
        from .optim import set_group_params

        try:
            set_group_params(optimizer, self.model, self.state["optimizer_groups"])
            optimizer.load_state_dict(self.state["optimizer"])
        except (FxgrowError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{self.path}: optimizer state does not fit: {exc}") from exc


def latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of ``run_dir``, or None."""
    pointer = Path(run_dir) / _DIR / _LATEST
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{pointer} is unreadable: {exc}") from exc
    path = pointer.parent / name
    if not _NAME.fullmatch(name) or path.is_symlink() or not path.is_dir():
        raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint directory "
                              f"of this run (expected ckpt-NNNNNN next to it)")
    return path


def save(
    run_dir: str | os.PathLike,
    *,
    model: fx.GraphModule,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    epoch: int,
    stage: str,
    metrics: list[dict[str, Any]],
    config: dict[str, Any],
    keep: int = 2,
    rng_ranks: list[dict[str, Any]] | None = None,
) -> Path:
    """Write a checkpoint atomically and make it the latest; keep the newest ``keep``.
    ``rng_ranks``: every rank's :func:`capture_rng` in a distributed run (rank 0's is also
    saved as ``rng``, which a single process restores).

    Raises:
        StorageError: the disk is full or read-only (the previous checkpoint stays latest).
    """
    root = Path(run_dir) / _DIR
    with _fsio.storage_errors(f"writing a checkpoint into {root}"):
        return _save(root, run_dir, model, optimizer, scheduler, scaler, epoch, stage, metrics,
                     config, keep, rng_ranks)


def _save(root: Path, run_dir: Any, model: fx.GraphModule, optimizer: torch.optim.Optimizer,
          scheduler: Any, scaler: Any, epoch: int, stage: str, metrics: list[dict[str, Any]],
          config: dict[str, Any], keep: int, rng_ranks: list[dict[str, Any]] | None) -> Path:
    from ..io import save as save_model
    from .optim import group_param_names

    root.mkdir(parents=True, exist_ok=True)
    current = latest(run_dir)
    seq = int(current.name.split("-")[1]) + 1 if current is not None else 0
    name = f"ckpt-{seq:06d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, tmp / "model")
    fault_point("checkpoint_write")
    state = {
        "format": FORMAT_VERSION,
        "epoch": epoch,
        "stage": stage,
        "optimizer": optimizer.state_dict(),
        "optimizer_groups": group_param_names(optimizer, model),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": capture_rng(),
        "metrics": metrics,
    }
    if rng_ranks is not None:
        state["rng_ranks"] = rng_ranks
    # Serialised in memory, written by Python: a full disk then names itself (torch.save's
    # own writer reports "basic_ios::clear: iostream error").
    buffer = io.BytesIO()
    torch.save(state, buffer)
    _fsio.atomic_write(tmp / "state.pt", buffer.getvalue())
    meta = {"format": FORMAT_VERSION, "epoch": epoch, "stage": stage, "config": config}
    _fsio.atomic_write(tmp / "meta.json", json.dumps(meta, indent=1, sort_keys=True))
    _fsio.fsync_tree(tmp)
    final = root / name
    if final.exists():  # complete but never made latest: the run was killed right here
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsio.atomic_write(root / _LATEST, name)
    old = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("ckpt-"))
    for stale in old[:-keep]:
        shutil.rmtree(stale)
    return final


def remove_temporaries(run_dir: str | os.PathLike) -> None:
    """Delete what a killed writer left half-done (call with the run directory locked)."""
    root = Path(run_dir) / _DIR
    for stale in [*root.glob(".tmp-*"), *root.glob(f".{_LATEST}.tmp-*")]:
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def load(run_dir: str | os.PathLike, config: dict[str, Any]) -> Checkpoint:
    """Load the latest checkpoint of ``run_dir``, checking it was written by a run with
    ``config``.

    Raises:
        CheckpointError: no checkpoint, a checkpoint of another run config or model, a
            truncated or unreadable file.
    """
    from ..io import load as load_model

    path = latest(run_dir)
    if path is None:
        raise CheckpointError(f"{run_dir} holds no complete checkpoint to resume from")
    remove_temporaries(run_dir)
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}/meta.json is unreadable: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path}: unknown checkpoint format {found!r}")
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path}/meta.json lacks the run configuration ('config')")
    diff = config_diff(meta["config"], config)
    if diff:
        raise CheckpointError(
            f"{path} was written by another run configuration:\n  " + "\n  ".join(diff)
        )
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}/state.pt is unreadable: {exc}") from exc
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}/state.pt lacks {', '.join(missing)}")
    if not isinstance(state["epoch"], int) or state["stage"] not in ("epoch", "grown"):
        raise CheckpointError(f"{path}/state.pt: epoch {state['epoch']!r} / stage "
                              f"{state['stage']!r} are not a checkpoint's")
    model = load_model(path / "model")
    expected_base = config.get("base")
    base = (model.meta.get("fxgrow") or {}).get("base")
    if expected_base is not None and base != expected_base:
        raise CheckpointError(
            f"{path} holds a model built from {base!r}, the run expects {expected_base!r}"
        )
    return Checkpoint(path, model, state["epoch"], state["stage"], state, meta["config"])
