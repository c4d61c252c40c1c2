import pytest
import torch

from fxgrow.errors import AnalysisError
from fxgrow.passes.analysis.solve import Problem, solve_fast
from fxgrow.passes.analysis.eigen import (
    exact_smallest,
    lanczos_smallest,
    splitting_first_step,
    splitting_matvec,
    stacked_matvec,
)


def _problem(tokens, dim, count, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=g, dtype=torch.float64)
    h = torch.randn(tokens, count, generator=g, dtype=torch.float64)
    dense = 0.7 * torch.einsum("tj,ta,tb->jab", h, x, x)
    return x, h, dense


def test_lanczos_matches_a_dense_eigensolver_with_small_residuals():
    x, h, dense = _problem(300, 40, 25)
    ref = torch.linalg.eigvalsh(dense)[:, 0]
    result = lanczos_smallest(splitting_matvec(x, h, 0.7), 25, 40, tol=1e-8, eigenvectors=True)
    assert result.nonconverged == 0
    torch.testing.assert_close(result.values, ref, rtol=1e-10, atol=0)
    v = result.vectors
    true_res = (torch.einsum("jab,jb->ja", dense, v) - result.values[:, None] * v).norm(dim=1)
    norms = torch.linalg.matrix_norm(dense, ord=2)
    assert bool((true_res <= 1e-7 * norms).all())
    assert bool((result.residuals <= 1e-8 * norms * 1.01).all())
    torch.testing.assert_close(v.norm(dim=1), torch.ones(25, dtype=torch.float64))


def test_exact_smallest_in_chunks_with_vectors():
    _, _, dense = _problem(50, 7, 10)
    result = exact_smallest(lambda a, b: dense[a:b], 10, eigenvectors=True, chunk=3)
    w, v = torch.linalg.eigh(dense)
    torch.testing.assert_close(result.values, w[:, 0])
    assert torch.allclose((result.vectors * v[:, :, 0]).sum(1).abs(), torch.ones(10, dtype=torch.float64))


def test_rank_deficient_and_zero_matrices_converge_exactly():
    # Fewer tokens than dimensions: the Krylov space is exhausted early (an invariant subspace).
    x, h, dense = _problem(5, 30, 6)
    h[:, 0] = 0.0  # a dead neuron: S = 0
    dense[0] = 0.0
    result = lanczos_smallest(splitting_matvec(x, h, 0.7), 6, 30, tol=0.0)
    assert result.nonconverged == 0 and result.iterations <= 7
    torch.testing.assert_close(result.values, torch.linalg.eigvalsh(dense)[:, 0], rtol=1e-9, atol=1e-12)
    assert float(result.values[0]) == 0.0


def test_unconverged_neurons_are_reported():
    x, h, dense = _problem(400, 60, 12)
    result = lanczos_smallest(splitting_matvec(x, h, 0.7), 12, 60, tol=1e-12, max_iter=4)
    assert result.iterations == 4 and result.nonconverged == 12
    ref = torch.linalg.eigvalsh(dense)[:, 0]
    assert bool((result.values >= ref - 1e-9).all())  # Ritz values bound from above
    full = lanczos_smallest(splitting_matvec(x, h, 0.7), 12, 60, tol=0.0, max_iter=60)
    assert full.nonconverged == 0  # dim steps: the whole space, exact by construction
    torch.testing.assert_close(full.values, ref, rtol=1e-9, atol=0)


def test_float32_data_and_determinism():
    x, h, dense = _problem(500, 33, 20)
    ref = torch.linalg.eigvalsh(dense)[:, 0]
    one = lanczos_smallest(splitting_matvec(x.float(), h.float(), 0.7), 20, 33, seed=3)
    two = lanczos_smallest(splitting_matvec(x.float(), h.float(), 0.7), 20, 33, seed=3)
    assert torch.equal(one.values, two.values) and one.values.dtype == torch.float64
    assert float(((one.values - ref).abs() / ref.abs()).max()) < 1e-5


