"""Smallest eigenpairs of many small symmetric matrices at once (docs/lanczos.md).

Two paths, both batched over the J neurons of a layer:

- ``exact_smallest``: the matrices are given densely, ``torch.linalg.eigh`` on chunks. The
  reference.
- ``lanczos_smallest``: the matrices are only available through a batched product
  ``matvec(V, rows) -> S[rows] @ V`` (one vector per matrix). Plain Lanczos with full
  reorthogonalisation, one Krylov sequence per matrix, all advanced together by one call
  of ``matvec``; a matrix leaves the active set once its smallest Ritz pair has converged,
  so later products only touch the matrices still running.

``splitting_matvec`` builds the product for splitting matrices of the form
``S_j = scale * X^T diag(h_j) X``: ``P = X V^T``, ``R = (H * P)^T X`` (two GEMMs per step,
through ``fxgrow.passes.analysis.gemm``: oneDNN for float32 where it is float32-accurate and
faster), and ``splitting_first_step``
start vectors for them, built from the tokens that dominate every S_j, with their random
part and their products at the cost of one GEMM. ``stacked_matvec`` joins
the products of several layers so that one Lanczos run serves them all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.linalg.lapack import dstebz

from ...errors import AnalysisError, InternalError
from .gemm import gemm_nt, onednn_applies

# Weight of the random part mixed into a given start vector (both unit norm), so that no
# eigenvector is absent from the start. Small, so that a start which already meets the
# tolerance stops after one product (benchmarks/bench_analyze.py counts the products).
START_NOISE = 0.01
NORM_FLOOR = 1e-3  # eigenvalues smaller than this times ||S_j|| are resolved absolutely
_FIRST_SLOTS = 8  # Krylov vectors the basis first has room for (it grows by doubling)
_RANDOM_RANK = 16  # the shared random basis of splitting_first_step's random parts

MatVec = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class EigenResult:
    """Smallest eigenpair of each of J matrices.

    ``residuals[j]`` is ``||S_j v_j - lambda_j v_j||`` (estimated from the Lanczos recurrence
    for the iterative path), ``converged[j]`` whether it met the tolerance, ``steps[j]`` the
    number of Lanczos products matrix j took (0 for the dense path), ``iterations`` the
    largest of them.
    """

    values: torch.Tensor  # (J,) float64
    vectors: torch.Tensor | None  # (J, D) float64, unit norm
    residuals: torch.Tensor  # (J,) float64
    converged: torch.Tensor  # (J,) bool
    steps: torch.Tensor  # (J,) int64

    @property
    def iterations(self) -> int:
        return int(self.steps.max()) if self.steps.numel() else 0

    @property
    def nonconverged(self) -> int:
        return int((~self.converged).sum())


def exact_smallest(
    matrices: torch.Tensor | Callable[[int, int], torch.Tensor],
    count: int | None = None,
    *,
    eigenvectors: bool = False,
    chunk: int = 64,
) -> EigenResult:
    """Smallest eigenvalue (and optionally eigenvector) of each symmetric matrix, by a dense
    batched eigensolver in float64. ``matrices`` is a (J, D, D) tensor, or a function
    ``(start, stop) -> (stop - start, D, D)`` so that only ``chunk`` matrices exist at a time
    (then ``count`` = J)."""
    if isinstance(matrices, torch.Tensor):
        count = matrices.shape[0]
        source = matrices
        matrices = lambda a, b: source[a:b]  # noqa: E731
    if count is None:
        raise AnalysisError("count is required when matrices is a function")
    values, vectors = [], []
    for start in range(0, count, chunk):
        block = matrices(start, min(start + chunk, count)).to(torch.float64)
        if eigenvectors:
            w, v = torch.linalg.eigh(block)
            values.append(w[:, 0])
            vectors.append(v[:, :, 0])
        else:
            values.append(torch.linalg.eigvalsh(block)[:, 0])
    vals = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
    return EigenResult(
        values=vals,
        vectors=torch.cat(vectors) if eigenvectors and vectors else None,
        residuals=torch.zeros_like(vals),
        converged=torch.ones(vals.shape, dtype=torch.bool, device=vals.device),
        steps=torch.zeros(vals.shape, dtype=torch.int64, device=vals.device),
    )


class SplittingProduct:
    """The product ``v_j -> S_j v_j`` for ``S_j = scale * x~^T diag(h[:, j]) x~``, batched
    over neurons (a :data:`MatVec`): ``x`` is (T, d) token inputs, ``h`` is (T, J) per-token
    weights, and ``x~ = [x, 1]`` when ``bias`` (the constant column is never materialised: a
    (T, d + 1) copy of the tokens is what it would cost). The GEMMs run in the dtype of ``x``
    (float32 data stays float32: these two products are where the time goes), and so does
    the result."""

    def __init__(
        self, x: torch.Tensor, h: torch.Tensor, scale: float = 1.0, *, bias: bool = False
    ) -> None:
        self.x, self.h, self.scale, self.bias = x, h, scale, bias
        self._onednn = onednn_applies(x)
        self._x_t = x.T.contiguous() if self._onednn else x.T
        self._rows: torch.Tensor | None = None
        self._h_rows = h

    def __call__(self, v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        count, d = v.shape[0], self.x.shape[1]
        # The live rows only shrink, and each distinct set is gathered from h once, padded
        # with zero columns to a width oneDNN has seen before (see _gemm_width).
        if self._rows is not rows:
            self._rows = rows
            if count == self.h.shape[1]:
                self._h_rows = self.h
            else:
                width = _gemm_width(count) if self._onednn else count
                padded = torch.cat([rows, rows[:1].expand(width - count)])
                self._h_rows = self.h.index_select(1, padded)
                self._h_rows[:, count:] = 0.0
        width = self._h_rows.shape[1]
        if width != count:
            v = torch.cat([v, v.new_zeros(width - count, v.shape[1])])
        v = v.to(self.x.dtype)
        p = gemm_nt(self.x, v[:, :d], v[:, d] if self.bias else None)  # x~ v: (T, width)
        p *= self._h_rows
        return self.inputs_times(p)[:count]

    def inputs_times(self, p: torch.Tensor) -> torch.Tensor:
        """``scale * x~^T p`` for token values ``p`` (T, J): (J, D)."""
        r = gemm_nt(self._x_t, p.T).T
        if self.bias:
            r = torch.cat([r, p.sum(0)[:, None]], 1)
        return r * self.scale


def splitting_matvec(
    x: torch.Tensor, h: torch.Tensor, scale: float = 1.0, *, bias: bool = False
) -> SplittingProduct:
    """The batched product ``v_j -> S_j v_j`` for ``S_j = scale * x~^T diag(h[:, j]) x~``
    (see :class:`SplittingProduct`)."""
    return SplittingProduct(x, h, scale, bias=bias)


def stacked_matvec(parts: Sequence[MatVec], counts: Sequence[int]) -> MatVec:
    """One product for the matrices of several ``parts`` (``counts[i]`` matrices each, in
    order), so that :func:`lanczos_smallest` can run them together: its per-step work
    outside the products is then paid once for all of them."""
    offsets = torch.tensor([0, *counts]).cumsum(0)
    split: dict[str, Any] = {}

    def matvec(v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        # Each part sees the same local ``rows`` object while its own set is unchanged (the
        # other parts' rows may have left), so that its per-set work (gathering h) is done
        # once per set.
        if split.get("rows") is not rows:
            bounds = torch.searchsorted(rows.cpu(), offsets).tolist()
            before = split.get("parts", [(0, 0, None)] * len(parts))
            split["rows"] = rows
            split["parts"] = [
                (a, b, _same_or(before[i][2], rows[a:b] - int(offsets[i])))
                for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))
            ]
        outs = [parts[i](v[a:b], local) for i, (a, b, local) in enumerate(split["parts"]) if b > a]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    return matvec


def _same_or(before: torch.Tensor | None, local: torch.Tensor) -> torch.Tensor:
    """A part's previous local rows object when ``local`` holds the same rows."""
    return before if before is not None and torch.equal(before, local) else local


