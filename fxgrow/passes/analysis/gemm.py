"""Float32 GEMMs through oneDNN.

PyTorch's CPU ``matmul`` calls MKL, whose float32 GEMM is much slower than oneDNN's on some
CPUs (AMD Zen) and as fast on others (benchmarks/bench_kernels.py measures both; the
README lists a run). oneDNN's GEMM in its default (strict) math mode is plain float32
arithmetic, so the analysis routes its own products through it: the eigensolver's
(:func:`gemm_nt`) and the linears of its recording copy of the model (:func:`linear`).
Other dtypes and devices, and builds without the op, use ``torch.matmul`` and
``F.linear``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _onednn_linear_op() -> Callable | None:
    # A private op (the one inductor lowers linears to); absent from builds without
    # oneDNN, and checked once here so that a build that lacks it falls back cleanly.
    try:
        op = torch.ops.mkldnn._linear_pointwise
        probe = torch.arange(6.0).reshape(2, 3)
        if not torch.equal(op(probe, probe, None, "none", [], ""), probe @ probe.T):
            return None
        return op
    except (AttributeError, RuntimeError, NotImplementedError):
        return None


_ONEDNN_LINEAR = _onednn_linear_op()


def onednn_applies(a: torch.Tensor) -> bool:
    """Whether :func:`gemm_nt` sends a product with left operand ``a`` to oneDNN."""
    return _ONEDNN_LINEAR is not None and a.device.type == "cpu" and a.dtype == torch.float32


def gemm_nt(
    a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``a @ b.T (+ bias)`` for 2-d ``a`` and ``b``: oneDNN for float32 on the CPU,
    ``torch.matmul`` otherwise."""
    if not onednn_applies(a) or b.dtype != a.dtype:
        out = a @ b.T
        return out if bias is None else out + bias
    # oneDNN reads a weight that is row- or column-major directly; any other stride
    # pattern (a slice of a wider buffer) takes a path thousands of times slower.
    if not (b.is_contiguous() or b.T.is_contiguous()):
        b = b.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    return _ONEDNN_LINEAR(a, b, bias, "none", [], "")


class _ActivationGradLinear(torch.autograd.Function):
    """A linear of 2-d inputs whose backward gives the input's gradient only, both GEMMs
    through :func:`gemm_nt`. The analysis never needs the parameters' gradients. Its output
    is the GEMM's own tensor, never a view made inside the Function: an in-place op after
    it (``nn.ReLU(inplace=True)``) would be refused by autograd."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(weight)
        return gemm_nt(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return gemm_nt(grad, weight.T), None, None


def linear(
    input: torch.Tensor,  # noqa: A002 - F.linear's name, which traced calls may pass
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.linear`` for a graph whose parameters' gradients are never asked for: through
    oneDNN when it applies, with no gradient flowing to ``weight`` or ``bias``."""
    if not onednn_applies(input) or weight.dtype != input.dtype or input.dim() == 0:
        return F.linear(input, weight, bias)
    flat = _ActivationGradLinear.apply(
        input.reshape(-1, input.shape[-1]), weight.detach(),
        None if bias is None else bias.detach(),
    )
    return flat.reshape(*input.shape[:-1], weight.shape[0])  # a view made outside the Function
