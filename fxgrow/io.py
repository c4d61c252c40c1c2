"""Saving and loading grown models: weights in safetensors, structure as a JSON recipe.

A saved model is a directory::

    model_dir/
        recipe.json          format version, fxgrow/torch versions, the base model spec, the pass
                             history (plans included), the weights' sha256, size and key list
        model.safetensors    the GraphModule's state_dict

``load`` rebuilds the base with :func:`fxgrow.models.build` (or traces the caller's own module
the recorded way, ``load(path, model=...)``), replays the history through
:mod:`fxgrow.passes.replay` and loads the weights strictly. Nothing is unpickled, so a model
someone sent you cannot run code on load (docs/saving.md).

Integrity, not authenticity: the recipe's checksum and the weights' sha256 are unkeyed
digests, so they detect a truncated or corrupted file, not a file crafted to match them.
Every file name a recipe gives is confined to the model directory (a plain name, no path).
"""

from __future__ import annotations

import copy
import hashlib
import json
import numbers
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as safetensors_bytes

from . import _fsio, recipes
from .errors import CheckpointError

FORMAT = "fxgrow-model"
FORMAT_VERSION = 1
RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "model.safetensors"


# --------------------------------------------------------------------------------------- save


def save(gm: fx.GraphModule, path: str | os.PathLike) -> Path:
    """Save ``gm`` as a model directory at ``path`` and return the path.

    The write is atomic: everything goes to a temporary directory next to ``path`` which then
    takes ``path``'s place in one rename, or, over a previous model, one atomic exchange
    (Linux ``renameat2``; elsewhere the old model is renamed aside first), so ``path`` never
    holds a half-written model and a previous one stays intact until the new one is complete. Tensors that share storage are written as separate copies
    (safetensors refuses shared tensors); loading restores the sharing the recipe rebuilds.

    Raises:
        CheckpointError: ``gm`` has no base spec (a GraphModule not made by
            :func:`fxgrow.trace` or :mod:`fxgrow.models`, or traced with arguments that are not
            plain data), ``path`` is an existing file or a non-empty
            directory that is not a saved model, or the recipe is not JSON-serialisable.
    """
    if not isinstance(gm, fx.GraphModule):
        raise CheckpointError(f"fxgrow.save expects a torch.fx.GraphModule, got {type(gm).__name__}")
    data = recipes.recipe(gm)
    if data["base"] is None:
        raise CheckpointError(
            "this GraphModule has no base model spec, so it could not be rebuilt on load: trace "
            "it with fxgrow.trace(model, ...) (concrete_args, leaf modules and autowrapped "
            "functions given by importable names and plain data) or build it with "
            "fxgrow.models.build(...), or pass base={'source': 'timm', 'name': ..., 'kwargs': {...}}"
        )
    target = Path(path)
    _check_replaceable(target)
    tensors = _tensors_for_file(gm)
    with _fsio.storage_errors(f"saving the model to {target}"):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _fsio.make_temp_dir(target.parent, f".{target.name}.tmp-")
        try:
            _write_model_files(gm, data, tensors, tmp)
            _fsio.fsync_path(tmp)
            _fsio.replace_dir(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_model_files(
    gm: fx.GraphModule, data: dict[str, Any], tensors: dict[str, torch.Tensor], tmp: Path
) -> None:
    # Serialised in memory and written by Python, so a full or read-only disk raises an
    # OSError naming the cause (safetensors' own writer reports a bare iostream error).
    blob = safetensors_bytes(tensors)
    _fsio.atomic_write(tmp / WEIGHTS_FILE, blob)
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fxgrow_version": _fxgrow_version(),
        "torch_version": torch.__version__,
        "base": data["base"],
        "history": data["history"],
        "training": gm.training,
        "weights": {
            "file": WEIGHTS_FILE,
            "bytes": len(blob),
            "sha256": hashlib.sha256(blob).hexdigest(),
            "tensors": {
                key: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
                for key, t in tensors.items()
            },
        },
    }
    try:
        document["checksum"] = _checksum(document)
        text = json.dumps(document, indent=1, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"the recipe of this GraphModule is not JSON: {exc}") from exc
    _fsio.atomic_write(tmp / RECIPE_FILE, text + "\n")


