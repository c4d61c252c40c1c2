"""Accumulators of the tokens (x_t, h_t) of one target: exact float64 sums of every neuron's
matrix, or a uniform reservoir of tokens for the implicit products of the fast method."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

class ExactSums:
    """Sum over tokens of h_t x~_t x~_t^T for every neuron, float64, upper triangles only."""

    def __init__(self, dim: int, count: int, device: torch.device, chunk_bytes: int = 1 << 27):
        self.dim, self.count = dim, count
        self.iu = torch.triu_indices(dim, dim, device=device)
        pairs = self.iu.shape[1]
        self.sums = torch.zeros(count, pairs, dtype=torch.float64, device=device)
        self.chunk = max(1, chunk_bytes // (8 * pairs))
        self.tokens = 0

    def add(self, x: torch.Tensor, h: torch.Tensor) -> None:
        x = x.to(self.sums.device, torch.float64)
        if self.dim == x.shape[1] + 1:  # x~ = [x; 1]
            x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
        h = h.to(self.sums.device, torch.float64)
        for s in range(0, x.shape[0], self.chunk):
            xc = x[s : s + self.chunk]
            z = xc[:, self.iu[0]] * xc[:, self.iu[1]]
            self.sums.addmm_(h[s : s + self.chunk].T, z)
        self.tokens += x.shape[0]

    def matrices(self, scale: float) -> Callable[[int, int], torch.Tensor]:
        def block(a: int, b: int) -> torch.Tensor:
            full = torch.zeros(b - a, self.dim, self.dim, dtype=torch.float64,
                               device=self.sums.device)
            full[:, self.iu[0], self.iu[1]] = self.sums[a:b]
            full = full + full.transpose(1, 2)
            full.diagonal(dim1=1, dim2=2).mul_(0.5)
            return full * scale

        return block


class Reservoir:
    """A uniform sample of at most ``size`` tokens (x_t, h_t) over the whole stream
    (Vitter's algorithm R, vectorised per batch; seeded, so deterministic). While the
    stream fits, the recorded tensors are kept as they are: no copy at all for the usual
    single batch."""

    def __init__(self, count: int, size: int, device: torch.device, seed: tuple[int, int]):
        self.size, self.count, self.device = size, count, device
        self.chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.x: torch.Tensor | None = None  # the sample, once the stream outgrew ``size``
        self.h: torch.Tensor | None = None
        self.filled = 0
        self.tokens = 0
        self.rng = np.random.default_rng(list(seed))

    def add(self, x: torch.Tensor, h: torch.Tensor) -> None:
        x, h = x.detach().to(self.device), h.detach().to(self.device)
        n = x.shape[0]
        if self.x is None and self.filled + n <= self.size:
            self.chunks.append((x, h))
            self.filled += n
            self.tokens += n
            return
        if self.x is None:
            self._allocate(x, h)
        take = min(n, self.size - self.filled)
        if take:
            self.x[self.filled : self.filled + take] = x[:take]
            self.h[self.filled : self.filled + take] = h[:take]
            self.filled += take
        if take < n:
            seen = self.tokens + np.arange(take, n)  # global index of each remaining token
            slots = (self.rng.random(n - take) * (seen + 1)).astype(np.int64)
            hit = np.nonzero(slots < self.size)[0]
            # Later tokens overwrite earlier ones that drew the same slot, as in the loop.
            _, last = np.unique(slots[hit][::-1], return_index=True)
            hit = hit[::-1][last]
            src = torch.from_numpy(hit + take).to(self.device)
            dst = torch.from_numpy(slots[hit]).to(self.device)
            self.x[dst] = x[src].to(self.x.dtype)
            self.h[dst] = h[src].to(self.h.dtype)
        self.tokens += n

    def _allocate(self, x: torch.Tensor, h: torch.Tensor) -> None:
        dtype = torch.promote_types(x.dtype, h.dtype)
        self.x = torch.empty(self.size, x.shape[1], dtype=dtype, device=self.device)
        self.h = torch.empty(self.size, self.count, dtype=dtype, device=self.device)
        at = 0
        for cx, ch in self.chunks:
            self.x[at : at + cx.shape[0]] = cx
            self.h[at : at + cx.shape[0]] = ch
            at += cx.shape[0]
        self.chunks = []

    def data(self, fan_in: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept tokens: x (kept, fan_in) and h (kept, count)."""
        if self.x is not None:
            return self.x[: self.filled], self.h[: self.filled]
        if not self.chunks:
            return torch.zeros(0, fan_in), torch.zeros(0, self.count)
        xs, hs = zip(*self.chunks)
        return (torch.cat(xs), torch.cat(hs)) if len(xs) > 1 else (xs[0], hs[0])

