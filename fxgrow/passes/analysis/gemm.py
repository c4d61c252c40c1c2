"""Float32 GEMMs through oneDNN where that is plain float32 arithmetic and faster.

PyTorch's CPU ``matmul`` calls MKL, whose float32 GEMM is much slower than oneDNN's on some
CPUs (AMD Zen) and as fast on others (Intel). The analysis routes its own products through
:func:`gemm_nt` (the eigensolver's) and :func:`linear` (the linears of its recording copy),
which take oneDNN only where a probe at first use (:func:`gemm_path`) found its float32
GEMM as accurate as float32 arithmetic allows and clearly faster than ``torch.matmul``;
everywhere else, and for other dtypes and devices, they are ``torch.matmul`` and
``F.linear``. The choice is made once per process; both paths are float32, so the results of
the two differ at rounding level only (docs/lanczos.md, "Precision").
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Accept a kernel whose worst error on the probe, relative to ||a_i|| ||b_j||, is within this
# many times sqrt(K) float32 roundings: float32 arithmetic stays about 8x below that on
# random data (its error grows like sqrt(K) u), arithmetic on inputs rounded to tf32 or
# bf16 is 7x and 50x above it.
_ROUNDINGS = 8.0
# oneDNN must be at least this much faster than matmul to be worth the other path's costs
# (a kernel built per new shape, the eigensolver's padding of its widths to few shapes).
_FASTER = 1.2
_TIMING_REPEATS = 5
_PROBE_SHAPE = (1024, 384, 512)  # (rows, K, columns): the scale of one layer's products


@dataclass(frozen=True)
class GemmPath:
    """The float32 GEMM the analysis uses on this CPU and why (see :func:`gemm_path`).

    The errors are the largest ``|c_ij - (a b^T)_ij| / (||a_i|| ||b_j||)`` on the probe
    against a float64 product; ``speedup`` is matmul's best time over oneDNN's (None when
    oneDNN was not timed)."""

    kernel: str  # "onednn" or "matmul"
    reason: str
    matmul_error: float
    onednn_error: float | None
    speedup: float | None

    def describe(self) -> str:
        """One line for logs and benchmark tables."""
        errors = f"float32 GEMM error: matmul {self.matmul_error:.1e}"
        if self.onednn_error is not None:
            errors += f", oneDNN {self.onednn_error:.1e}"
        return f"{self.kernel} ({self.reason}; {errors})"


def onednn_op() -> Callable | None:
    """oneDNN's linear op when this build has it (whether or not the analysis uses it)."""
    # A private op (the one inductor lowers linears to); absent from builds without oneDNN.
    try:
        return torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None


def probe_gemm(op: Callable | None) -> GemmPath:
    """Decide between ``op`` (called as oneDNN's ``_linear_pointwise``) and ``torch.matmul``
    for float32 GEMMs: ``op`` is taken only if its error on a random problem is that of
    float32 arithmetic and it runs at least ``_FASTER`` times as fast as matmul."""
    rows, k, cols = _PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, k, generator=generator)
    b = torch.randn(cols, k, generator=generator)
    reference = a.double() @ b.double().T
    bound = a.double().norm(dim=1)[:, None] * b.double().norm(dim=1)
    limit = _ROUNDINGS * math.sqrt(k) * torch.finfo(torch.float32).eps / 2

    def error(c: torch.Tensor) -> float:
        return float(((c.double() - reference).abs() / bound).max())

    matmul_error = error(a @ b.T)
    if op is None:
        return GemmPath("matmul", "this build has no oneDNN linear", matmul_error, None, None)
    try:
        # Both weight layouts the analysis passes: row-major and column-major.
        outputs = [op(a, w, None, "none", [], "") for w in (b, b.T.contiguous().T)]
    except (RuntimeError, NotImplementedError) as failure:
        return GemmPath("matmul", f"oneDNN's linear failed: {failure}", matmul_error, None, None)
    onednn_error = max(error(c) for c in outputs)
    if onednn_error > limit:
        return GemmPath("matmul", f"oneDNN is not float32-accurate here (limit {limit:.1e})",
                        matmul_error, onednn_error, None)
    speedup = _speedup(lambda: op(a, b, None, "none", [], ""), lambda: a @ b.T)
    if speedup < _FASTER:
        return GemmPath("matmul", f"oneDNN is {speedup:.2f}x matmul's speed, under {_FASTER}x",
                        matmul_error, onednn_error, speedup)
    return GemmPath("onednn", f"float32-accurate and {speedup:.2f}x matmul's speed",
                    matmul_error, onednn_error, speedup)


def _speedup(onednn: Callable[[], object], matmul: Callable[[], object]) -> float:
    """matmul's time over oneDNN's, each the best of interleaved repeats: other jobs on the
    machine only ever add time, so the minima are the least disturbed figures."""
    onednn()  # oneDNN builds a kernel on a shape's first call
    matmul()
    best = [math.inf, math.inf]
    for _ in range(_TIMING_REPEATS):
        for i, fn in enumerate((onednn, matmul)):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best[1] / best[0]


@functools.cache
def _choice() -> tuple[GemmPath, Callable | None]:
    op = onednn_op()
    path = probe_gemm(op)
    return path, op if path.kernel == "onednn" else None


def gemm_path() -> GemmPath:
    """The float32 GEMM path of this process, probed at its first use: which kernel, why,
    and the float32 error of each kernel on the probe."""
    return _choice()[0]


def onednn_applies(a: torch.Tensor) -> bool:
    """Whether :func:`gemm_nt` sends a product with left operand ``a`` to oneDNN."""
    return a.device.type == "cpu" and a.dtype == torch.float32 and _choice()[1] is not None


def gemm_nt(
    a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``a @ b.T (+ bias)`` for 2-d ``a`` and ``b``: oneDNN for float32 on the CPU where
    :func:`gemm_path` chose it, ``torch.matmul`` otherwise."""
    if not onednn_applies(a) or b.dtype != a.dtype:
        out = a @ b.T
        return out if bias is None else out + bias
    # oneDNN reads a weight that is row- or column-major directly; any other stride
    # pattern (a slice of a wider buffer) takes a path thousands of times slower.
    if not (b.is_contiguous() or b.T.is_contiguous()):
        b = b.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    return _choice()[1](a, b, bias, "none", [], "")


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
