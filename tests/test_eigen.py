import torch

from fxgrow.eigen import exact_smallest, lanczos_smallest, splitting_matvec


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
