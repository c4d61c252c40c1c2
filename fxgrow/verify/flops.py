"""FLOP accounting on fvcore's ``FlopCountAnalysis``, cross-checked against
``torch.utils.flop_counter``.

Convention (fvcore's, and the one behind the paper's figures): one multiply-add is one flop.
What is counted:

- contractions: ``linear``/``addmm``/``mm``/``matmul``/``bmm``/``baddbmm`` (one flop per
  multiply-add of the product; bias additions are free), convolutions, ``einsum``, and
  ``scaled_dot_product_attention``, for which fvcore has no handle. For q ``(..., L, E)``,
  k ``(..., S, E)`` and v ``(..., S, Ev)`` attention costs ``L*S*E`` for ``q k^T`` plus
  ``L*S*Ev`` for the product with v, per batch-and-head element. A causal or masked
  attention is counted in full, as ``torch.utils.flop_counter`` does;
- norms, with fvcore's estimates (5 flops per element of an affine layer norm, ...).

Elementwise arithmetic (``add``, ``mul``, ``index_add``, ...), activations (``gelu``),
``softmax`` and reductions cost zero by convention: they are a fraction of a percent of a
transformer's count (DeiT-S: softmax at one flop per element is 0.06 %), fvcore ignores them
the same way, and the published figures do not include them. They are listed in
:data:`ZERO_COST_OPS` so that :attr:`FlopReport.unsupported` only names operators whose
cost is genuinely unknown.

On a GraphModule, functional operators (the attention product, a functional ``F.linear``)
are attributed to the module whose ``forward`` produced them in the traced code (the node's
``nn_module_stack``), so ``by_module["blocks.0.attn"]`` includes block 0's attention products
even though the GraphModule runs them in its own ``forward``. Nodes a pass added without that
metadata go to the module that owns the parameters they read, else to the root.

Cross-check (:func:`cross_check_flops`): ``torch.utils.flop_counter.FlopCounterMode`` counts
two flops per multiply-add, counts no norms, and counts the CPU fused attention kernel as
zero. :func:`torch_flops` halves its total and registers torch's own ``sdpa_flop_count`` for
that kernel; the comparison is then made on the products only. The two agree exactly on the
timm families of issue 2 with fused and non-fused attention, except that fvcore's
path-optimised ``einsum`` estimate can differ by rounding (MViTv2-T: 16 flops in 4.7G).
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .._ops import LAYER_NORM_FUNCTIONS, PRODUCT_OPERATORS, is_attention, is_matmul
from ..errors import FlopCountError
from ..linears import linear_site

__all__ = [
    "ZERO_COST_OPS",
    "FlopCrossCheck",
    "FlopReport",
    "attention_flops",
    "count_flops",
    "cross_check_flops",
    "node_flops",
    "product_flops",
    "torch_flops",
]

ZERO_COST_OPS: frozenset[str] = frozenset(
    "aten::" + op
    for op in (
        # elementwise arithmetic and comparisons
        "add add_ sub sub_ rsub mul mul_ div div_ neg abs sign pow sqrt rsqrt reciprocal exp "
        "log maximum minimum where ceil sin cos clamp_min clamp_max lt le ne logical_not fill_ "
        "lerp addcmul "
        # activations and normalisers of a single row
        "gelu gelu_ silu silu_ sigmoid sigmoid_ tanh erf hardswish hardsigmoid softplus "
        "leaky_relu softmax log_softmax "
        # reductions, pooling and indexing
        "mean sum amax amin argmax norm linalg_vector_norm frobenius_norm index_add index_add_ "
        "index_put index_put_ "
        "index_select scatter scatter_add masked_scatter repeat repeat_interleave tile cumsum "
        "sort topk pad max_pool2d avg_pool2d avg_pool1d adaptive_avg_pool1d adaptive_max_pool2d "
        # layout and creation
        "clone expand_as view_as reshape_as numpy_T mT mH adjoint as_strided unfold tril triu "
        "flip chunk unflatten movedim swapaxes alias lift_fresh new_ones ones_like empty_like "
        "rand_like randn_like bernoulli_ zero_ dropout_ feature_dropout alpha_dropout linspace "
        "meshgrid _unsafe_view _reshape_alias"
    ).split()
)

def _shape(value: Any) -> list[int]:
    if not value.isCompleteTensor():
        raise FlopCountError(f"count_flops: an operand of {value.node().kind()} has no known shape")
    return list(value.type().sizes())


def product_flops(output: Sequence[int], first: Sequence[int]) -> int:
    """matmul / mm / bmm of output shape ``output`` whose first operand has shape ``first``:
    every output element is a dot product over that operand's last dimension. Correct under
    broadcasting, unlike fvcore's default for matmul, which counts the first operand's
    elements and undercounts a broadcast first operand."""
    return math.prod(output) * first[-1]


def attention_flops(query: Sequence[int], key: Sequence[int], output: Sequence[int]) -> int:
    """``scaled_dot_product_attention`` with q ``(..., L, E)``, k ``(..., S, E)`` and output
    ``(..., L, Ev)``: ``L*S*E`` for ``q k^T`` plus ``L*S*Ev`` for the product with v, per
    batch-and-head element."""
    return math.prod(output[:-2]) * output[-2] * key[-2] * (query[-1] + output[-1])


def _product_flops(inputs: list[Any], outputs: list[Any]) -> int:
    return product_flops(_shape(outputs[0]), _shape(inputs[0]))


def _baddbmm_flops(inputs: list[Any], outputs: list[Any]) -> int:
    return product_flops(_shape(outputs[0]), _shape(inputs[1]))


def _sdpa_flops(inputs: list[Any], outputs: list[Any]) -> int:
    return attention_flops(_shape(inputs[0]), _shape(inputs[1]), _shape(outputs[0]))


def _native_mha_flops(inputs: list[Any], outputs: list[Any]) -> int:
    """``nn.MultiheadAttention``'s fused eval path (batch-first query (B, L, E), key and
    value (B, S, E)): the q, k, v and output projections and the QK^T and AV products, the
    same multiply-adds as the unfused path counts op by op."""
    query, key = _shape(inputs[0]), _shape(inputs[1])
    *batch, length, embed = query
    source = key[-2]
    projections = length * embed * embed * 2 + 2 * source * embed * embed
    return math.prod(batch) * (projections + 2 * length * source * embed)


_HANDLES = {
    "aten::scaled_dot_product_attention": _sdpa_flops,
    "aten::_native_multi_head_attention": _native_mha_flops,
    "aten::matmul": _product_flops,
    "aten::mm": _product_flops,
    "aten::bmm": _product_flops,
    "aten::baddbmm": _baddbmm_flops,
}


@dataclass(frozen=True)
class FlopReport:
    """FLOPs of one forward pass (one multiply-add = one flop).

    ``by_module`` maps every module path ('' for the whole model) to the flops of the
    operators it owns, its descendants included; ``by_operator`` maps operator names
    ('linear', 'scaled_dot_product_attention', ...) to flops; ``unsupported`` maps the
    operators that were run but could not be counted to their number of calls."""

    total: int
    by_module: dict[str, int]
    by_operator: dict[str, int]
    unsupported: dict[str, int] = field(default_factory=dict)

    def module(self, name: str) -> int:
        """Flops of module ``name`` and its descendants (0 for a module that ran nothing)."""
        return self.by_module.get(name, 0)

    def table(self, max_depth: int = 2) -> str:
        """A text table of flops per module down to ``max_depth`` levels of nesting."""
        rows = [("module", "GFLOPs", "share")]
        for name in sorted(self.by_module, key=_module_sort_key):
            depth = 0 if name == "" else name.count(".") + 1
            if depth > max_depth or (name and self.by_module[name] == 0):
                continue
            flops = self.by_module[name]
            share = flops / self.total if self.total else 0.0
            rows.append(("  " * depth + (name or "(total)"), f"{flops / 1e9:.4f}", f"{share:.1%}"))
        width = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [f"{a:<{width[0]}}  {b:>{width[1]}}  {c:>{width[2]}}" for a, b, c in rows]
        lines.insert(1, "-" * len(lines[0]))
        if self.unsupported:
            listed = ", ".join(f"{op} x{n}" for op, n in sorted(self.unsupported.items()))
            lines.append(f"not counted (unknown cost): {listed}")
        return "\n".join(lines)


def _module_sort_key(name: str) -> list[tuple[int, Any]]:
    # numeric path components in numeric order: blocks.2 before blocks.10
    return [(0, int(p)) if p.isdigit() else (1, p) for p in name.split(".")] if name else []


def _as_tuple(inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    if not isinstance(inputs, (torch.Tensor, tuple, list)):
        raise FlopCountError(f"count_flops: inputs must be a tensor or a non-empty tuple of "
                             f"tensors, got {type(inputs).__name__}")
    items = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not items or not all(isinstance(t, torch.Tensor) for t in items):
        raise FlopCountError("count_flops: inputs must be a tensor or a non-empty tuple of tensors")
    return items


def _owner_path(stack_entry: Any) -> str:
    key, value = stack_entry
    return value[0] if isinstance(value, tuple) else key


def _nearest_module(path: str, modules: dict[str, nn.Module]) -> str:
    while path and path not in modules:
        path = path.rpartition(".")[0]
    return path


def _node_owners(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """The module each call_function/call_method node belongs to (see the module docstring)."""
    modules = dict(gm.named_modules())
    owners = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        stack = node.meta.get("nn_module_stack")
        if stack:
            path = _owner_path(list(stack.items())[-1])
        else:
            read = [a.target.rpartition(".")[0] for a in node.all_input_nodes if a.op == "get_attr"]
            path = read[0] if read and all(r == read[0] for r in read) else ""
        owners[node] = _nearest_module(path, modules)
    return owners


class _ScopedInterpreter(fx.Interpreter):
    """Runs a GraphModule node by node, opening the owning module's jit scope around each
    functional node so that fvcore attributes it to that module."""

    def __init__(self, gm: fx.GraphModule, owners: dict[fx.Node, str]):
        super().__init__(gm)
        self._owners = owners

    def run_node(self, n: fx.Node) -> Any:
        owner = self._owners.get(n, "")
        state = torch._C._get_tracing_state()
        if not owner or state is None:
            return super().run_node(n)
        state.push_scope(owner)
        try:
            return super().run_node(n)
        finally:
            state.pop_scope()


class _ScopedRunner(nn.Module):
    """A view of a GraphModule with the same children and parameters (shared, not copied)
    whose forward runs the graph through :class:`_ScopedInterpreter`."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        for name, child in gm.named_children():
            self.add_module(name, child)
        for name, param in gm.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in gm.named_buffers(recurse=False):
            self.register_buffer(name, buf)
        object.__setattr__(self, "_interpreter", _ScopedInterpreter(gm, _node_owners(gm)))

    def forward(self, *args: torch.Tensor) -> Any:
        return self._interpreter.run(*args)


