"""The splitting analysis (DESIGN.md section 4; paper sections 3.2 and 5.5).

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
GEMM where it applies (``fxgrow.passes.analysis.gemm``: the same arithmetic, faster on AMD CPUs) and give
no parameter gradients, which the analysis never asks for.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .gemm import linear as onednn_linear
from .eigen import (
    EigenResult,
    exact_smallest,
    lanczos_smallest,
    splitting_first_step,
    splitting_matvec,
    stacked_matvec,
)
from ...errors import AnalysisError
from ...linears import FUNCTIONAL_LINEARS, LinearSite, linear_sites
from .._rebuild import build_graph_module

GELU_CURVATURE = math.sqrt(2.0 / math.pi)  # GeLU''(0) = 2 * phi(0)
_FORMAT = "fxgrow.SplittingReport"
_VERSION = 1

_ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (
    nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.ELU, nn.Mish, nn.ReLU, nn.LeakyReLU,
)
_ACTIVATION_FUNCTIONS: tuple[Callable, ...] = (
    F.gelu, F.silu, F.mish, F.softplus, F.elu, F.relu, F.leaky_relu, torch.tanh,
    torch.sigmoid, torch.relu, F.sigmoid, F.tanh,
)
_ACTIVATION_METHODS = ("gelu", "tanh", "sigmoid", "relu")
try:  # timm's own activation modules (GELU, GELUTanh, QuickGELU, ...) are elementwise too
    from timm.layers import activations as _timm_act

    _ACTIVATION_MODULES += tuple(
        getattr(_timm_act, name)
        for name in ("GELU", "GELUTanh", "QuickGELU", "Swish", "Mish", "Sigmoid", "Tanh")
        if hasattr(_timm_act, name)
    )
except ImportError:  # pragma: no cover - timm is a dependency
    pass


# --------------------------------------------------------------------------- the report


@dataclass
class SplittingReport:
    """Per target linear: the smallest splitting-matrix eigenvalue of every neuron.

    All dicts are keyed by target, in the order the targets appear in the graph.
    ``eigenvalues[t]`` is a float64 tensor (out_features,), ``eigenvectors[t]`` (present
    only when requested) is (out_features, fan_in + bias) with unit rows, ``tokens[t]`` the
    number of tokens the statistics saw, ``reservoir[t]`` how many of them the fast method
    kept, ``nonconverged[t]`` how many neurons the iterative solver left unconverged.
    ``settings`` records the form, method and the other arguments of :func:`analyze`."""

    eigenvalues: dict[str, torch.Tensor]
    fan_in: dict[str, int]
    bias: dict[str, bool]
    tokens: dict[str, int]
    reservoir: dict[str, int]
    nonconverged: dict[str, int]
    settings: dict[str, Any]
    eigenvectors: dict[str, torch.Tensor] | None = None

    @property
    def targets(self) -> list[str]:
        return list(self.eigenvalues)

    def neuron_cost(self, target: str) -> int:
        """Parameters that growing one neuron of ``target`` adds (paper mode): 2 (d + 1)
        with a bias, 2 d without."""
        return 2 * (self.fan_in[target] + int(self.bias[target]))

    def save(self, path: str | Path) -> None:
        """Write the report to one safetensors file at ``path``: the tensors, and the rest
        as JSON in the file's metadata (no pickle)."""
        from safetensors.torch import save_file

        tensors = {f"eigenvalues/{t}": v.contiguous() for t, v in self.eigenvalues.items()}
        if self.eigenvectors is not None:
            tensors.update(
                {f"eigenvectors/{t}": v.contiguous() for t, v in self.eigenvectors.items()}
            )
        meta = {
            "format": _FORMAT, "version": _VERSION, "targets": self.targets,
            "fan_in": self.fan_in, "bias": self.bias, "tokens": self.tokens,
            "reservoir": self.reservoir, "nonconverged": self.nonconverged,
            "settings": self.settings, "eigenvectors": self.eigenvectors is not None,
        }
        save_file({k: v.detach().cpu() for k, v in tensors.items()}, str(path),
                  metadata={"fxgrow": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> SplittingReport:
        """Read a report written by :meth:`save`."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["fxgrow"])
                if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
                    raise AnalysisError(f"{path} is not a version {_VERSION} splitting report")
                targets = meta["targets"]
                values = {t: f.get_tensor(f"eigenvalues/{t}") for t in targets}
                vectors = (
                    {t: f.get_tensor(f"eigenvectors/{t}") for t in targets}
                    if meta["eigenvectors"] else None
                )
        except (OSError, KeyError, ValueError, SafetensorError) as exc:
            raise AnalysisError(f"cannot read a splitting report from {path}: {exc}") from exc
        return cls(
            eigenvalues=values, fan_in=meta["fan_in"], bias=meta["bias"], tokens=meta["tokens"],
            reservoir=meta["reservoir"], nonconverged=meta["nonconverged"],
            settings=meta["settings"], eigenvectors=vectors,
        )

    def summary(self) -> str:
        """A text table: per target its neurons, negative ones, smallest eigenvalue, median,
        tokens and unconverged count."""
        head = f"{'target':<34} {'neurons':>7} {'neg':>5} {'min':>11} {'median':>11} " \
               f"{'tokens':>8} {'unconv':>6}"
        lines = [f"splitting report: form={self.settings.get('form')} "
                 f"method={self.settings.get('method')}", head, "-" * len(head)]
        for t, v in self.eigenvalues.items():
            neg = int((v < 0).sum())
            vmin = float(v.min()) if v.numel() else math.nan
            med = float(v.median()) if v.numel() else math.nan
            lines.append(f"{t:<34} {v.numel():>7} {neg:>5} {vmin:>11.3e} {med:>11.3e} "
                         f"{self.tokens[t]:>8} {self.nonconverged[t]:>6}")
        return "\n".join(lines)

    def plot(self, targets: Sequence[str] | None = None, path: str | Path | None = None):
        """Figure-2 style plot (paper section 5.5): the negative eigenvalues of each neuron
        of ``targets`` (default: the first two), one panel per target, neurons on the x axis
        and the eigenvalue's magnitude on the y axis. Saved to ``path`` when given; returns
        the matplotlib Figure."""
        # A bare Figure (no pyplot): no global figure registry, no backend switch; it renders
        # with Agg when saved.
        from matplotlib.figure import Figure

        targets = list(targets) if targets is not None else self.targets[:2]
        unknown = [t for t in targets if t not in self.eigenvalues]
        if unknown:
            raise AnalysisError(f"targets not in the report: {unknown}")
        fig = Figure(figsize=(8, 2.6 * max(1, len(targets))))
        axes = fig.subplots(len(targets), 1, squeeze=False)
        for ax, t in zip(axes[:, 0], targets):
            v = self.eigenvalues[t].double().cpu()
            idx = torch.nonzero(v < 0).flatten()
            ax.bar(idx.numpy(), (-v[idx]).numpy(), width=1.0, color="tab:red")
            ax.set_xlim(-0.5, v.numel() - 0.5)
            ax.set_title(f"{t}: {idx.numel()} of {v.numel()} neurons negative", fontsize=9)
            ax.set_xlabel("neuron")
            ax.set_ylabel("|negative eigenvalue|")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
        return fig


# --------------------------------------------------------------------------- targets


def _reaches_output_directly(node: fx.Node, linear_nodes: set[fx.Node]) -> bool:
    stack, seen = list(node.users), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "output":
            return True
        if n in linear_nodes:
            continue
        stack.extend(n.users)
    return False


def _activation(gm: fx.GraphModule, site: LinearSite) -> tuple[fx.Node, Callable] | None:
    """The elementwise activation that is the only user of the site's output, and a
    function applying it to a tensor; None if there is none."""
    users = list(site.node.users)
    if len(users) != 1:
        return None
    (act,) = users
    if not act.args or act.args[0] is not site.node:
        return None
    rest = act.args[1:]
    if any(isinstance(a, fx.Node) for a in (*rest, *act.kwargs.values())):
        return None
    if act.op == "call_module":
        module = gm.get_submodule(act.target)
        if isinstance(module, _ACTIVATION_MODULES) and not rest and not act.kwargs:
            return act, module
    elif act.op == "call_function" and act.target in _ACTIVATION_FUNCTIONS:
        return act, functools.partial(_call_first, act.target, rest, dict(act.kwargs))
    elif act.op == "call_method" and act.target in _ACTIVATION_METHODS:
        return act, functools.partial(_call_method, act.target, rest, dict(act.kwargs))
    return None


def _call_first(fn: Callable, rest: tuple, kwargs: dict, x: torch.Tensor) -> torch.Tensor:
    return fn(x, *rest, **kwargs)


def _call_method(name: str, rest: tuple, kwargs: dict, x: torch.Tensor) -> torch.Tensor:
    return getattr(x, name)(*rest, **kwargs)


def default_targets(gm: fx.GraphModule, form: str = "operator") -> list[str]:
    """The targets :func:`analyze` uses when none are given: every linear of
    :func:`fxgrow.linear_sites` except classifier heads (linears from whose output the graph
    output is reachable without passing through another linear), in graph order. For the
    activation form, only linears whose output feeds solely an elementwise activation."""
    sites = linear_sites(gm)
    linear_nodes = {s.node for ss in sites.values() for s in ss}
    chosen = []
    for target, ss in sites.items():
        if any(_reaches_output_directly(s.node, linear_nodes) for s in ss):
            continue
        if form == "activation" and not all(_activation(gm, s) for s in ss):
            continue
        chosen.append(target)
    return chosen


def _resolve_targets(
    gm: fx.GraphModule, targets: Iterable[str] | None, form: str
) -> dict[str, list[LinearSite]]:
    sites = linear_sites(gm)
    if targets is None:
        names = default_targets(gm, form)
        if not names:
            raise AnalysisError(f"the graph has no linear to analyse in the {form} form")
        return {t: sites[t] for t in names}
    if isinstance(targets, str):
        targets = [targets]
    names = list(dict.fromkeys(targets))
    if not names:
        raise AnalysisError("targets is empty")
    missing = [t for t in names if t not in sites]
    if missing:
        described = []
        for t in missing:
            exists = any(
                n.op in ("call_module", "get_attr") and n.target == t for n in gm.graph.nodes
            )
            described.append(f"{t!r} ({'not a linear' if exists else 'not in the graph'})")
        raise AnalysisError(
            f"targets that are not linears of the graph: {', '.join(described)}; "
            f"linears: {list(sites)[:12]}{' ...' if len(sites) > 12 else ''}"
        )
    if form == "activation":
        bare = [t for t in names if not all(_activation(gm, s) for s in sites[t])]
        if bare:
            raise AnalysisError(
                f"targets whose output does not feed (only) an elementwise activation, so the "
                f"activation form is undefined for them: {bare}; use form='operator'"
            )
    order = {t: i for i, t in enumerate(sites)}
    return {t: sites[t] for t in sorted(names, key=order.__getitem__)}


# --------------------------------------------------------------------------- recording


def _track(x: torch.Tensor) -> torch.Tensor:
    # Frozen parameters and data: the output needs to be part of an autograd graph so that
    # its gradient can be asked for. A tensor that does not require grad is a leaf.
    if torch.is_grad_enabled() and not x.requires_grad:
        x.requires_grad_()
    return x



@dataclass
class _Probe:
    target: str
    site_index: int
    x: fx.Node
    out: fx.Node
    act: fx.Node | None
    act_fn: Callable | None


def _recorder(
    gm: fx.GraphModule, chosen: dict[str, list[LinearSite]], form: str
) -> tuple[fx.GraphModule, list[_Probe]]:
    """A GraphModule sharing ``gm``'s modules whose output is ``(original output,
    recorded values)``: every target site's input, its (tracked) output, and for the
    activation form the activation's output."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out_value = graph.graph_copy(gm.graph, env)
    routed = _route_linears_through_onednn(gm, graph)
    env = {node: routed.get(copy, copy) for node, copy in env.items()}
    out_value = fx.node.map_arg(out_value, lambda n: routed.get(n, n))
    probes: list[_Probe] = []
    for target, sites in chosen.items():
        for i, site in enumerate(sites):
            node = env[site.node]
            with graph.inserting_after(node):
                tracked = graph.call_function(_track, (node,))
            node.replace_all_uses_with(tracked, delete_user_cb=lambda u, t=tracked: u is not t)
            act, act_fn = None, None
            if form == "activation":
                found = _activation(gm, site)
                act, act_fn = env[found[0]], found[1]
            probes.append(_Probe(target, i, env[site.input], tracked, act, act_fn))
    recorded = []
    for p in probes:
        recorded += [p.x, p.out] + ([p.act] if p.act is not None else [])
    graph.output((out_value, tuple(recorded)))
    return build_graph_module(gm, graph), probes


def _route_linears_through_onednn(gm: fx.GraphModule, graph: fx.Graph) -> dict[fx.Node, fx.Node]:
    """Make every plain linear of ``graph`` (a copy of ``gm``'s) a call of
    :func:`fxgrow.passes.analysis.gemm.linear`: the same float32 arithmetic through a faster GEMM where
    oneDNN is, with no gradient for parameters. Linear subclasses keep their own forward.
    Returns the nodes replaced, each mapped to its replacement."""
    replaced: dict[fx.Node, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in FUNCTIONAL_LINEARS:
            node.target = onednn_linear
        elif (node.op == "call_module" and node.args
              and type(gm.get_submodule(node.target)) is nn.Linear):
            module = gm.get_submodule(node.target)
            with graph.inserting_before(node):
                weight = graph.get_attr(f"{node.target}.weight")
                bias = graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
                replaced[node] = graph.call_function(onednn_linear, (node.args[0], weight, bias))
            node.replace_all_uses_with(replaced[node])
            graph.erase_node(node)
    return replaced


def _second_derivative(fn: Callable, o: torch.Tensor) -> torch.Tensor:
    """sigma''(o) elementwise, by differentiating twice."""
    with torch.enable_grad():
        z = o.detach().requires_grad_()
        (d1,) = torch.autograd.grad(fn(z).sum(), z, create_graph=True)
        if not d1.requires_grad:  # piecewise linear (ReLU): zero almost everywhere
            return torch.zeros_like(o)
        (d2,) = torch.autograd.grad(d1.sum(), z)
    return d2.detach()


# --------------------------------------------------------------------------- accumulators


class _Exact:
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


class _Reservoir:
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


# --------------------------------------------------------------------------- the pass


def _split_batch(batch: Any, index: int) -> tuple[tuple, Any]:
    if isinstance(batch, dict) and "inputs" in batch:
        inputs, labels = batch["inputs"], batch.get("labels")
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, labels = batch
    else:
        raise AnalysisError(
            f"batch {index}: expected an (inputs, labels) pair, got {type(batch).__name__}"
        )
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    return inputs, labels


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
    batched Lanczos (:func:`fxgrow.passes.analysis.eigen.lanczos_smallest`: residual at most ``tol`` times
    the eigenvalue, at most ``max_iter`` steps, started from
    :func:`fxgrow.passes.analysis.eigen.splitting_first_step`) on the implicit product. ``device``: where
    statistics and eigensolvers live (default: the device of the model's parameters).

    The defaults (``tol`` 3e-2, ``max_iter`` 40) are enough for ranking: the eigenvalue
    error is about residual^2 / gap. Measured on all 48 layers of reduced DeiT-S at batch
    16 against a dense float64 solve: median relative error 1.3e-4, 90th percentile 8e-4,
    99th 5e-3; 0.5% of the neurons off by more than 3% (errors of eigenvalues below 1e-3 of
    their layer's largest taken against that level). Most of those have eigenvalues below
    1% of their layer's largest, or sit at the edge of a dense spectrum (qkv's k and v
    neurons), where Lanczos converges slowly; a neuron still unconverged after ``max_iter``
    steps keeps its Ritz value, an upper bound, and is counted in ``report.nonconverged``.
    ``max_iter=100`` halves the share off by more than 3%, for about 25% more time.

    Size the reservoir to hold every token when the ranking matters: S_j is a small mean of
    large terms of both signs, so a subsample estimates it poorly (measured on DeiT-S at
    batch 16: 1024 of 3152 tokens gave a median relative eigenvalue error near 1 and plans
    overlapping about a third with the exact ones; benchmarks/bench_analyze.py).

    Raises:
        AnalysisError: no batches; a batch whose loss is not a finite scalar (named by its
            index); targets that are not linears of the graph; the activation form for a
            target with no elementwise activation; unknown form or method.
    """
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
    chosen = _resolve_targets(gm, targets, form)
    device = torch.device(device) if device is not None else _model_device(gm)

    biases = {t: ss[0].has_bias(gm) for t, ss in chosen.items()}
    dims = {t: ss[0].in_features + int(biases[t]) for t, ss in chosen.items()}
    outs = {t: ss[0].out_features for t, ss in chosen.items()}
    accumulators: dict[str, _Exact | _Reservoir] = {}
    for i, t in enumerate(chosen):
        if method == "exact":
            accumulators[t] = _Exact(dims[t], outs[t], device)
        else:
            accumulators[t] = _Reservoir(outs[t], reservoir_tokens, device, seed=(seed, i))
    n_batches = _collect(gm, batches, loss_fn, chosen, form, accumulators, progress)

    constant = GELU_CURVATURE if form == "operator" else 1.0
    results: dict[str, EigenResult] = {}
    problems: list[_Problem] = []
    for i, (t, acc) in enumerate(accumulators.items()):
        if isinstance(acc, _Exact):
            results[t] = exact_smallest(acc.matrices(constant / n_batches), outs[t],
                                        eigenvectors=eigenvectors)
            continue
        x, h = acc.data(dims[t] - int(biases[t]))
        scale = constant / n_batches * acc.tokens / max(acc.filled, 1)
        problems.append(_Problem(t, x, h, scale, biases[t], seed + i))
    for group in _groups(problems):
        results.update(_solve_together(group, tol=tol, max_iter=max_iter,
                                       eigenvectors=eigenvectors, device=device))
    values = {t: results[t].values.cpu() for t in accumulators}
    vectors = {t: results[t].vectors.cpu() for t in accumulators} if eigenvectors else {}
    tokens = {t: acc.tokens for t, acc in accumulators.items()}
    kept = {t: acc.tokens if isinstance(acc, _Exact) else acc.filled
            for t, acc in accumulators.items()}
    unconverged = {t: results[t].nonconverged for t in accumulators}
    settings = {
        "form": form, "method": method, "reservoir_tokens": reservoir_tokens,
        "batches": n_batches, "seed": seed, "tol": tol, "max_iter": max_iter,
        "constant": constant,
    }
    return SplittingReport(
        eigenvalues=values,
        fan_in={t: ss[0].in_features for t, ss in chosen.items()},
        bias=biases, tokens=tokens, reservoir=kept, nonconverged=unconverged, settings=settings,
        eigenvectors=vectors if eigenvectors else None,
    )


@dataclass
class _Problem:
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


def _groups(problems: list[_Problem]) -> list[list[_Problem]]:
    """Problems of equal matrix size and dtype, in target order, at most ``_GROUP_ROWS``
    matrices a group (a larger target forms a group of its own)."""
    open_groups: dict[tuple[int, torch.dtype], list[_Problem]] = {}
    groups: list[list[_Problem]] = []
    for p in problems:
        key = (p.dim, p.dtype)
        group = open_groups.get(key)
        if group is None or sum(q.count for q in group) + p.count > _GROUP_ROWS:
            group = open_groups[key] = []
            groups.append(group)
        group.append(p)
    return groups


def _solve_together(
    group: list[_Problem], *, tol: float, max_iter: int, eigenvectors: bool,
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
        start=start, start_product=start_product, dtype=group[0].dtype,
    )
    out, begin = {}, 0
    for p in group:
        end = begin + p.count
        out[p.target] = EigenResult(
            values=result.values[begin:end],
            vectors=result.vectors[begin:end] if result.vectors is not None else None,
            residuals=result.residuals[begin:end],
            converged=result.converged[begin:end],
            iterations=result.iterations,
        )
        begin = end
    return out


def _collect(
    gm: fx.GraphModule,
    batches: Iterable[Any],
    loss_fn: Callable,
    chosen: dict[str, list[LinearSite]],
    form: str,
    accumulators: dict[str, _Exact | _Reservoir],
    progress: bool,
) -> int:
    """Stream ``batches`` through a recording copy of ``gm`` in eval mode, feeding every
    target's tokens to its accumulator; return the number of batches."""
    rec, probes = _recorder(gm, chosen, form)
    modes = {m: m.training for m in rec.modules()}
    n_batches = 0
    try:
        for m in modes:
            m.training = False
        iterator: Iterable[Any] = batches
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(batches, desc="analyze", unit="batch")
        for index, batch in enumerate(iterator):
            inputs, labels = _split_batch(batch, index)
            _accumulate(rec, probes, inputs, labels, loss_fn, index, accumulators, form)
            n_batches += 1
    finally:
        for m, flag in modes.items():
            m.training = flag
    if n_batches == 0:
        raise AnalysisError("no batches: the splitting analysis needs at least one batch")
    return n_batches


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
    if form not in ("operator", "activation"):
        raise AnalysisError(f"form must be 'operator' or 'activation', got {form!r}")
    chosen = _resolve_targets(gm, targets, form)
    device = torch.device(device) if device is not None else _model_device(gm)
    accumulators: dict[str, _Exact] = {
        t: _Exact(ss[0].in_features + int(ss[0].has_bias(gm)), ss[0].out_features, device)
        for t, ss in chosen.items()
    }
    n_batches = _collect(gm, batches, loss_fn, chosen, form, accumulators, progress=False)
    constant = GELU_CURVATURE if form == "operator" else 1.0
    return {
        t: acc.matrices(constant / n_batches)(0, acc.count) for t, acc in accumulators.items()
    }


def _model_device(gm: fx.GraphModule) -> torch.device:
    first = next(iter(gm.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _accumulate(
    rec: fx.GraphModule,
    probes: list[_Probe],
    inputs: tuple,
    labels: Any,
    loss_fn: Callable,
    index: int,
    accumulators: dict[str, _Exact | _Reservoir],
    form: str,
) -> None:
    with torch.enable_grad():
        out, recorded = rec(*inputs)
        loss = loss_fn(out, labels)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise AnalysisError(f"batch {index}: the loss must be a scalar tensor, got {shape}")
        if not bool(torch.isfinite(loss.detach()).all()):
            raise AnalysisError(f"batch {index}: the loss is {float(loss.detach())}, not finite")
        loss = loss.reshape(())
        wrt, slots, pos = [], [], 0
        for p in probes:
            slots.append(pos)
            wrt.append(recorded[pos + (2 if p.act is not None else 1)])
            pos += 3 if p.act is not None else 2
        if not loss.requires_grad:
            raise AnalysisError(f"batch {index}: the loss does not depend on the model's output")
        grads = torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)
    with torch.no_grad():
        per_target: dict[str, tuple[list, list]] = {}
        for p, start, g in zip(probes, slots, grads):
            x = recorded[start].detach()
            x = x.reshape(-1, x.shape[-1])
            h = g.detach().reshape(-1, g.shape[-1])
            if form == "activation":
                o = recorded[start + 1].detach().reshape(-1, g.shape[-1])
                h = h * _second_derivative(p.act_fn, o)
            xs, hs = per_target.setdefault(p.target, ([], []))
            xs.append(x)
            hs.append(h)
        for t, (xs, hs) in per_target.items():
            acc = accumulators[t]
            x = torch.cat(xs) if len(xs) > 1 else xs[0]
            h = torch.cat(hs) if len(hs) > 1 else hs[0]
            acc.add(x, h)

