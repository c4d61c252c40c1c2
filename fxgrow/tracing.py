"""``fxgrow.trace``: a model becomes a ``torch.fx.GraphModule`` whose output equals eager."""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
import torch.export
import torch.fx as fx
import torch.nn.functional as F
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
            if isinstance(m, nn.MultiheadAttention) and not isinstance(m, self._leaf_types):
                bound = _inlinable_attention(m, args, kwargs)
                if bound is not None:
                    return _self_attention(m, **bound)
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self._module_paths[-1]
            raise
        finally:
            self._module_paths.pop()


def _inlinable_attention(m: nn.MultiheadAttention, args: tuple, kwargs: dict) -> dict | None:
    """The arguments of an ``nn.MultiheadAttention`` call that :func:`_self_attention` computes
    as the module does (self-attention with the packed projection, no masks), else None."""
    try:
        bound = inspect.signature(nn.MultiheadAttention.forward).bind(m, *args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    a = dict(bound.arguments)
    del a["self"]
    plain = (a["query"] is a["key"] is a["value"] and a["key_padding_mask"] is None
             and a["attn_mask"] is None and a["is_causal"] is False)
    packed = m._qkv_same_embed_dim and m.bias_k is None and not m.add_zero_attn
    if not (plain and packed and isinstance(a["need_weights"], bool)
            and isinstance(a["average_attn_weights"], bool)):
        return None
    return {k: a[k] for k in ("query", "need_weights", "average_attn_weights")}


def _self_attention(m: nn.MultiheadAttention, query: Any, need_weights: bool,
                    average_attn_weights: bool) -> tuple[Any, Any]:
    """``nn.MultiheadAttention`` self-attention spelled out on the module's own parameters, so
    that a symbolic trace sees its projections (``in_proj_weight``, ``out_proj.weight``)."""
    x = query if m.batch_first else query.transpose(0, 1)
    batch, tokens = x.shape[0], x.shape[1]
    qkv = F.linear(x, m.in_proj_weight, m.in_proj_bias)
    q, k, v = qkv.reshape(batch, tokens, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
    p = m.dropout if m.training else 0.0
    weights = None
    if need_weights:
        weights = torch.softmax((q * m.head_dim ** -0.5) @ k.transpose(-2, -1), dim=-1)
        out = F.dropout(weights, p, training=m.training) @ v
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
    out = F.linear(out.transpose(1, 2).reshape(batch, tokens, -1), m.out_proj.weight,
                   m.out_proj.bias)
    return (out if m.batch_first else out.transpose(0, 1)), weights


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


Method = Literal["auto", "symbolic", "export"]
_METHODS = ("auto", "symbolic", "export")


def trace(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    method: Method = "auto",
    concrete_args: dict[str, Any] | None = None,
    leaf_modules: Iterable[type[nn.Module]] = (),
    autowrap_functions: Iterable[Callable] = (),
    base: dict[str, Any] | None = None,
) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule that shares its parameters.

    ``method="symbolic"`` runs ``torch.fx`` symbolic tracing with timm's no-trace registry
    (leaf modules and autowrapped functions) applied, so timm models that register their
    untraceable parts trace as they are. ``method="export"`` runs ``torch.export`` on
    ``example_inputs`` (a tensor, a tuple of tensors, or a dict of keyword tensors) with every
    dimension the model lets vary left dynamic (batch, sequence length), and returns an
    ATen-level graph whose inputs are those tensors (as positional or keyword arguments) and
    whose output is the model's tensor, or the tuple of its output's tensors (a HuggingFace
    ``ModelOutput`` becomes ``(loss, logits, ...)``). ``"auto"`` (the default) tries symbolic
    tracing and falls back to export when it fails and ``example_inputs`` are given.
    ``leaf_modules`` and ``autowrap_functions`` steer symbolic tracing only; ``concrete_args``
    are given to either frontend (export specialises the graph on them).

    The caller's model is not changed. The result's recipe records how to rebuild its base:
    ``base`` if given (builders in :mod:`fxgrow.models` set it), else the model's class; with
    the frontend and, for export, the example inputs' shapes and dtypes, so that
    :func:`fxgrow.load` can trace a given model the same way.

    Raises:
        TraceError: naming the module being traced and the construct that failed (for
            ``"auto"``, both frontends' failures), or an unknown method; or the traced
            graph failing or computing other values than the eager model on
            ``example_inputs`` (a tensor or a tuple), or, when none are given, on an image
            batch of the size the model declares (``patch_embed.img_size`` or timm's
            ``pretrained_cfg``). Given a GraphModule, returns it; with ``base``, a GraphModule
            sharing its modules that carries that base.
    """
    if isinstance(model, fx.GraphModule):
        return model if base is None else _with_base(model, base)
    if not isinstance(model, nn.Module):
        raise TraceError(f"fxgrow.trace expects an nn.Module, got {type(model).__name__}")
    if method not in _METHODS:
        raise TraceError(f"method must be one of {', '.join(map(repr, _METHODS))}, got {method!r}")
    leaf_modules, autowrap_functions = list(leaf_modules), list(autowrap_functions)
    if method == "export":
        gm = _trace_export(model, example_inputs, concrete_args)
    else:
        try:
            gm = _trace_symbolic(model, concrete_args, leaf_modules, autowrap_functions)
        except TraceError as symbolic_failure:
            if method == "symbolic" or example_inputs is None:
                raise
            try:
                gm = _trace_export(model, example_inputs, concrete_args)
            except TraceError as export_failure:
                raise TraceError(f"symbolic tracing failed: {symbolic_failure}\nand "
                                 f"torch.export failed: {export_failure}") from export_failure
    record = gm.meta.pop(_TRACE_KEY, None) or _symbolic_record(
        concrete_args, leaf_modules, autowrap_functions)
    recipes.set_base(gm, _base_spec(model, base, record))
    if not isinstance(example_inputs, Mapping):  # keyword inputs: export checked them itself
        _compare_with_eager(model, gm, example_inputs)
    return gm


_TRACE_KEY = "fxgrow_trace"


def _trace_symbolic(
    model: nn.Module,
    concrete_args: dict[str, Any] | None,
    leaf_modules: list[type[nn.Module]],
    autowrap_functions: list[Callable],
) -> fx.GraphModule:
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
    return gm


def _symbolic_record(
    concrete_args: dict[str, Any] | None,
    leaf_modules: list[type[nn.Module]],
    autowrap_functions: list[Callable],
) -> dict[str, Any] | None:
    """How to repeat a symbolic trace, or None when its arguments are not plain data."""
    record = {
        "method": "symbolic",
        "concrete_args": concrete_args or {},
        "leaf_modules": [_qualname(t) for t in leaf_modules],
        "autowrap_functions": [_qualname(f) for f in autowrap_functions],
    }
    try:
        json.dumps(record)
    except (TypeError, ValueError):
        return None
    return record


def _qualname(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _base_spec(model: nn.Module, base: dict[str, Any] | None,
               record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The base spec: the caller's (plus the frontend when it is not the plain symbolic trace
    builders repeat by default), or the model's class with the frontend."""
    plain = record is not None and record["method"] == "symbolic" and not any(
        record[k] for k in ("concrete_args", "leaf_modules", "autowrap_functions"))
    if base is not None:
        return base if plain or record is None else {**base, "trace": record}
    if record is None:
        return None
    return {"source": "module", "class": _qualname(type(model)), "trace": record}


# -- the export frontend ---------------------------------------------------------------------


def _example_args(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if example_inputs is None:
        raise TraceError("method='export' needs example_inputs (a tensor, a tuple of tensors or "
                         "a dict of keyword tensors)")
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TraceError(f"example_inputs must be a tensor, a tuple of tensors or a dict of keyword "
                     f"tensors, got {type(example_inputs).__name__}")


def _input_spec(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, torch.Tensor):
        raise TraceError(f"example input {where} is a {type(value).__name__}, not a tensor: pass "
                         f"non-tensor arguments as concrete_args")
    return {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}


def examples_from_record(record: Mapping[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Example inputs of the recorded shapes and dtypes (zeros: export reads no values)."""
    def make(spec: Mapping[str, Any]) -> torch.Tensor:
        return torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]))

    return (tuple(make(s) for s in record["args"]),
            {k: make(s) for k, s in record["kwargs"].items()})


def _dynamic_shapes(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``Dim.AUTO`` on every dimension of every tensor input, keyed by argument name: export
    keeps dynamic what the model lets vary (batch, tokens) and specialises the rest (channels,
    an image size fixed by a position table) without an error."""
    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    except TypeError as exc:
        raise TraceError(f"example inputs do not fit {type(model).__name__}.forward: {exc}") from exc
    return {
        name: {d: torch.export.Dim.AUTO for d in range(value.dim())}
        if isinstance(value, torch.Tensor) else None
        for name, value in bound.arguments.items()
    }


def _in_signature_order(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` in the order of ``model.forward``'s parameters: the exported graph takes its
    inputs in the order they are given, and a recorded dict may come back sorted."""
    names = list(inspect.signature(model.forward).parameters)
    return dict(sorted(kwargs.items(), key=lambda kv: names.index(kv[0]) if kv[0] in names
                       else len(names)))


def _trace_export(model: nn.Module, example_inputs: Any,
                  concrete_args: dict[str, Any] | None) -> fx.GraphModule:
    args, kwargs = _example_args(example_inputs)
    kwargs = _in_signature_order(model, kwargs)
    record = {
        "method": "export",
        "args": [_input_spec(a, f"{i}") for i, a in enumerate(args)],
        "kwargs": {k: _input_spec(v, repr(k)) for k, v in kwargs.items()},
        "concrete_args": dict(concrete_args or {}),
    }
    try:
        json.dumps(record)
    except (TypeError, ValueError) as exc:
        raise TraceError(f"concrete_args must be plain data (JSON) to be recorded: {exc}") from exc
    constants = dict(concrete_args or {})
    shapes = _dynamic_shapes(model, args, {**kwargs, **constants})
    with _preserved(model):
        try:
            program = torch.export.export(model, args, {**kwargs, **constants},
                                          dynamic_shapes=shapes, strict=False)
        except Exception as exc:
            raise TraceError(
                f"torch.export of {type(model).__name__} failed: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
        gm = _plain_calling_convention(program.module(), type(model).__name__)
    gm.training = model.training
    gm.meta[_TRACE_KEY] = record
    return gm


def _plain_calling_convention(exported: fx.GraphModule, name: str) -> fx.GraphModule:
    """``exported`` as a plain GraphModule: tensor inputs as arguments, the output's tensors as
    a tensor or a tuple, and no input guard (the graph itself holds the dynamic sizes)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(exported.graph, env)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    for node in [n for n in graph.nodes if n.op == "placeholder" and not n.users]:
        graph.erase_node(node)  # a concrete argument, specialised into the graph
    leaves = list(output) if isinstance(output, (tuple, list)) else [output]
    graph.output(leaves[0] if len(leaves) == 1 else tuple(leaves))
    graph.eliminate_dead_code()
    return fx.GraphModule(exported, graph, class_name=name)


def trace_recorded(model: nn.Module, record: Mapping[str, Any]) -> fx.GraphModule:
    """Trace ``model`` the way ``record`` (a base spec's ``"trace"`` entry) says: the same
    frontend, concrete arguments and example input shapes. Leaf modules and autowrapped
    functions are found by name among the model's own module classes and loaded modules.

    Raises:
        TraceError: a record that names something this process cannot find, or a failed trace.
    """
    method = record.get("method")
    concrete = dict(record.get("concrete_args") or {}) or None
    if method == "export":
        args, kwargs = examples_from_record(record)
        return _trace_export(model, kwargs or args, concrete)
    if method != "symbolic":
        raise TraceError(f"unknown recorded frontend {method!r}")
    classes = {_qualname(type(m)): type(m) for m in model.modules()}
    leaves = []
    for name in record.get("leaf_modules", []):
        if name not in classes:
            raise TraceError(f"recorded leaf module class {name!r} is not a class of the given model")
        leaves.append(classes[name])
    functions = []
    for name in record.get("autowrap_functions", []):
        module_name, _, qual = name.rpartition(".")
        fn = getattr(sys.modules.get(module_name), qual, None)
        if fn is None:
            raise TraceError(f"recorded autowrapped function {name!r} is not loaded: import its "
                             f"module first")
        functions.append(fn)
    return _trace_symbolic(model, concrete, leaves, functions)


def _with_base(gm: fx.GraphModule, base: dict[str, Any]) -> fx.GraphModule:
    result = fx.GraphModule(gm, gm.graph, class_name=type(gm).__name__)
    result.meta.update(copy.deepcopy({k: v for k, v in gm.meta.items()
                                      if k == recipes.META_KEY}))
    result.training = gm.training
    recipes.set_base(result, base)
    return result


def _declared_input(model: nn.Module) -> torch.Tensor | None:
    """One image of the size ``model`` declares, or None when it declares none."""
    size, channels = None, 3
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None) is not None:
        size = patch_embed.img_size
        proj = getattr(patch_embed, "proj", None)
        channels = getattr(proj, "in_channels", channels)
    else:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if isinstance(cfg, dict) and len(cfg.get("input_size") or ()) == 3:
            channels, *size = cfg["input_size"]
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return torch.randn(1, channels, h, w, generator=torch.Generator().manual_seed(0))


def _compare_with_eager(model: nn.Module, gm: fx.GraphModule, example_inputs: Any) -> None:
    given = example_inputs is not None
    inputs = example_inputs if given else _declared_input(model)
    if inputs is None:
        return
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    # In the model's own mode (a graph traced in training mode keeps its dropout active in
    # eval), both runs on the same random stream; buffers a training step updates in place
    # (BatchNorm's running statistics) are put back afterwards.
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with _preserved(model), torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)
            try:
                eager = model(*args)
            except Exception as exc:
                if not given:
                    return  # the declared size was only a guess at an input
                raise TraceError(f"the eager {type(model).__name__} fails on the example "
                                 f"input: {type(exc).__name__}: {exc}") from exc
            torch.manual_seed(0)
            try:
                traced = gm(*args)
            except Exception as exc:
                raise TraceError(
                    f"the traced {type(model).__name__} fails where the eager model runs "
                    f"(something was baked in at trace time?): {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}\n{_HINT}") from exc
    finally:
        for buffer, saved in buffers:
            buffer.copy_(saved)
    eager_leaves, traced_leaves = _tensors(eager), _tensors(traced)
    same = len(eager_leaves) == len(traced_leaves) and all(
        a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True)
        for a, b in zip(eager_leaves, traced_leaves))
    if not same:
        raise TraceError(f"the traced {type(model).__name__} computes other values than the "
                         f"eager model on the example input\n{_HINT}")


def _tensors(value: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_flatten

    return [v.float() for v in tree_flatten(value)[0] if isinstance(v, torch.Tensor)]