def _spectrum_family(count, dim, seed=0):
    """Matrices Q diag(lam) Q^T with a bulk near zero, a smallest eigenvalue that is small
    against the norm, and one large positive outlier, as the splitting matrices of DeiT-S
    have (lambda_min -0.15, lambda_max 3.3)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(count, dim, dim, generator=g, dtype=torch.float64))
    lam = 0.1 * torch.rand(count, dim, generator=g, dtype=torch.float64) - 0.05
    lam[:, 0] = -0.15 - 0.05 * torch.rand(count, generator=g, dtype=torch.float64)
    lam[:, 1] = 10.0
    dense = torch.einsum("jab,jb,jcb->jac", q, lam, q)
    return dense, lam[:, 0]


def _dense_matvec(dense):
    return lambda v, rows: torch.einsum("jab,jb->ja", dense[rows], v)


def test_a_large_outlier_does_not_hide_the_smallest_eigenvalue():
    # A residual small against ||S|| = 10 is reached by Ritz values in the bulk long before
    # lambda_min emerges; the tolerance must scale with the eigenvalue itself.
    dense, smallest = _spectrum_family(40, 120)
    result = lanczos_smallest(_dense_matvec(dense), 40, 120, tol=3e-2)
    assert result.nonconverged == 0
    rel = (result.values - smallest).abs() / smallest.abs()
    assert float(rel.max()) < 1e-2, rel.max()


def test_start_vectors_speed_up_and_cannot_hide_the_smallest_eigenvalue():
    dense, smallest = _spectrum_family(30, 80, seed=1)
    w, v = torch.linalg.eigh(dense)
    from_random = lanczos_smallest(_dense_matvec(dense), 30, 80, tol=1e-6)
    from_vectors = lanczos_smallest(_dense_matvec(dense), 30, 80, tol=1e-6, start=v[:, :, 0])
    assert from_vectors.iterations < from_random.iterations
    torch.testing.assert_close(from_vectors.values, smallest, rtol=1e-9, atol=0)
    # A start orthogonal to the answer (the second smallest eigenvector): the random part
    # mixed in still leads to lambda_min.
    misleading = lanczos_smallest(_dense_matvec(dense), 30, 80, tol=1e-6, start=v[:, :, 1])
    torch.testing.assert_close(misleading.values, smallest, rtol=1e-9, atol=0)


def test_bias_column_is_implicit_in_the_product():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    h = torch.randn(50, 4, generator=g, dtype=torch.float64)
    v = torch.randn(4, 7, generator=g, dtype=torch.float64)
    xt = torch.cat([x, torch.ones(50, 1, dtype=torch.float64)], 1)
    explicit = splitting_matvec(xt, h, 0.3)(v, torch.arange(4))
    implicit = splitting_matvec(x, h, 0.3, bias=True)(v, torch.arange(4))
    torch.testing.assert_close(implicit, explicit, rtol=1e-12, atol=1e-12)


def test_token_start_is_exact_when_the_gradient_lives_on_few_tokens():
    # h is zero outside 5 tokens, so every S_j lives in the span of their x~ and the
    # Rayleigh-Ritz start is already the smallest eigenvector (independent dense check).
    g = torch.Generator().manual_seed(6)
    x = torch.randn(200, 9, generator=g, dtype=torch.float64)
    h = torch.zeros(200, 12, dtype=torch.float64)
    support = torch.tensor([3, 50, 77, 120, 199])
    h[support] = torch.randn(5, 12, generator=g, dtype=torch.float64)
    h[support[0]] -= 4.0  # every S_j has a negative eigenvalue
    xt = torch.cat([x, torch.ones(200, 1, dtype=torch.float64)], 1)
    dense = torch.einsum("tj,ta,tb->jab", h, xt, xt)
    start, _ = splitting_first_step(splitting_matvec(x, h, bias=True), tokens=5, noise=0.0)
    w, v = torch.linalg.eigh(dense)
    torch.testing.assert_close((start * v[:, :, 0]).sum(1).abs(), torch.ones(12, dtype=torch.float64))


def test_product_on_a_subset_of_rows_in_float32():
    # Subsets are padded to a GEMM width oneDNN has seen before (9 rows -> 10); the padding
    # must not leak into the result.
    g = torch.Generator().manual_seed(8)
    x = torch.randn(120, 11, generator=g)
    h = torch.randn(120, 30, generator=g)
    rows = torch.tensor([0, 2, 3, 7, 11, 12, 20, 28, 29])
    v = torch.randn(9, 12, generator=g)
    xt = torch.cat([x, torch.ones(120, 1)], 1).double()
    dense = 0.4 * torch.einsum("tj,ta,tb->jab", h.double(), xt, xt)
    expected = torch.einsum("jab,jb->ja", dense[rows], v.double())
    got = splitting_matvec(x, h, 0.4, bias=True)(v, rows)
    assert got.shape == (9, 12) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


def test_stacked_product_equals_each_parts_own():
    g = torch.Generator().manual_seed(10)
    parts, dense = [], []
    for tokens, count, bias in [(80, 5, True), (60, 7, False), (90, 4, True)]:
        x = torch.randn(tokens, 6 - int(bias), generator=g, dtype=torch.float64)
        h = torch.randn(tokens, count, generator=g, dtype=torch.float64)
        parts.append(splitting_matvec(x, h, 0.5, bias=bias))
        xt = torch.cat([x, torch.ones(tokens, 1, dtype=torch.float64)], 1) if bias else x
        dense.append(0.5 * torch.einsum("tj,ta,tb->jab", h, xt, xt))
    dense = torch.cat(dense)  # (16, 6, 6)
    stacked = stacked_matvec(parts, [5, 7, 4])
    for rows in [torch.arange(16), torch.tensor([1, 3, 12, 15]), torch.tensor([13])]:
        v = torch.randn(len(rows), 6, generator=g, dtype=torch.float64)
        expected = torch.einsum("jab,jb->ja", dense[rows], v)
        torch.testing.assert_close(stacked(v, rows), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_first_step_gives_noisy_unit_starts_and_their_products(dtype, bias):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(150, 9, generator=g, dtype=torch.float64)
    h = torch.randn(150, 20, generator=g, dtype=torch.float64)
    xt = torch.cat([x, torch.ones(150, 1, dtype=torch.float64)], 1) if bias else x
    dense = 0.6 * torch.einsum("tj,ta,tb->jab", h, xt, xt)
    start, product = splitting_first_step(
        splitting_matvec(x.to(dtype), h.to(dtype), 0.6, bias=bias), seed=3
    )
    torch.testing.assert_close(start.norm(dim=1), torch.ones(20, dtype=torch.float64))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    expected = torch.einsum("jab,jb->ja", dense, start)
    atol = tol * float(dense.abs().max())
    torch.testing.assert_close(product.double(), expected, rtol=tol, atol=atol)
    # The token start, with the random part at its weight (0.01 against 1): an angle of
    # about 0.01 radians, never 0.
    ritz, _ = splitting_first_step(splitting_matvec(x, h, bias=bias), noise=0.0)
    cos = ((start * ritz).sum(1) / ritz.norm(dim=1)).abs()
    assert bool((cos > 0.999).all()) and bool((cos < 1 - 1e-7).all())
    # Deterministic given the seed.
    again = splitting_first_step(
        splitting_matvec(x.to(dtype), h.to(dtype), 0.6, bias=bias), seed=3
    )
    assert torch.equal(again[0], start) and torch.equal(again[1], product)


def test_lanczos_from_a_start_and_its_product():
    x, h, dense = _problem(300, 40, 25)
    start, product = splitting_first_step(splitting_matvec(x, h, 0.7), seed=1)
    given = product.clone()
    result = lanczos_smallest(
        splitting_matvec(x, h, 0.7), 25, 40, tol=1e-8, start=start, start_product=product
    )
    reference = torch.linalg.eigvalsh(dense)[:, 0]
    torch.testing.assert_close(result.values, reference, rtol=1e-10, atol=0)
    assert torch.equal(product, given)  # the caller's products are left as they were
    with pytest.raises(AnalysisError, match="start_product needs"):
        lanczos_smallest(splitting_matvec(x, h, 0.7), 25, 40, start_product=product)
    with pytest.raises(AnalysisError, match="start_product must have shape"):
        lanczos_smallest(splitting_matvec(x, h, 0.7), 25, 40, start=start,
                         start_product=product[:3])


def test_a_stacked_run_gives_each_target_the_result_of_a_run_of_its_own():
    # Equal matrix sizes share one Lanczos run (solve.py). "quick" meets the tolerance from
    # its start (its gradient lives on two tokens); "slow" and "slower" have dense spectra
    # and run many steps, so the rows of each part leave the run on different schedules.
    g = torch.Generator().manual_seed(12)
    x = torch.randn(400, 47, generator=g)
    quick = torch.zeros(400, 30)
    quick[:2] = torch.randn(2, 30, generator=g)
    problems = [
        Problem("slow", x, torch.randn(400, 50, generator=g), 0.3, True, 5),
        Problem("quick", x.flip(0), quick, 0.3, True, 6),
        Problem("slower", x.roll(7, 0), torch.randn(400, 20, generator=g), 0.3, True, 7),
    ]
    options = dict(tol=1e-3, max_iter=30, eigenvectors=True, device=torch.device("cpu"))
    together = solve_fast(problems, **options)
    assert int(together["quick"].steps.max()) < int(together["slow"].steps.min())
    for p in problems:
        alone = solve_fast([p], **options)[p.target]
        for field in ("values", "vectors", "residuals", "converged", "steps"):
            assert torch.equal(getattr(alone, field), getattr(together[p.target], field)), \
                (p.target, field)