def _check_replaceable(target: Path) -> None:
    """Only an empty directory or one holding exactly a model fxgrow wrote may be replaced:
    a directory that also holds anything else (notes, an ``eval/`` folder) is refused."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise CheckpointError(f"cannot save to {str(target)!r}: it exists and is not a directory")
    if not target.is_dir():
        return
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return
    try:
        document = read_recipe(target)
    except CheckpointError as exc:
        raise CheckpointError(
            f"refusing to replace {str(target)!r}: it is a non-empty directory that is not a "
            f"saved fxgrow model ({exc})"
        ) from exc
    others = [e for e in entries if e not in (RECIPE_FILE, document["weights"]["file"])]
    if others:
        raise CheckpointError(
            f"refusing to replace {str(target)!r}: besides a saved model it holds "
            f"{_preview(others)}, which a save would delete; move them or save elsewhere"
        )


def _tensors_for_file(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The state_dict as standalone, contiguous CPU tensors: each storage written once."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in gm.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        storage = tensor.untyped_storage()
        whole = tensor.storage_offset() == 0 and storage.nbytes() == tensor.numel() * tensor.element_size()
        if tensor.numel() and (storage.data_ptr() in seen or not whole):
            tensor = tensor.clone()
        if tensor.numel():
            seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


# --------------------------------------------------------------------------------------- load


def load(
    path: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    map_location: str | torch.device = "cpu",
) -> fx.GraphModule:
    """Rebuild the model saved at ``path``: build its base, replay its passes, load its weights.

    A base that fxgrow cannot build by name (a module of your own, recorded by its class) is
    given as ``model``: an instance of the same architecture, which is traced the recorded
    way (frontend, concrete arguments, example input shapes). A copy of it is traced, so
    ``model`` keeps its weights. The result carries the saved recipe and training flag, and
    its tensors are on ``map_location``. The files are only read.

    Raises:
        CheckpointError: naming what is wrong: a missing file, invalid JSON, another format or
            an unknown format version, a recipe edited after saving, a weights file whose size
            or sha256 differs from the recipe's (truncated or tampered), an unreadable
            safetensors file, a pass with no replayer, a base that cannot be built (or a user
            module's base loaded without ``model``), a ``model`` of another class than the
            recorded one, or weights that do not fit the rebuilt graph (missing/unexpected keys,
            shape mismatch).
    """
    root = Path(path)
    document = read_recipe(root)
    weights_info = document["weights"]
    weights = root / weights_info["file"]
    _check_weights_file(weights, weights_info)
    saved = _read_weights(weights, weights_info)
    gm = _rebuild(document, model)
    _check_fits(gm, saved)
    targets = _state_tensors(gm)
    with torch.no_grad():
        for key, tensor in saved.items():
            if targets[key].dtype != tensor.dtype:  # the model was cast after it was built
                targets[key].data = targets[key].data.to(tensor.dtype)
    try:
        gm.load_state_dict(saved, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights}: weights do not fit the rebuilt model: {exc}") from exc
    gm.meta[recipes.META_KEY] = {"base": document["base"], "history": document["history"]}
    gm.train(bool(document.get("training", False)))
    return gm.to(map_location)


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The validated ``recipe.json`` of the saved model at ``path`` (nothing else is read)."""
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"no saved model at {str(root)!r}: the directory does not exist")
    if not root.is_dir():
        raise CheckpointError(f"{str(root)!r} is not a saved fxgrow model (expected a directory)")
    recipe_path = root / RECIPE_FILE
    if not recipe_path.is_file():
        raise CheckpointError(f"{str(root)!r}: missing file {RECIPE_FILE}")
    try:
        document = json.loads(recipe_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{recipe_path}: unreadable: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{recipe_path}: not a text file ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{recipe_path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise CheckpointError(f"{recipe_path}: not an fxgrow model recipe (format {found!r})")
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{recipe_path}: unknown format version {version!r} (this fxgrow "
            f"{_fxgrow_version()} reads version {FORMAT_VERSION})"
        )
    missing = [k for k in ("base", "history", "weights", "checksum") if k not in document]
    if missing:
        raise CheckpointError(f"{recipe_path}: missing field(s) {', '.join(missing)}")
    if document["checksum"] != _checksum(document):
        raise CheckpointError(
            f"{recipe_path}: checksum mismatch: the recipe was edited after it was saved"
        )
    _check_recipe_fields(recipe_path, document)
    return document


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_recipe_fields(recipe_path: Path, document: dict[str, Any]) -> None:
    """The types of every field ``load`` uses, and file names confined to the model dir."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{recipe_path}: {what}")

    def count(value: Any) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0

    if document["base"] is not None and not isinstance(document["base"], dict):
        raise bad(f"'base' must be an object, got {type(document['base']).__name__}")
    history = document["history"]
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise bad("'history' must be a list of pass records (objects)")
    if not isinstance(document.get("training", False), bool):
        raise bad("'training' must be true or false")
    weights = document["weights"]
    if not isinstance(weights, dict):
        raise bad(f"'weights' must be an object, got {type(weights).__name__}")
    missing = [k for k in ("file", "bytes", "sha256", "tensors") if k not in weights]
    if missing:
        raise bad(f"'weights' lacks field(s) {', '.join(missing)}")
    name = weights["file"]
    if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name \
            or "\\" in name or name == RECIPE_FILE:
        raise bad(f"weights file {name!r} is not a plain file name inside the model directory")
    if not count(weights["bytes"]):
        raise bad(f"weights 'bytes' must be a non-negative integer, got {weights['bytes']!r}")
    if not isinstance(weights["sha256"], str) or not _SHA256.fullmatch(weights["sha256"]):
        raise bad(f"weights 'sha256' must be 64 hex digits, got {weights['sha256']!r}")
    tensors = weights["tensors"]
    if not isinstance(tensors, dict):
        raise bad(f"weights 'tensors' must be an object, got {type(tensors).__name__}")
    for key, spec in tensors.items():
        if not (isinstance(spec, dict) and isinstance(spec.get("shape"), list)
                and all(count(d) for d in spec["shape"]) and isinstance(spec.get("dtype"), str)):
            raise bad(f"weights entry {key!r} must be {{'shape': [sizes], 'dtype': name}}, "
                      f"got {spec!r}")


def _check_weights_file(weights: Path, info: dict[str, Any]) -> None:
    if weights.is_symlink() or not weights.is_file():
        raise CheckpointError(f"{weights.parent}: missing file {weights.name}")
    size = weights.stat().st_size
    if size != info["bytes"]:
        what = "truncated" if size < info["bytes"] else "has extra bytes"
        raise CheckpointError(
            f"{weights}: {what}: {size} bytes, the recipe records {info['bytes']}"
        )
    digest = _sha256(weights)
    if digest != info["sha256"]:
        raise CheckpointError(
            f"{weights}: sha256 mismatch (file {digest[:16]}..., recipe {info['sha256'][:16]}...): "
            f"the weights were modified or belong to another model"
        )


def _read_weights(weights: Path, info: dict[str, Any]) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(weights), framework="pt") as handle:
            header = {key: handle.get_slice(key) for key in handle.keys()}
            shapes = {key: list(s.get_shape()) for key, s in header.items()}
        tensors = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: not a readable safetensors file: {exc}") from exc
    expected = info["tensors"]
    _raise_on_key_mismatch(weights, "the recipe's key list", expected.keys(), shapes.keys())
    for key, spec in expected.items():
        if shapes[key] != spec["shape"]:
            raise CheckpointError(
                f"{weights}: tensor {key!r} has shape {shapes[key]}, the recipe records {spec['shape']}"
            )
        if _dtype_name(tensors[key].dtype) != spec["dtype"]:
            raise CheckpointError(
                f"{weights}: tensor {key!r} has dtype {_dtype_name(tensors[key].dtype)}, the "
                f"recipe records {spec['dtype']}"
            )
    return tensors


def _rebuild(document: dict[str, Any], model: nn.Module | None) -> fx.GraphModule:
    from .models import build  # the builders import timm; only a load needs them
    from .passes.replay import replay_history

    base = document["base"]
    try:
        gm = build(base) if model is None else _trace_given(base, model)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"cannot rebuild the base model {base!r}: {type(exc).__name__}: {exc}"
        ) from exc
    return replay_history(gm, document["history"])


def _trace_given(base: dict[str, Any], model: nn.Module) -> fx.GraphModule:
    """The base traced from the caller's ``model`` (a copy) as the recipe records."""
    from .tracing import trace_recorded

    if not isinstance(model, nn.Module):
        raise CheckpointError(f"model must be an nn.Module, got {type(model).__name__}")
    recorded = base.get("class") if base.get("source") == "module" else None
    given = f"{type(model).__module__}.{type(model).__qualname__}"
    if recorded is not None and recorded != given:
        raise CheckpointError(f"the saved model's base is a {recorded}, the given model a {given}")
    gm = trace_recorded(copy.deepcopy(model), base.get("trace") or {"method": "symbolic"})
    recipes.set_base(gm, base)
    return gm


def _check_fits(gm: fx.GraphModule, saved: dict[str, torch.Tensor]) -> None:
    model = {key: value.shape for key, value in gm.state_dict().items()}
    _raise_on_key_mismatch("the weights", "the rebuilt model", model.keys(), saved.keys())
    for key, tensor in saved.items():
        if tuple(tensor.shape) != tuple(model[key]):
            raise CheckpointError(
                f"shape mismatch for {key!r}: weights {list(tensor.shape)}, rebuilt model "
                f"{list(model[key])} (the recipe does not describe these weights)"
            )


def _raise_on_key_mismatch(where: Any, reference: str, expected: Any, found: Any) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_preview(unexpected)}")
        raise CheckpointError(f"{where} do not match {reference}: {'; '.join(parts)}")


def _state_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The live tensor behind every state_dict key of ``gm``."""
    tensors: dict[str, torch.Tensor] = dict(gm.named_parameters(remove_duplicate=False))
    tensors.update(gm.named_buffers(remove_duplicate=False))
    return tensors


# ------------------------------------------------------------------------------------ helpers


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)})"


def _checksum(document: dict[str, Any]) -> str:
    body = {k: v for k, v in document.items() if k != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fxgrow_version() -> str:
    from . import __version__

    return __version__
