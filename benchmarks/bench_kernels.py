"""The kernel choices of the splitting analysis, measured on this machine in one run.

1. Float32 GEMM: oneDNN's linear op against ``torch.matmul`` (MKL on x86 builds), on the
   eigensolver's product shape for one fc1 layer of reduced DeiT-S at batch 16: (3152 x 384)
   x (384 x 576); and which of the two the analysis takes on this CPU
   (``fxgrow.passes.analysis.gemm.gemm_path``: oneDNN only where it is float32-accurate and
   faster).
2. oneDNN's cost for a GEMM shape it has not seen (it builds a kernel per shape), against a
   repeat of a shape it has: why the eigensolver pads its shrinking active set to a few
   widths per power of two (``eigen._gemm_width``).
3. Smallest eigenvalue of J = 576 symmetric tridiagonals of size m: numpy's batched dense
   ``eigvalsh`` against LAPACK bisection (``dstebz``) in a Python loop: why the solver
   switches at ``eigen._DENSE_TRIDIAGONAL`` rows.

    .venv/bin/python benchmarks/bench_kernels.py [--threads 1]

Ratios are measured in one run; on a machine shared with other jobs, compare the ratios,
not the absolute times.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from scipy.linalg.lapack import dstebz

from fxgrow.passes.analysis import eigen, gemm


def _median_seconds(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_throughput(tokens: int = 3152, dim: int = 384, count: int = 576) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(tokens, dim, generator=g)
    b = torch.randn(count, dim, generator=g)
    flops = tokens * dim * count  # multiply-adds
    rows = [("torch.matmul (MKL)", _median_seconds(lambda: a @ b.T))]
    op = gemm.onednn_op()
    if op is not None:
        rows.append(("oneDNN linear", _median_seconds(lambda: op(a, b, None, "none", [], ""))))
    else:
        print("oneDNN's linear op is not available in this build")
    print(f"float32 GEMM ({tokens} x {dim}) x ({dim} x {count}), one multiply-add = 2 flops")
    for name, seconds in rows:
        print(f"  {name:<20} {seconds * 1e3:8.2f} ms  {2 * flops / seconds / 1e9:7.1f} GFLOP/s")
    if len(rows) == 2:
        print(f"  oneDNN / MKL speed: {rows[0][1] / rows[1][1]:.2f}x")
    print(f"  the analysis takes: {gemm.gemm_path().describe()}")


def new_shape_cost(tokens: int = 3152, dim: int = 384) -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(tokens, dim, generator=g)
    if not gemm.onednn_applies(a):
        return  # the analysis takes matmul here, which builds no kernel per shape
    widths = [501 + 3 * i for i in range(12)]  # shapes not seen before in this process
    first = []
    for width in widths:
        b = torch.randn(width, dim, generator=g)
        start = time.perf_counter()
        gemm.gemm_nt(a, b)
        first.append(time.perf_counter() - start)
    b = torch.randn(widths[-1], dim, generator=g)
    repeat = _median_seconds(lambda: gemm.gemm_nt(a, b))
    print(f"oneDNN GEMM ({tokens} x {dim}) x ({dim} x ~500): first call of a new shape "
          f"{statistics.median(first) * 1e3:.2f} ms, a repeated shape {repeat * 1e3:.2f} ms "
          f"({statistics.median(first) / repeat:.1f}x)")


def tridiagonal_solvers(count: int = 576) -> None:
    rng = np.random.default_rng(2)
    print(f"smallest eigenvalue of {count} tridiagonals of size m")
    print(f"  {'m':>3} {'numpy eigvalsh':>15} {'dstebz loop':>12}")
    for m in (3, 8, 12, 20, 40):
        a = rng.standard_normal((count, m))
        b = rng.standard_normal((count, m - 1))

        def dense():
            full = np.zeros((count, m, m))
            i = np.arange(m)
            full[:, i, i] = a
            full[:, i[:-1], i[1:]] = b
            full[:, i[1:], i[:-1]] = b
            return np.linalg.eigvalsh(full)[:, 0]

        def bisection():
            return [dstebz(a[j], b[j], 2, 0.0, 0.0, 1, 1, 0.0, "E")[1][0] for j in range(count)]

        np.testing.assert_allclose(dense(), bisection(), rtol=1e-9, atol=1e-9)
        marker = "  <- dense up to here" if m == eigen._DENSE_TRIDIAGONAL else ""
        print(f"  {m:>3} {_median_seconds(dense) * 1e3:12.2f} ms "
              f"{_median_seconds(bisection) * 1e3:9.2f} ms{marker}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    gemm_throughput()
    new_shape_cost()
    tridiagonal_solvers()


if __name__ == "__main__":
    main()