@contextlib.contextmanager
def _quiet_and_hook_safe(model: nn.Module) -> Iterator[None]:
    """Silence fvcore and jit tracing, and remove any forward hook fvcore leaves behind when
    the traced forward raises (it registers hooks on every module and removes them only
    after a successful trace)."""
    modules = list(model.modules())
    before = [(set(m._forward_pre_hooks), set(m._forward_hooks)) for m in modules]
    logger = logging.getLogger("fvcore")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
        for module, (pre, post) in zip(modules, before):
            for key in set(module._forward_pre_hooks) - pre:
                del module._forward_pre_hooks[key]
            for key in set(module._forward_hooks) - post:
                del module._forward_hooks[key]


def count_flops(model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor]) -> FlopReport:
    """Count the flops of ``model(*inputs)`` with fvcore (one multiply-add = one flop).

    ``model`` is usually a GraphModule (traced, reduced or grown); a plain module works too,
    with fvcore's own attribution (operators to the module whose ``__call__`` ran them).
    The model runs once under ``torch.no_grad()`` in its current train/eval mode; nothing in it
    is changed.

    Raises:
        FlopCountError: if the inputs are not tensors or the model fails to run on them.
    """
    args = _as_tuple(inputs)
    target = _ScopedRunner(model) if isinstance(model, fx.GraphModule) else model
    with _quiet_and_hook_safe(model), torch.no_grad():
        from fvcore.nn import FlopCountAnalysis  # its import warns about torch.jit.script

        analysis = FlopCountAnalysis(target, args)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        analysis.set_op_handle(**_HANDLES, **dict.fromkeys(ZERO_COST_OPS))  # None: ignore
        try:
            by_module = analysis.by_module()
        except FlopCountError:
            raise
        except Exception as exc:
            shapes = ", ".join(str(tuple(a.shape)) for a in args)
            raise FlopCountError(
                f"count_flops: running {type(model).__name__} on inputs of shape {shapes} "
                f"failed: {type(exc).__name__}: {exc}"
            ) from exc
        by_operator = analysis.by_operator()
        unsupported = analysis.unsupported_ops()
    return FlopReport(
        total=int(analysis.total()),
        by_module={name: int(v) for name, v in by_module.items()},
        by_operator={op: int(v) for op, v in by_operator.items()},
        unsupported=dict(unsupported),
    )


