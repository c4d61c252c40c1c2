"""Builders that return traced GraphModules carrying a rebuildable JSON spec of their base.

A spec is ``{"source": "timm" | "fxgrow", "name": ..., "kwargs": {...}}`` with an optional
``"fused_attn": bool`` (default: timm's own choice; ``False`` traces the explicit
``softmax(q k^T) v`` path, whose attention probabilities are graph nodes) and an optional
``"trace"`` (how :func:`fxgrow.trace` traced it, recorded there when it was not the plain
symbolic trace). A HuggingFace transformers model (the ``fxgrow[hf]`` extra) is
``{"source": "hf", "class": "BertForSequenceClassification", "config": {...}, "inputs":
{"input_ids": {"shape": [2, 8], "dtype": "int64"}, ...}}``: built from its config class with
random weights and exported (``torch.export``) on zero inputs of those shapes; "inputs" name
the forward's keyword arguments, ``labels`` included for the model's own loss. ``build(spec)`` is
what :func:`fxgrow.load` calls to rebuild a model's base before replaying its history, so a
builder's result records in its recipe exactly the spec that rebuilds it: a reduced model's
base is the full timm model, and the reduction is a pass in its history.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .. import recipes
from ..errors import ModelError
from ..tracing import examples_from_record as trace_examples
from ..tracing import trace, trace_recorded

__all__ = ["BUILDERS", "build", "deit_small_reduced", "tiny_vit", "tiny_vit_reduced"]

_SPEC_KEYS = {"source", "name", "kwargs", "fused_attn", "trace"}
_HF_SPEC_KEYS = {"source", "class", "config", "inputs", "trace"}


def _set_fused_attn(model: nn.Module, fused: bool | None) -> None:
    if fused is None:
        return
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused


def _trace_with_spec(model: nn.Module, spec: dict[str, Any]) -> fx.GraphModule:
    _set_fused_attn(model, spec.get("fused_attn"))
    if "trace" not in spec:
        return trace(model, base=spec)
    gm = trace_recorded(model, spec["trace"])
    recipes.set_base(gm, spec)
    return gm


def _hf(spec: dict[str, Any]) -> fx.GraphModule:
    unknown = set(spec) - _HF_SPEC_KEYS
    if unknown:
        raise ModelError(f"hf model spec has unknown keys {sorted(unknown)}; allowed: "
                         f"{sorted(_HF_SPEC_KEYS)}")
    try:
        import transformers
    except ImportError as exc:
        raise ModelError("HuggingFace models need the transformers package: pip install "
                         "'fxgrow[hf]'") from exc
    name, config = spec.get("class"), spec.get("config", {})
    model_class = getattr(transformers, name, None) if isinstance(name, str) else None
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise ModelError(f"hf model spec class {name!r} is not a transformers model class")
    if not isinstance(config, dict):
        raise ModelError(f"hf model spec config must be a dict, got {config!r}")
    if "trace" not in spec and not isinstance(spec.get("inputs"), dict):
        raise ModelError("hf model spec needs 'inputs': {argument: {'shape': [...], 'dtype': ...}}")
    try:
        model = model_class(model_class.config_class(**config))
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{name} does not accept config {config}: {exc}") from exc
    model.eval()
    if "trace" in spec:
        return _trace_with_spec(model, spec)
    record = {"method": "export", "args": [], "kwargs": spec["inputs"], "concrete_args": {}}
    examples = trace_examples(record)[1]
    return trace(model, examples, method="export", base=spec)


def _timm(spec: dict[str, Any]) -> fx.GraphModule:
    import timm

    name, kwargs = spec["name"], spec["kwargs"]
    if kwargs.get("pretrained"):
        raise ModelError(
            f"model {name!r}: pretrained=True is not supported (fxgrow builds models offline); "
            "load weights into the built model instead"
        )
    if not timm.is_model(name):
        raise ModelError(
            f"unknown model {name!r}: not a timm model name, and not an fxgrow builder "
            f"({', '.join(sorted(BUILDERS))})"
        )
    kwargs = {k: v for k, v in kwargs.items() if k != "pretrained"}
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:
        raise ModelError(f"timm model {name!r} does not accept kwargs {kwargs}: {exc}") from exc
    except (AssertionError, ValueError, RuntimeError, ZeroDivisionError) as exc:
        raise ModelError(f"timm model {name!r} rejects kwargs {kwargs}: "
                         f"{type(exc).__name__}: {exc}") from exc
    return _trace_with_spec(model, spec)


def _bound_kwargs(name: str, fn: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """All arguments of builder ``fn`` (defaults filled in), so a spec does not depend on
    defaults that may change."""
    try:
        bound = inspect.signature(fn).bind(**kwargs)
    except TypeError as exc:
        raise ModelError(f"fxgrow builder {name!r}: {exc}") from exc
    bound.apply_defaults()
    return dict(bound.arguments)


def _normalise(spec_or_name: str | dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    if isinstance(spec_or_name, str):
        name = spec_or_name
        source = "fxgrow" if name in BUILDERS else "timm"
        spec: dict[str, Any] = {"source": source, "name": name, "kwargs": {}}
    elif isinstance(spec_or_name, dict):
        unknown = set(spec_or_name) - _SPEC_KEYS
        if unknown:
            raise ModelError(
                f"model spec has unknown keys {sorted(unknown)}; allowed: {sorted(_SPEC_KEYS)}"
            )
        spec = dict(spec_or_name)
        spec.setdefault("kwargs", {})
        if spec.get("source") not in ("timm", "fxgrow"):
            raise ModelError(
                f"model spec source must be 'timm', 'fxgrow', 'hf' or 'module', got "
                f"{spec.get('source')!r}"
            )
        if not isinstance(spec.get("name"), str):
            raise ModelError(f"model spec name must be a string, got {spec.get('name')!r}")
        if not isinstance(spec["kwargs"], dict):
            raise ModelError(f"model spec kwargs must be a dict, got {spec['kwargs']!r}")
        fused = spec.get("fused_attn")
        if fused is not None and not isinstance(fused, bool):
            raise ModelError(f"model spec fused_attn must be true, false or absent, got {fused!r}")
    else:
        raise ModelError(
            f"build expects a model name or a spec dict, got {type(spec_or_name).__name__}"
        )
    spec["kwargs"] = {**spec["kwargs"], **kwargs}
    return spec


def build(spec_or_name: str | dict[str, Any], **kwargs: Any) -> fx.GraphModule:
    """Build and trace a model from a spec or a name; ``kwargs`` add to the spec's kwargs.

    A name is looked up among fxgrow's builders (:data:`BUILDERS`) first, then timm's models
    (always created with ``pretrained=False``). The result's recipe (:func:`fxgrow.recipe`)
    holds the spec that rebuilds its base. Deterministic given torch's seed.

    Raises:
        ModelError: unknown name or source, malformed spec, or arguments the model rejects.
    """
    if isinstance(spec_or_name, dict) and spec_or_name.get("source") == "hf":
        return _hf(dict(spec_or_name))
    if isinstance(spec_or_name, dict) and spec_or_name.get("source") == "module":
        raise ModelError(
            f"the base is a module of your own ({spec_or_name.get('class')}), which fxgrow "
            f"cannot build by name: pass an instance, fxgrow.load(path, model=...)")
    spec = _normalise(spec_or_name, kwargs)
    if spec["source"] == "timm":
        return _timm(spec)
    if "trace" in spec:
        raise ModelError(f"fxgrow builder {spec['name']!r} traces its model itself; drop 'trace'")
    if spec["name"] not in BUILDERS:
        raise ModelError(
            f"unknown fxgrow builder {spec['name']!r}; available: {', '.join(sorted(BUILDERS))}"
        )
    builder = BUILDERS[spec["name"]]
    arguments = _bound_kwargs(spec["name"], builder, spec["kwargs"])
    if spec.get("fused_attn") is not None:
        if "fused_attn" not in arguments:
            raise ModelError(f"fxgrow builder {spec['name']!r} has no fused_attn option")
        arguments["fused_attn"] = spec["fused_attn"]
    try:
        return builder(**arguments)
    except (AssertionError, ValueError, RuntimeError, TypeError, ZeroDivisionError) as exc:
        raise ModelError(f"fxgrow builder {spec['name']!r} rejects {spec['kwargs']}: "
                         f"{type(exc).__name__}: {exc}") from exc


def tiny_vit(
    num_classes: int = 10,
    img_size: int = 32,
    patch_size: int = 4,
    embed_dim: int = 64,
    depth: int = 4,
    num_heads: int = 4,
    mlp_ratio: float = 4.0,
    qk_norm: bool = False,
    fused_attn: bool = True,
) -> fx.GraphModule:
    """A small timm ``VisionTransformer`` (65 tokens at the defaults) for tests and demos.

    ``fused_attn=False`` traces the explicit softmax attention instead of
    ``scaled_dot_product_attention``."""
    arguments = dict(locals())
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        qk_norm=qk_norm,
    )
    _set_fused_attn(model, fused_attn)
    return trace(model, base={"source": "fxgrow", "name": "tiny_vit", "kwargs": arguments})


def _halved(gm: fx.GraphModule, img_size: int) -> fx.GraphModule:
    # keep="first": the kept rows of a fresh random init are an unbiased sample of it, so the
    # reduced model is itself a fresh init of the narrower architecture (largest-norm rows
    # would skew the initial weight distribution upward).
    from ..passes.reduce import ReduceSpec, reduce

    example = torch.zeros(1, 3, img_size, img_size)
    return reduce(gm, ReduceSpec(head_dim=0.5, mlp_hidden=0.5, keep="first"), example)


def tiny_vit_reduced(
    num_classes: int = 10, img_size: int = 32, fused_attn: bool = True
) -> fx.GraphModule:
    """:func:`tiny_vit` with head dim 16 -> 8 and MLP hidden 256 -> 128, as the paper reduces
    DeiT-S. Its recipe's base is the :func:`tiny_vit` spec; the reduction is in its history."""
    gm = tiny_vit(num_classes=num_classes, img_size=img_size, fused_attn=fused_attn)
    return _halved(gm, img_size)


def deit_small_reduced(
    num_classes: int = 100, img_size: int = 224, fused_attn: bool = True
) -> fx.GraphModule:
    """The paper's base model: DeiT-S with head dim 64 -> 32 and MLP hidden 1536 -> 768
    (11.07M parameters with 100 classes). Its recipe's base is timm's
    ``deit_small_patch16_224``; the reduction is in its history."""
    spec = {
        "source": "timm",
        "name": "deit_small_patch16_224",
        "kwargs": {"num_classes": num_classes, "img_size": img_size},
        "fused_attn": fused_attn,
    }
    return _halved(build(spec), img_size)


BUILDERS: dict[str, Callable[..., fx.GraphModule]] = {
    "tiny_vit": tiny_vit,
    "tiny_vit_reduced": tiny_vit_reduced,
    "deit_small_reduced": deit_small_reduced,
}
