"""The splitting analysis (docs/splitting.md; paper sections 3.2 and 5.5).

``analyze`` streams batches through a recording copy of a GraphModule and returns, for
every target linear, the smallest eigenvalue of each neuron's splitting matrix. Precise
definitions, for neuron j of a linear ``o = W x + b`` applied at tokens t (every position of
every sample, over all the places the linear is called), with ``x~ = [x; 1]`` (the 1 only
when the linear has a bias) and B batches whose loss ``L_b = loss_fn(gm(inputs_b),
labels_b)`` is whatever the loss function returns (usually a mean over the batch):

- operator form (default): ``S_j = GeLU''(0) / B * sum_b sum_t g_{b,t,j} x~_t x~_t^T`` with
  ``g = dL_b / do`` and ``GeLU''(0) = sqrt(2 / pi)``. It is the Hessian at v = 0 of
  ``f(v) = 1/B sum_b sum_t g_{b,t,j} GeLU(v . x~_t)`` with g held fixed, i.e. the
  non-Gauss-Newton part of the loss's second derivative when a new pseudo-layer
  ``GeLU(v . x~)`` is added to neuron j (fxgrow's growth operator, whose pair acts through
  its summed weights v). Defined for every linear neuron.
- activation form (Wu et al. 2019): for a linear whose output feeds only an elementwise
  activation sigma, ``S_j = 1 / B * sum_b sum_t (dL_b / dsigma_{b,t,j}) sigma''(o_{b,t,j})
  x~_t x~_t^T``, the Hessian at v = 0 of ``1/B sum_b sum_t (dL_b/dsigma) sigma((w_j + v) .
  x~_t)`` with dL/dsigma held fixed.

The model runs in eval mode during the analysis (no dropout, norm statistics frozen; the
modules' training flags are restored afterwards) and the caller's GraphModule, its
parameters and their ``.grad`` are left as they were: gradients are taken with
``torch.autograd.grad`` with respect to the recorded outputs only. In the recording copy,
plain linears (``nn.Linear`` modules and ``F.linear`` calls) run through oneDNN's float32
GEMM where it applies (:mod:`.gemm`: the same arithmetic, faster on some CPUs) and give no
parameter gradients, which the analysis never asks for.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.fx as fx

from ...errors import AnalysisError
from ...linears import LinearSite
from .eigen import EigenResult, exact_smallest
from .recording import collect
from .report import SplittingReport
from .solve import Problem, solve_fast
from .statistics import ExactSums, Reservoir
from .targets import default_targets, resolve_targets

__all__ = ["analyze", "default_targets", "GELU_CURVATURE", "splitting_matrices", "SplittingReport"]

GELU_CURVATURE = math.sqrt(2.0 / math.pi)  # GeLU''(0) = 2 * phi(0)


def analyze(
    gm: fx.GraphModule,
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    targets: Iterable[str] | None = None,
    form: Literal["operator", "activation"] = "operator",
    method: Literal["fast", "exact"] = "fast",
    reservoir_tokens: int = 4096,
    device: torch.device | str | None = None,
    eigenvectors: bool = False,
    progress: bool = True,
    seed: int = 0,
    tol: float = 3e-2,
    max_iter: int = 40,
) -> SplittingReport:
    """Smallest eigenvalue of every neuron's splitting matrix, for each target linear.

    ``batches`` yields ``(inputs, labels)`` pairs (``inputs`` a tensor or a tuple of them);
    the loss of a batch is ``loss_fn(gm(*inputs), labels)``, a scalar. The matrices are
    defined in this module's docstring: S_j = c / B * sum over batches and tokens of
    h_{t,j} x~_t x~_t^T (c = GeLU''(0) and h = dL/do for the operator form, c = 1 and
    h = dL/dsigma * sigma''(o) for the activation form).

    ``targets`` defaults to :func:`default_targets` (every linear but classifier heads).
    ``method="exact"`` accumulates every S_j in float64 (memory J (d+1)(d+2)/2 * 8 bytes per
    target, all targets at once) and calls a dense eigensolver; ``"fast"`` keeps a uniform
    reservoir of at most ``reservoir_tokens`` tokens per target (exactly the data when all
    tokens fit; otherwise S_j is estimated from the sample, scaled by tokens / kept) and runs
    batched Lanczos (:func:`.eigen.lanczos_smallest`: residual at most ``tol`` times the
    eigenvalue, at most ``max_iter`` steps, started from :func:`.eigen.splitting_first_step`)
    on the implicit product. ``device``: where statistics and eigensolvers live (default:
    the device of the model's parameters).

    The defaults (``tol`` 3e-2, ``max_iter`` 40) are enough for ranking: the eigenvalue
    error is about residual^2 / gap (see docs/lanczos.md; the README lists the errors
    benchmarks/bench_analyze.py measures against a dense float64 solve). Neurons at the edge
    of a dense spectrum converge slowly; one still unconverged after ``max_iter`` steps
    keeps its Ritz value, an upper bound, and is counted in ``report.nonconverged``.

    Size the reservoir to hold every token when the ranking matters: S_j is a small mean of
    large terms of both signs, so a subsample estimates it poorly (benchmarks/bench_analyze.py
    measures the eigenvalue errors and plan overlap of a smaller reservoir).

    Raises:
        AnalysisError: no batches; a batch whose loss is not a finite scalar (named by its
            index); targets that are not linears of the graph; the activation form for a
            target with no elementwise activation; unknown form or method.
    """
    _check_arguments(gm, form, method, reservoir_tokens)
    chosen = resolve_targets(gm, targets, form)
    device = torch.device(device) if device is not None else _model_device(gm)
    accumulators = {
        t: _accumulator(gm, sites[0], method, reservoir_tokens, device,
                        seed=(seed, target_seed(seed, t)))
        for t, sites in chosen.items()
    }
    started = time.perf_counter()
    n_batches = collect(gm, batches, loss_fn, chosen, form, accumulators, progress)
    recorded = time.perf_counter()
    constant = _curvature(form)
    results = _solve(gm, chosen, accumulators, constant / n_batches, seed=seed, tol=tol,
                     max_iter=max_iter, eigenvectors=eigenvectors, device=device)
    seconds = {"record": recorded - started, "solve": time.perf_counter() - recorded}
    settings = {
        "form": form, "method": method, "reservoir_tokens": reservoir_tokens,
        "batches": n_batches, "seed": seed, "tol": tol, "max_iter": max_iter,
        "constant": constant,
    }
    return SplittingReport(
        eigenvalues={t: results[t].values.cpu() for t in chosen},
        fan_in={t: ss[0].in_features for t, ss in chosen.items()},
        bias={t: ss[0].has_bias(gm) for t, ss in chosen.items()},
        tokens={t: acc.tokens for t, acc in accumulators.items()},
        reservoir={t: acc.tokens if isinstance(acc, ExactSums) else acc.filled
                   for t, acc in accumulators.items()},
        nonconverged={t: results[t].nonconverged for t in chosen},
        settings=settings,
        eigenvectors={t: results[t].vectors.cpu() for t in chosen} if eigenvectors else None,
        seconds=seconds,
    )


def splitting_matrices(
    gm: fx.GraphModule,
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    targets: Iterable[str] | None = None,
    form: Literal["operator", "activation"] = "operator",
    device: torch.device | str | None = None,
) -> dict[str, torch.Tensor]:
    """The dense float64 splitting matrices (out_features, D, D) of each target, exactly as
    ``analyze(..., method="exact")`` forms them (same arguments and definitions). Memory is
    J D^2 per target: meant for small layers, tests and inspection."""
    _check_arguments(gm, form, "exact", 1)
    chosen = resolve_targets(gm, targets, form)
    device = torch.device(device) if device is not None else _model_device(gm)
    accumulators = {t: _accumulator(gm, ss[0], "exact", 0, device, seed=(0, 0))
                    for t, ss in chosen.items()}
    n_batches = collect(gm, batches, loss_fn, chosen, form, accumulators, progress=False)
    scale = _curvature(form) / n_batches
    return {t: acc.matrices(scale)(0, acc.count) for t, acc in accumulators.items()}


def target_seed(seed: int, target: str) -> int:
    """The random streams of one target (its reservoir, its Lanczos start), a function of
    the call's seed and the target's name only: a target's result then does not depend on
    which other targets the call analyses, which sharded analysis relies on
    (docs/distributed.md)."""
    digest = hashlib.sha256(f"{seed}:{target}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # what torch and numpy accept as a seed


def _check_arguments(gm: Any, form: str, method: str, reservoir_tokens: Any) -> None:
    if not isinstance(gm, fx.GraphModule):
        raise AnalysisError(f"analyze expects a torch.fx.GraphModule (see fxgrow.trace), "
                            f"got {type(gm).__name__}")
    if form not in ("operator", "activation"):
        raise AnalysisError(f"form must be 'operator' or 'activation', got {form!r}")
    if method not in ("fast", "exact"):
        raise AnalysisError(f"method must be 'fast' or 'exact', got {method!r}")
    if isinstance(reservoir_tokens, bool) or not isinstance(reservoir_tokens, int) \
            or reservoir_tokens < 1:
        raise AnalysisError(f"reservoir_tokens must be a positive int, got {reservoir_tokens!r}")


def _curvature(form: str) -> float:
    """The constant c of S_j = c / B sum h x~ x~^T (see the module docstring)."""
    return GELU_CURVATURE if form == "operator" else 1.0


def _accumulator(
    gm: fx.GraphModule, site: LinearSite, method: str, reservoir_tokens: int,
    device: torch.device, seed: tuple[int, int],
) -> ExactSums | Reservoir:
    if method == "exact":
        return ExactSums(site.in_features + int(site.has_bias(gm)), site.out_features, device)
    return Reservoir(site.out_features, reservoir_tokens, device, seed=seed)


def _solve(
    gm: fx.GraphModule, chosen: dict[str, list[LinearSite]],
    accumulators: dict[str, ExactSums | Reservoir], scale: float, *, seed: int, tol: float,
    max_iter: int, eigenvectors: bool, device: torch.device,
) -> dict[str, EigenResult]:
    """The smallest eigenpairs of every target's matrices ``scale * sum h x~ x~^T``: dense
    for exact sums, batched Lanczos on the reservoir's implicit product otherwise."""
    results: dict[str, EigenResult] = {}
    problems: list[Problem] = []
    for t, acc in accumulators.items():
        site = chosen[t][0]
        if isinstance(acc, ExactSums):
            results[t] = exact_smallest(acc.matrices(scale), site.out_features,
                                        eigenvectors=eigenvectors)
            continue
        x, h = acc.data(site.in_features)
        # the reservoir estimates the sum over all tokens from the ones it kept
        problems.append(Problem(t, x, h, scale * acc.tokens / max(acc.filled, 1),
                                site.has_bias(gm), target_seed(seed, t)))
    results.update(solve_fast(problems, tol=tol, max_iter=max_iter,
                              eigenvectors=eigenvectors, device=device))
    return results


def _model_device(gm: fx.GraphModule) -> torch.device:
    first = next(iter(gm.parameters()), None)
    return first.device if first is not None else torch.device("cpu")