def node_flops(gm: fx.GraphModule, node: fx.Node, args: Any, kwargs: Any, output: Any) -> int:
    """Flops of one node of ``gm`` on :func:`count_flops`'s convention, from the shapes of its
    positional and keyword arguments (``args``, ``kwargs``: a shape where the argument is a
    tensor) and of its ``output``: linears, convolutions, matrix products, attention and layer
    norms (5 flops per element, 4 without affine); every other node costs 0. Summed over a
    graph's nodes it gives ``count_flops(gm, inputs).total`` for the graphs fxgrow builds;
    ``fxgrow.summary`` tabulates it per node."""
    if not isinstance(output, tuple) or not all(isinstance(d, int) for d in output):
        return 0
    numel = math.prod(output)
    site = linear_site(gm, node) if node.op in ("call_module", "call_function") else None
    if site is not None:
        return numel * site.in_features
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.modules.conv._ConvNd):
            return numel * (module.in_channels // module.groups) * math.prod(module.kernel_size)
        if isinstance(module, nn.LayerNorm):
            return numel * (5 if module.elementwise_affine else 4)
        return 0
    if is_matmul(node):
        first = args[0] if args else None
        return product_flops(output, first) if first and len(args) >= 2 and args[1] else 0
    if node.op == "call_function" and node.target in LAYER_NORM_FUNCTIONS:
        weight = args[2] if len(args) > 2 else kwargs.get("weight")
        return numel * (5 if weight is not None else 4)
    if is_attention(node):
        query = args[0] if args else kwargs.get("query")
        key = args[1] if len(args) > 1 else kwargs.get("key")
        value = args[2] if len(args) > 2 else kwargs.get("value")
        return attention_flops(query, key, output) if query and key and value else 0
    return 0


def _cpu_fused_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    def as_4d(shape: Sequence[int]) -> tuple[int, ...]:
        # sdpa_flop_count wants (batch, heads, length, dim); any leading dims are batch
        return tuple(shape) if len(shape) == 4 else (math.prod(shape[:-2]), 1, *shape[-2:])

    return sdpa_flop_count(as_4d(query_shape), as_4d(key_shape), as_4d(value_shape))


def _native_mha_torch_flops(query_shape, key_shape, *args, **kwargs) -> int:
    """FlopCounterMode's convention (2 per multiply-add) for the fused MHA kernel, which it
    otherwise counts as zero."""
    *batch, length, embed = query_shape
    source = key_shape[-2]
    per_batch = 2 * length * embed * embed + 2 * source * embed * embed + 2 * length * source * embed
    return 2 * math.prod(batch) * per_batch


def torch_flops(model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor]) -> int:
    """Multiply-adds of ``model(*inputs)`` per ``torch.utils.flop_counter.FlopCounterMode``.

    FlopCounterMode counts two flops per multiply-add (the result is halved here) and has no
    formula for the CPU fused attention kernel (``_scaled_dot_product_flash_attention_for_cpu``,
    counted as zero); torch's own ``sdpa_flop_count`` is registered for it, so fused and
    non-fused attention count the same. Norms and elementwise operators are not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    args = _as_tuple(inputs)
    fused_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    counter = FlopCounterMode(display=False, custom_mapping={
        fused_cpu: _cpu_fused_attention_flops,
        torch.ops.aten._native_multi_head_attention: _native_mha_torch_flops,
    })
    with counter, torch.no_grad():
        model(*args)
    total = counter.get_total_flops()
    if total % 2:
        raise FlopCountError(f"torch_flops: FlopCounterMode reported an odd count {total}")
    return total // 2


@dataclass(frozen=True)
class FlopCrossCheck:
    """fvcore's contraction flops next to torch.utils.flop_counter's, in multiply-adds.

    ``fvcore`` is :func:`count_flops` restricted to products (linear, matmul, convolution,
    einsum, attention): the operators both counters know. What only fvcore counts (norm
    estimates, pooling) is in ``fvcore_other`` and excluded from the comparison; ``report`` is
    the full :func:`count_flops` report."""

    fvcore: int
    torch: int
    fvcore_other: int
    report: FlopReport = field(repr=False, compare=False)

    @property
    def agree(self) -> bool:
        """Whether the two counts are equal."""
        return self.fvcore == self.torch


def cross_check_flops(
    model: nn.Module, inputs: torch.Tensor | Sequence[torch.Tensor], *, strict: bool = True
) -> FlopCrossCheck:
    """Count ``model(*inputs)`` with both fvcore (:func:`count_flops`) and
    ``torch.utils.flop_counter`` (:func:`torch_flops`) on the same convention.

    Raises:
        FlopCountError: with ``strict`` (the default), when the two counts differ; the
            message gives both and fvcore's count per operator. ``strict=False`` returns the
            disagreeing check instead (``agree`` is False).
    """
    report = count_flops(model, inputs)
    products = {op: v for op, v in report.by_operator.items() if op in PRODUCT_OPERATORS}
    check = FlopCrossCheck(
        fvcore=sum(products.values()),
        torch=torch_flops(model, inputs),
        fvcore_other=report.total - sum(products.values()),
        report=report,
    )
    if strict and not check.agree:
        raise FlopCountError(
            f"cross_check_flops: fvcore counts {check.fvcore:,} multiply-adds of products, "
            f"torch.utils.flop_counter {check.torch:,} (fvcore by operator: {products}); one "
            f"of them misses an operator of this model"
        )
    return check
