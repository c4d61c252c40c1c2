"""``fxgrow.trace``: a model becomes a ``torch.fx.GraphModule`` whose output equals eager."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch.fx as fx
from torch import nn

from . import recipes
from .errors import TraceError

_HINT = (
    "Hint: make the offending module a leaf (fxgrow.trace(model, leaf_modules=[ItsClass]) or "
    "timm.layers.register_notrace_module), wrap the function with "
    "fxgrow.trace(..., autowrap_functions=[fn]), or pass concrete_args for arguments that "
    "steer control flow."
)


def _timm_notrace() -> tuple[list[type[nn.Module]], list[Callable]]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm is a dependency, but user models must not need it
        return [], []
    return list(get_notrace_modules()), list(get_notrace_functions())


class _Tracer(fx.Tracer):
    """A tracer that honours timm's no-trace registry and remembers where it is, so that a
    failure can name the module being traced."""

    def __init__(self, leaf_types: Iterable[type[nn.Module]], autowrap: Iterable[Callable]):
        super().__init__(autowrap_functions=tuple(f for f in autowrap if callable(f)))
        self._leaf_types = tuple(leaf_types)
        self._module_paths: list[str] = []
        self.failed_in: str | None = None  # the innermost module whose trace raised

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        self._module_paths.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self._module_paths[-1]
            raise
        finally:
            self._module_paths.pop()


def _mutable_state(model: nn.Module) -> list[tuple[nn.Module, dict[str, Any], dict[str, Any]]]:
    """A snapshot of every submodule's plain attributes, with copies of their containers."""
    snapshot = []
    for module in model.modules():
        attrs = dict(module.__dict__)
        contents = {
            key: value.copy()
            for key, value in attrs.items()
            if isinstance(value, (dict, list, set)) and not key.startswith("_")
        }
        snapshot.append((module, attrs, contents))
    return snapshot


def _restore_contents(current: dict | list | set, saved: dict | list | set) -> None:
    # Compared by identity: the values may be tensors, whose == is elementwise.
    if isinstance(current, dict):
        unchanged = current.keys() == saved.keys() and all(current[k] is saved[k] for k in saved)
    else:
        unchanged = len(current) == len(saved) and all(a is b for a, b in zip(current, saved))
    if unchanged:
        return
    current.clear()
    if isinstance(current, list):
        current.extend(saved)
    else:
        current.update(saved)


@contextlib.contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Undo anything tracing writes into the model's plain attributes.

    Some models cache values on first use (timm's LeViT stores an attention-bias tensor in
    ``attention_bias_cache``); during tracing that value is a Proxy, which would break the
    eager model and any later trace."""
    snapshot = _mutable_state(model)
    try:
        yield
    finally:
        for module, attrs, contents in snapshot:
            for key in [k for k in module.__dict__ if k not in attrs]:
                del module.__dict__[key]
            for key, value in attrs.items():
                if module.__dict__.get(key) is not value:
                    module.__dict__[key] = value
            for key, saved in contents.items():
                _restore_contents(module.__dict__[key], saved)


def trace(
    model: nn.Module,
    *,
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Iterable[type[nn.Module]] = (),
    autowrap_functions: Iterable[Callable] = (),
    base: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule that shares its parameters and modules.

    timm's no-trace registry (leaf modules and autowrapped functions) is applied, so timm
    models that register their untraceable parts trace as they are. The caller's model is
    not changed. ``base`` is an optional JSON spec from which the model can be rebuilt
    (used by :func:`fxgrow.save`); builders in :mod:`fxgrow.models` set it.

    Raises:
        TraceError: naming the module being traced and the construct that failed.
    """
    if isinstance(model, fx.GraphModule):
        return model
    if not isinstance(model, nn.Module):
        raise TraceError(f"fxgrow.trace expects an nn.Module, got {type(model).__name__}")
    timm_leaves, timm_functions = _timm_notrace()
    tracer = _Tracer([*timm_leaves, *leaf_modules], [*timm_functions, *autowrap_functions])
    with _preserved(model):
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
        except Exception as exc:
            where = tracer.failed_in or ""
            module = model.get_submodule(where) if where else model
            location = f"module {where!r} ({type(module).__name__})" if where else (
                f"the top-level forward of {type(model).__name__}"
            )
            raise TraceError(
                f"cannot trace {location}: {type(exc).__name__}: {exc}\n{_HINT}"
            ) from exc
        # Built inside the guard: tensor constants the tracer parked on the model
        # (``_tensor_constant0``) are copied into the GraphModule before they are removed.
        gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    gm.training = model.training
    recipes.set_base(gm, base)
    return gm
