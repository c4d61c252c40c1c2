"""What fxgrow knows about the operations in a graph, written once.

Every pass, the analysis, the inspection and the FLOP counter ask this module what a node
does: whether it is an activation, an attention product, a matmul, a functional linear, a
shape op. A node's ``target`` is matched against the callables (``call_function``), method
names (``call_method``) and module classes (``call_module``) below. The module imports
nothing from fxgrow, so ``linears``, ``passes``, ``verify`` and ``inspection`` can all use it.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn


def _aten_overloads(*names: str) -> frozenset[Any]:
    """Every overload of the named ATen ops (``torch.ops.aten.view.default``, ...) in this torch
    build. An exported graph (``torch.export``) calls these where a symbolic trace calls the
    torch function or method; the ones listed in each table below take their arguments in the
    same order as the torch function of that table (``aten.view.default(x, [B, N, H, D])`` as
    ``torch.reshape(x, shape)``), so one handler serves both."""
    found = set()
    for name in names:
        packet = getattr(torch.ops.aten, name, None)
        for overload in packet.overloads() if packet is not None else ():
            found.add(getattr(packet, overload))
    return frozenset(found)


def op_name(target: Any) -> str | None:
    """The base name of a call target: ``"view"`` for ``aten.view.default``, a function's
    ``__name__`` otherwise."""
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    return getattr(target, "__name__", None)


# -- linears -----------------------------------------------------------------------------------

_aten = torch.ops.aten
FUNCTIONAL_LINEARS = (F.linear, torch._C._nn.linear, _aten.linear.default)
# aten.addmm(bias, x, w) and aten.mm(x, w) compute x w, a linear whose weight is w^T (GPT-2's
# Conv1D stores it so): the position of x in their arguments.
MATMUL_LINEARS = {_aten.addmm.default: 1, _aten.mm.default: 0}
WEIGHT_TRANSPOSES = (_aten.t.default, _aten.transpose.int, _aten.permute.default,
                     _aten.numpy_T.default)

# -- elementwise activations -------------------------------------------------------------------

ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.GELU, nn.ReLU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.ELU, nn.LeakyReLU,
    nn.Sigmoid, nn.Tanh, nn.ReLU6, nn.SELU, nn.Softplus, nn.PReLU,
)
try:  # timm's own activation modules (GELU, GELUTanh, QuickGELU, ...) are elementwise too
    from timm.layers import activations as _timm_act

    ACTIVATION_MODULES += tuple(
        getattr(_timm_act, name)
        for name in ("GELU", "GELUTanh", "QuickGELU", "Swish", "Mish", "Sigmoid", "Tanh")
        if hasattr(_timm_act, name)
    )
except ImportError:  # pragma: no cover - timm is a dependency
    pass
ACTIVATION_FUNCTIONS = frozenset({
    F.gelu, F.relu, F.silu, F.hardswish, F.hardsigmoid, F.mish, F.elu, F.leaky_relu, F.sigmoid,
    F.tanh, F.relu6, F.selu, F.softplus, torch.sigmoid, torch.tanh, torch.relu,
}) | _aten_overloads("gelu", "relu", "silu", "hardswish", "hardsigmoid", "mish", "elu",
                     "leaky_relu", "sigmoid", "tanh", "relu6", "selu", "softplus")
ACTIVATION_METHODS = frozenset({"gelu", "relu", "sigmoid", "silu", "tanh"})

# -- products ----------------------------------------------------------------------------------

ATTENTION_FUNCTIONS = frozenset({
    F.scaled_dot_product_attention,
    torch._C._nn.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
})
MATMUL_FUNCTIONS = frozenset({operator.matmul, torch.matmul, torch.bmm, torch.mm}) | \
    _aten_overloads("matmul", "bmm")
MATMUL_METHODS = frozenset({"matmul", "bmm", "mm"})
EINSUM_FUNCTIONS = frozenset({torch.einsum}) | _aten_overloads("einsum")
# The operators whose cost is a product, by their TorchScript names without ``aten::``
# (as fvcore reports them): the ones fvcore and torch.utils.flop_counter both count.
PRODUCT_OPERATORS = frozenset({
    "linear", "addmm", "mm", "matmul", "bmm", "baddbmm", "conv", "einsum",
    "scaled_dot_product_attention", "_native_multi_head_attention",
})

# -- ops that carry channels through unchanged or rearranged -----------------------------------

SHAPE_METHODS = frozenset({
    "reshape", "view", "permute", "transpose", "flatten", "unflatten", "unbind", "split",
    "chunk", "tensor_split", "squeeze", "unsqueeze", "expand", "expand_as", "reshape_as",
    "view_as", "t", "movedim", "narrow", "select", "repeat", "flip", "roll", "__getitem__",
})
SHAPE_FUNCTIONS = frozenset({
    torch.reshape, torch.permute, torch.transpose, torch.flatten, torch.unflatten, torch.unbind,
    torch.split, torch.chunk, torch.tensor_split, torch.squeeze, torch.unsqueeze, torch.movedim,
    torch.narrow, torch.select, torch.flip, torch.roll, torch.t, operator.getitem,
}) | _aten_overloads(
    "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "flatten", "unflatten",
    "unbind", "split", "split_with_sizes", "chunk", "tensor_split", "squeeze", "unsqueeze",
    "expand", "movedim", "narrow", "select", "slice", "repeat", "flip", "roll",
)
# ATen views of the tables' shape ops: run as reshape on label tensors, which are broadcast
ATEN_VIEWS = _aten_overloads("view", "_unsafe_view")
# aten.split takes one size; a list of sizes is split_with_sizes
ATEN_SPLITS = _aten_overloads("split")
# reading a size is not reading data (``positions = arange(seq_len)``)
SIZE_FUNCTIONS = _aten_overloads("sym_size", "sym_numel")
IDENTITY_METHODS = frozenset({
    "contiguous", "clone", "detach", "float", "half", "bfloat16", "double", "to", "type",
    "type_as", "requires_grad_", "cpu", "cuda",
})
IDENTITY_FUNCTIONS = _aten_overloads("contiguous", "clone", "detach", "alias", "lift_fresh_copy",
                                     "_to_copy", "to", "type_as")
STACKS = frozenset({torch.stack}) | _aten_overloads("stack")
CONCATENATIONS = frozenset({torch.cat, torch.concat}) | STACKS | _aten_overloads("cat", "concat")
CHANNEL_LOCAL_MODULES: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Identity, nn.Softmax, nn.Dropout1d, nn.Dropout2d,
)

# -- ops that combine values position by position, or reduce over dims ------------------------

ELEMENTWISE_FUNCTIONS = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd,
    operator.imul, torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.exp, torch.sqrt,
    torch.rsqrt, torch.abs, torch.erf, torch.clamp, torch.pow, torch.softmax, F.softmax,
    F.log_softmax, F.dropout, F.normalize, torch.square,
}) | _aten_overloads(
    "add", "sub", "rsub", "mul", "div", "neg", "exp", "sqrt", "rsqrt", "abs", "erf", "clamp",
    "pow", "softmax", "_softmax", "log_softmax", "dropout", "square", "masked_fill", "reciprocal",
    "where",
)
MULTIPLICATIONS = frozenset({operator.mul, torch.mul}) | _aten_overloads("mul")
DIVISIONS = frozenset({operator.truediv, torch.div}) | _aten_overloads("div")
ELEMENTWISE_METHODS = frozenset({
    "add", "sub", "mul", "div", "neg", "exp", "sqrt", "rsqrt", "abs", "erf", "clamp", "pow",
    "softmax", "log_softmax", "masked_fill", "square", "__add__", "__mul__", "__sub__",
    "__truediv__", "__radd__", "__rmul__",
})
REDUCTION_METHODS = frozenset({"sum", "mean", "amax", "norm", "var", "std", "logsumexp"})
REDUCTION_FUNCTIONS = frozenset({
    torch.sum, torch.mean, torch.amax, torch.norm, torch.var, torch.std, torch.logsumexp,
}) | _aten_overloads("sum", "mean", "amax", "norm", "var", "std", "logsumexp")

# -- norms -------------------------------------------------------------------------------------

LAYER_NORM_FUNCTIONS = frozenset({F.layer_norm, torch.layer_norm}) | _aten_overloads("layer_norm")


# -- predicates on nodes -----------------------------------------------------------------------


def is_attention(node: fx.Node) -> bool:
    """A ``scaled_dot_product_attention`` call (functional, torch._C or aten)."""
    return node.op == "call_function" and node.target in ATTENTION_FUNCTIONS


def is_einsum(node: fx.Node) -> bool:
    """An ``einsum`` call (torch or aten)."""
    return node.op == "call_function" and node.target in EINSUM_FUNCTIONS


def is_matmul(node: fx.Node) -> bool:
    """A matrix product of two tensors: ``a @ b``, ``torch.matmul``/``bmm``/``mm`` or the method."""
    return ((node.op == "call_function" and node.target in MATMUL_FUNCTIONS)
            or (node.op == "call_method" and node.target in MATMUL_METHODS))


def is_activation(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An elementwise activation: a module, function or method of the tables above."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), ACTIVATION_MODULES)
    if node.op == "call_function":
        return node.target in ACTIVATION_FUNCTIONS
    return node.op == "call_method" and node.target in ACTIVATION_METHODS


def get_attr_value(gm: nn.Module, target: str) -> Any:
    """The value a ``get_attr`` node with ``target`` reads (a parameter, buffer, constant
    tensor or module), resolved the way torch.fx resolves it when the graph runs."""
    return fx.graph_module._get_attr(gm, target)