def _gemm_width(count: int) -> int:
    """``count`` rounded up to one of four steps per power of two (at most 25% more).

    oneDNN builds a kernel for every new GEMM shape, and the shrinking active set of a
    Lanczos run would otherwise ask for a new shape at almost every drop
    (benchmarks/bench_kernels.py measures a new shape against a repeated one)."""
    step = 1 << max(0, count.bit_length() - 3)
    return -(-count // step) * step


def splitting_first_step(
    product: SplittingProduct,
    *,
    tokens: int = 16,
    noise: float = START_NOISE,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Start vectors ``q_j`` for :func:`lanczos_smallest` and their products ``S_j q_j``
    under ``product``, for its ``start`` and ``start_product``.

    ``q_j`` is neuron j's best vector (Rayleigh-Ritz) in the span of the ``tokens`` inputs
    with the largest gradient energy ``sum_j h[t, j]^2``, which dominate every S_j of the
    layer (in a ViT, typically the class tokens), plus ``noise`` times a random unit vector
    (both unit norm, then normalised). The random vectors are Gaussian combinations of one
    random (D, 16) basis shared by the layer, so each is still a Gaussian vector of R^D
    (nothing about any eigenvector's share changes), and ``x~ q_j`` is a combination of
    (T, 16) products: the first Lanczos product costs one GEMM, not two. Returns (J, D)
    float64 unit rows and their products in ``x``'s dtype."""
    x, h, bias = product.x, product.h, product.bias
    count, fan_in = h.shape[1], x.shape[1]
    dim = fan_in + int(bias)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shared = torch.randn(dim, _RANDOM_RANK, generator=generator, dtype=torch.float64).to(x.device)
    mixing = torch.randn(count, _RANDOM_RANK, generator=generator, dtype=torch.float64)
    mixing = mixing.to(x.device)
    random = mixing @ shared.T
    if x.shape[0] == 0:  # no tokens: S_j = 0
        return _unit(random), torch.zeros(count, dim, dtype=x.dtype, device=x.device)
    basis = _token_basis(x, h, bias, tokens)
    k = basis.shape[1]
    # Every start is a combination of these directions; the tokens' coordinates in them,
    # x~ directions (T, k + 16), take one GEMM, and so do the starts' products x~ q.
    directions = torch.cat([basis, shared], 1)
    weights = directions[:fan_in].to(x.dtype)
    z = gemm_nt(x, weights.T, directions[fan_in].to(x.dtype) if bias else None)
    coefficients = _ritz_coefficients(z[:, :k], h)  # unit Ritz vectors in the basis
    combined = torch.cat([coefficients, mixing * (noise / random.norm(dim=1, keepdim=True))], 1)
    start = combined @ directions.T
    norms = start.norm(dim=1, keepdim=True)
    start, combined = start / norms, combined / norms
    p = gemm_nt(z, combined.to(x.dtype))  # x~ q: (T, J)
    p *= h
    return start, product.inputs_times(p)


def _token_basis(x: torch.Tensor, h: torch.Tensor, bias: bool, tokens: int) -> torch.Tensor:
    """An orthonormal basis (D, k), float64, of the ``tokens`` inputs x~ with the largest
    gradient energy ``sum_j h[t, j]^2``."""
    top = h.square().sum(1).topk(min(tokens, x.shape[0])).indices
    chosen = x[top].double()
    if bias:
        chosen = torch.cat([chosen, torch.ones_like(chosen[:, :1])], 1)
    basis, _ = torch.linalg.qr(chosen.T)  # k <= D columns
    return basis


def _ritz_coefficients(y: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Each neuron's Rayleigh-Ritz vector (J, k), unit norm, in the subspace where the tokens
    have coordinates ``y`` (T, k): the smallest eigenvector of ``y^T diag(h_j) y``."""
    k = y.shape[1]
    # The projection needs little precision (it only picks a start), so it runs in the
    # data's dtype; the k x k eigenproblems are solved in float64. The coordinate pairs
    # (a <= b) are built a row of the triangle at a time: a gather by index costs more.
    pairs = torch.cat([y[:, a : a + 1] * y[:, a:] for a in range(k)], 1).to(h.dtype)
    upper = torch.triu_indices(k, k, device=y.device)
    projected = torch.zeros(h.shape[1], k, k, dtype=torch.float64, device=y.device)
    projected[:, upper[0], upper[1]] = gemm_nt(pairs.T, h.T).T.double()
    projected = projected + projected.transpose(1, 2)
    projected.diagonal(dim1=1, dim2=2).mul_(0.5)
    # The smallest eigenvalues, then their vectors by inverse iteration: together half the
    # time of a batched eigh, which also finds the k - 1 vectors not needed here.
    lowest = torch.linalg.eigvalsh(projected)[:, 0]
    return _eigenvector(projected, lowest, steps=1)


# Where numpy's batched dense solver stops beating bisection per matrix (O(m^3) against
# O(m) per probe, with a Python loop over the matrices): benchmarks/bench_kernels.py.
_DENSE_TRIDIAGONAL = 12


def _smallest_tridiagonal(
    alpha: torch.Tensor, beta: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest eigenvalue of each symmetric tridiagonal matrix (diagonal ``alpha`` (J, m),
    off-diagonal ``beta`` (J, m-1)), and the squared last component of its unit
    eigenvector.

    Up to ``_DENSE_TRIDIAGONAL`` rows (where most neurons converge), numpy's batched dense
    solver, whose loop over the J matrices runs in C; beyond, LAPACK's bisection (dstebz)
    per matrix, which finds the one eigenvalue in O(m) per probe where a dense solver costs
    O(m^3) (torch.linalg.eigh takes seconds per step for J = 768, m = 60). The last
    component follows from the Sturm pivots q_i of T - theta I: s_m^2 = -1 / q_m'(theta)."""
    a = alpha.detach().cpu().numpy()
    b = beta.detach().cpu().numpy()
    m = a.shape[1]
    if m == 1:
        theta = a[:, 0].copy()
    elif m <= _DENSE_TRIDIAGONAL:
        dense = np.zeros((a.shape[0], m, m))
        i = np.arange(m)
        dense[:, i, i] = a
        dense[:, i[:-1], i[1:]] = b
        dense[:, i[1:], i[:-1]] = b
        theta = np.linalg.eigvalsh(dense)[:, 0]
    else:
        theta = np.empty(a.shape[0])
        for j in range(a.shape[0]):
            # range "I" (2), indices 1..1, abstol 0 (bisection to full precision), order "E"
            out = dstebz(a[j], b[j], 2, 0.0, 0.0, 1, 1, 0.0, "E")
            if out[-1] != 0:
                raise InternalError(f"dstebz failed, info={out[-1]}")
            theta[j] = out[1][0]
    # numpy, not torch: m sequential steps on length-J vectors, where per-op overhead rules.
    pivmin = np.finfo(np.float64).tiny / np.finfo(np.float64).eps
    b2 = b * b
    q = a[:, 0] - theta
    dq = -np.ones_like(theta)
    for i in range(1, a.shape[1]):
        q = np.where(np.abs(q) < pivmin, -pivmin, q)
        dq = -1.0 + b2[:, i - 1] * dq / (q * q)
        q = (a[:, i] - theta) - b2[:, i - 1] / q
    last2 = np.clip(-1.0 / dq, 0.0, 1.0)
    to = dict(dtype=torch.float64, device=alpha.device)
    return torch.as_tensor(theta, **to), torch.as_tensor(last2, **to)


def _tridiagonal_vector(
    alpha: torch.Tensor, beta: torch.Tensor, theta: torch.Tensor
) -> torch.Tensor:
    """Unit eigenvectors of the tridiagonals for eigenvalues ``theta``."""
    tri = torch.diag_embed(alpha)
    if alpha.shape[1] > 1:
        tri = tri + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    return _eigenvector(tri, theta, steps=2)


def _eigenvector(matrices: torch.Tensor, theta: torch.Tensor, *, steps: int) -> torch.Tensor:
    """Unit eigenvectors of symmetric ``matrices`` (J, m, m) for their eigenvalues ``theta``,
    by ``steps`` steps of inverse iteration shifted just below theta: one LU factorisation
    and a solve per step, not an eigensolver."""
    j, m, _ = matrices.shape
    norm = matrices.abs().sum(2).amax(1)
    shift = theta - 1e-10 * norm - torch.finfo(torch.float64).tiny
    eye = torch.eye(m, dtype=matrices.dtype, device=matrices.device)
    lu, pivots = torch.linalg.lu_factor(matrices - shift[:, None, None] * eye)
    y = torch.ones(j, m, 1, dtype=matrices.dtype, device=matrices.device)
    for _ in range(steps):
        y = torch.linalg.lu_solve(lu, pivots, _unit(y))
    return _unit(y[:, :, 0])


def lanczos_smallest(
    matvec: MatVec,
    count: int,
    dim: int,
    *,
    tol: float = 1e-4,
    max_iter: int = 80,
    eigenvectors: bool = False,
    seed: int = 0,
    device: torch.device | str | None = None,
    start: torch.Tensor | None = None,
    start_product: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
    segments: Sequence[int] | None = None,
) -> EigenResult:
    """Smallest eigenpair of ``count`` symmetric (dim x dim) matrices known through
    ``matvec(V, rows)``, which must return ``S[rows[i]] @ V[i]`` for each row i of V.

    Matrix j has converged when its Ritz residual ``beta_k |s_k|`` (the norm of
    ``S_j y - theta y`` for the Ritz vector y) is at most ``tol * max(|theta|, 1e-3 *
    ||S_j||)`` (``||S_j||`` estimated by the largest of ``|theta|``, the ``|alpha_i|`` and
    the ``beta_i``, each a lower bound), or when its Krylov space is exhausted (an invariant
    subspace, or ``dim`` steps). The eigenvalue error is then about residual^2 / gap.

    The tolerance scales with the eigenvalue sought, not with ``||S_j||``: a residual
    small against the norm only says that *some* eigenvalue is near theta, and when a large
    eigenvalue stretches the spectrum the Ritz value sits in the bulk near zero long before
    a smaller, well separated eigenvalue emerges (seen on DeiT-S: theta 1e-3 reported for
    lambda_min -0.15 next to lambda_max 3.3). Eigenvalues below 1e-3 ||S_j|| in magnitude
    are resolved to that absolute level only.

    ``start`` (count, dim) gives start vectors (see :func:`splitting_first_step`); a seeded
    random component is mixed in so that no eigenvector is missed because the start was
    orthogonal to it. With ``start_product``, the products ``S_j start_j``, the start rows
    are taken as they are (unit norm, random part already mixed in: see
    :func:`splitting_first_step`) and the first product is not asked of ``matvec``.

    After ``max_iter`` steps the rest keep their current Ritz pair and are reported as not
    converged. The Krylov basis is kept in ``dtype`` (float32 halves the memory traffic of
    the reorthogonalisation; use it when the products are float32); the tridiagonal
    problems are solved in float64. Deterministic given ``seed``.

    ``segments`` (counts summing to ``count``) splits the matrices into independent
    problems (stacked layers): each segment's rows then leave the basis on its own schedule,
    so the row sets ``matvec`` sees for a segment, and therefore its results, are those of
    a run of that segment alone."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    f64 = dict(dtype=torch.float64, device=device)
    values = torch.zeros(count, **f64)
    residuals = torch.zeros(count, **f64)
    converged = torch.zeros(count, dtype=torch.bool, device=device)
    taken = torch.zeros(count, dtype=torch.int64, device=device)
    vectors = torch.zeros(count, dim, **f64) if eigenvectors else None
    steps = min(max_iter, dim)
    if count == 0 or dim == 0 or steps == 0:
        converged[:] = count == 0 or dim == 0
        return EigenResult(values, vectors, residuals, converged, taken)

    first = _first_vectors(count, dim, start, start_product, seed, dtype, device)
    # The basis grows by doubling: most matrices converge within a few steps, and a buffer
    # for all steps + 1 vectors would be hundreds of MB to allocate and touch.
    basis = torch.empty(count, min(steps + 1, _FIRST_SLOTS), dim, dtype=dtype, device=device)
    basis[:, 0] = _unit(first)
    alphas = torch.zeros(count, steps, **f64)
    betas = torch.zeros(count, steps, **f64)
    norm_est = torch.zeros(count, **f64)
    rows = torch.arange(count, device=device)
    counts = torch.as_tensor(list(segments) if segments is not None else [count], device=device)
    segment = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)
    # An exhausted Krylov space shows as a beta at rounding level, which depends on dtype.
    exhausted_level = 1e-12 if dtype == torch.float64 else 100 * torch.finfo(dtype).eps
    live = torch.ones(count, dtype=torch.bool, device=device)  # not yet recorded
    for k in range(steps):
        q = basis[:, k]
        if k == 0 and start_product is not None:
            w = start_product.to(device, dtype, copy=True)  # w is updated in place
        else:
            w = matvec(q, rows).to(dtype)
        alpha, beta = _orthogonalise(w, basis, k, betas, live)
        alphas[:, k] = alpha.double()
        betas[:, k] = beta.double()

        theta, res, exhausted, norm_est = _ritz_values(alphas, betas, k, live, norm_est,
                                                       exhausted_level)
        finished = (res <= tol * torch.maximum(theta.abs(), NORM_FLOOR * norm_est)) | exhausted
        last = k + 1 == steps
        leaving = live & (finished | last)
        if bool(leaving.any()):
            idx = rows[leaving]
            values[idx] = theta[leaving]
            residuals[idx] = torch.where(exhausted[leaving], 0.0, res[leaving])
            converged[idx] = finished[leaving] | (k + 1 == dim)
            taken[idx] = k + 1
            if eigenvectors:
                vectors[idx] = _ritz_vectors(basis[leaving, : k + 1], alphas[leaving, : k + 1],
                                             betas[leaving, :k], theta[leaving])
            live &= ~leaving
        if last or not bool(live.any()):
            break
        # Recorded rows ride along with a zero vector until enough of them have gathered
        # (in their segment) to be worth the copy of the basis that dropping them costs.
        w *= torch.where(live, 1.0 / beta.clamp_min(1e-300), 0.0).to(dtype)[:, None]
        keep = _kept_rows(live, segment, len(counts))
        if keep is not None or k + 2 > basis.shape[1]:
            basis = _regrown_basis(basis, k, steps, keep)
            if keep is not None:
                w, rows, alphas, betas = w[keep], rows[keep], alphas[keep], betas[keep]
                norm_est, live, segment = norm_est[keep], live[keep], segment[keep]
        basis[:, k + 1] = w
    return EigenResult(values, vectors, residuals, converged, taken)


def _kept_rows(live: torch.Tensor, segment: torch.Tensor, segments: int) -> torch.Tensor | None:
    """The rows that stay in the basis, or None when all do: a segment's recorded rows are
    dropped once at most 85% of its rows are live, decided per segment."""
    total = torch.bincount(segment, minlength=segments)
    alive = torch.bincount(segment[live], minlength=segments)
    dropping = (alive <= 0.85 * total) & (alive < total)
    if not bool(dropping.any()):
        return None
    return live | ~dropping[segment]


def _first_vectors(
    count: int, dim: int, start: torch.Tensor | None, start_product: torch.Tensor | None,
    seed: int, dtype: torch.dtype, device: torch.device,
) -> torch.Tensor:
    """The first Krylov vector of every matrix (not yet normalised): the given starts, with
    a seeded random part mixed in unless their products were given too; else random."""
    if start is not None and start.shape != (count, dim):
        raise AnalysisError(f"start must have shape {(count, dim)}, got {tuple(start.shape)}")
    if start_product is not None:
        if start is None:
            raise AnalysisError("start_product needs the start vectors it is the product of")
        if start_product.shape != (count, dim):
            raise AnalysisError(f"start_product must have shape {(count, dim)}, "
                                f"got {tuple(start_product.shape)}")
        return start.to(device, dtype)  # the random part is in already: none drawn here
    generator = torch.Generator(device="cpu").manual_seed(seed)
    first = torch.randn(count, dim, generator=generator, dtype=dtype).to(device)
    if start is None:
        return first
    return _unit(start.to(device, dtype)) + START_NOISE * _unit(first)


def _orthogonalise(
    w: torch.Tensor, basis: torch.Tensor, k: int, betas: torch.Tensor, live: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Lanczos recurrence step on ``w = S q_k`` in place: subtract ``alpha_k q_k`` and
    ``beta_{k-1} q_{k-1}``, then reorthogonalise against the whole basis. Returns alpha_k
    and the remaining norm beta_k."""
    q = basis[:, k]
    alpha = (w * q).sum(1)
    w -= alpha[:, None] * q
    if k > 0:
        w -= betas[:, k - 1, None].to(w.dtype) * basis[:, k - 1]
    span = basis[:, : k + 1]
    before = w.norm(dim=1)
    # Full reorthogonalisation, repeated for the rows where it cancelled much of w (DGKS
    # criterion): only those, so that a row's result never depends on the other rows.
    w -= _in_span(w, span)
    beta = w.norm(dim=1)
    again = live & (beta < 0.7071 * before)
    if bool(again.any()):
        twice = w - _in_span(w, span)
        w.copy_(torch.where(again[:, None], twice, w))
        beta = torch.where(again, twice.norm(dim=1), beta)
    return alpha, beta


def _in_span(w: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """The projection of each row of ``w`` on its row's basis ``span`` (J, k, D)."""
    return _bmm(span.transpose(1, 2), _bmm(span, w[:, :, None]))[:, :, 0]


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm``, whose result for a batch element does not depend on the batch's size:
    torch sends a batch of one to a matrix-vector kernel that rounds differently, so a
    single row is doubled."""
    if a.shape[0] != 1:
        return torch.bmm(a, b)
    return torch.bmm(torch.cat([a, a]), torch.cat([b, b]))[:1]


def _ritz_values(
    alphas: torch.Tensor, betas: torch.Tensor, k: int, live: torch.Tensor,
    norm_est: torch.Tensor, exhausted_level: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """After step k: the smallest Ritz value of every live matrix (0 for the others), its
    residual ``beta_k |s_k|``, whether the Krylov space is exhausted, and the updated lower
    bound of ``||S_j||``."""
    f64 = dict(dtype=torch.float64, device=alphas.device)
    theta = torch.zeros(len(live), **f64)
    last2 = torch.zeros(len(live), **f64)
    theta[live], last2[live] = _smallest_tridiagonal(alphas[live, : k + 1], betas[live, :k])
    norm_est = torch.maximum(torch.maximum(norm_est, alphas[:, k].abs()), betas[:, k])
    norm_est = torch.maximum(norm_est, theta.abs())
    residual = betas[:, k] * last2.sqrt()
    return theta, residual, betas[:, k] <= exhausted_level * norm_est, norm_est


def _ritz_vectors(
    span: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, theta: torch.Tensor
) -> torch.Tensor:
    """Unit Ritz vectors for ``theta``: the tridiagonals' eigenvectors mapped back through
    the Krylov basis ``span`` (J, k, D)."""
    s = _tridiagonal_vector(alpha, beta, theta)
    # Elementwise, not einsum: a batched product would round differently for a single row.
    return _unit((span.double() * s[:, :, None]).sum(1))


def _regrown_basis(
    basis: torch.Tensor, k: int, steps: int, keep: torch.Tensor | None
) -> torch.Tensor:
    """A copy of the basis's first k + 1 vectors, with the rows ``keep`` only (all when
    None), in a buffer twice as long when the current one is full."""
    full = k + 2 > basis.shape[1]
    slots = min(steps + 1, 2 * basis.shape[1]) if full else basis.shape[1]
    in_use = basis[keep, : k + 1] if keep is not None else basis[:, : k + 1]
    grown = torch.empty(in_use.shape[0], slots, *basis.shape[2:], dtype=basis.dtype,
                        device=basis.device)
    grown[:, : k + 1] = in_use
    return grown


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
