"""The fast method's solves: targets of equal matrix size share one batched Lanczos run."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .eigen import (
    EigenResult,
    lanczos_smallest,
    splitting_first_step,
    splitting_matvec,
    stacked_matvec,
)

@dataclass
class Problem:
    """One target's splitting matrices for the fast method: ``scale * x~^T diag(h_j) x~``."""

    target: str
    x: torch.Tensor
    h: torch.Tensor
    scale: float
    bias: bool
    seed: int

    @property
    def count(self) -> int:
        return self.h.shape[1]

    @property
    def dim(self) -> int:
        return self.x.shape[1] + int(self.bias)

    @property
    def dtype(self) -> torch.dtype:
        """The Krylov basis's dtype: float64 data keeps float64, anything else float32."""
        return torch.float64 if self.x.dtype == torch.float64 else torch.float32


# Targets solved in one Lanczos run share its per-step costs (Python, the tridiagonal
# solves), which otherwise dominate for small layers; the bound keeps the run's Krylov
# basis, (rows, slots, dim) floats, independent of the model's depth (at most 4096 x 41 x
# 769 float32, 520 MB, on reduced DeiT-S; most rows leave within a few steps).
_GROUP_ROWS = 4096


def _groups(problems: list[Problem]) -> list[list[Problem]]:
    """Problems of equal matrix size and dtype, in target order, at most ``_GROUP_ROWS``
    matrices a group (a larger target forms a group of its own)."""
    open_groups: dict[tuple[int, torch.dtype], list[Problem]] = {}
    groups: list[list[Problem]] = []
    for p in problems:
        key = (p.dim, p.dtype)
        group = open_groups.get(key)
        if group is None or sum(q.count for q in group) + p.count > _GROUP_ROWS:
            group = open_groups[key] = []
            groups.append(group)
        group.append(p)
    return groups


def _solve_together(
    group: list[Problem], *, tol: float, max_iter: int, eigenvectors: bool,
    device: torch.device,
) -> dict[str, EigenResult]:
    """One Lanczos run over the matrices of every problem of ``group``, split back per
    target. The products and start vectors are built here, one group at a time."""
    counts = [p.count for p in group]
    products = [splitting_matvec(p.x, p.h, p.scale, bias=p.bias) for p in group]
    start = start_product = None
    if max_iter:
        firsts = [splitting_first_step(product, seed=p.seed) for product, p in zip(products, group)]
        start = torch.cat([q for q, _ in firsts])
        start_product = torch.cat([sq for _, sq in firsts])
    result = lanczos_smallest(
        stacked_matvec(products, counts), sum(counts), group[0].dim, tol=tol,
        max_iter=max_iter, eigenvectors=eigenvectors, seed=group[0].seed, device=device,
        start=start, start_product=start_product, dtype=group[0].dtype, segments=counts,
    )
    out, begin = {}, 0
    for p in group:
        end = begin + p.count
        out[p.target] = EigenResult(
            values=result.values[begin:end],
            vectors=result.vectors[begin:end] if result.vectors is not None else None,
            residuals=result.residuals[begin:end],
            converged=result.converged[begin:end],
            steps=result.steps[begin:end],
        )
        begin = end
    return out



def solve_fast(
    problems: list[Problem], *, tol: float, max_iter: int, eigenvectors: bool,
    device: torch.device,
) -> dict[str, EigenResult]:
    """The smallest eigenpairs of every problem's matrices, by target."""
    results: dict[str, EigenResult] = {}
    for group in _groups(problems):
        results.update(_solve_together(group, tol=tol, max_iter=max_iter,
                                       eigenvectors=eigenvectors, device=device))
    return results
