"""The recording copy of a graph and the stream of batches through it.

The copy shares the graph's modules and returns, next to the model's output, every target
site's input and (tracked) output, and for the activation form the activation's output.
Its plain linears run through :mod:`.gemm` (oneDNN's float32 GEMM where the probe chose it,
``F.linear`` elsewhere), with no parameter gradients. Each batch's loss is
differentiated with respect to the recorded outputs only, so no parameter's ``.grad`` is
touched, and every target's tokens (x_t, h_t) go to its accumulator (:mod:`.statistics`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ...errors import AnalysisError
from ..._ops import FUNCTIONAL_LINEARS
from ...linears import LinearSite
from .._rebuild import build_graph_module
from .gemm import linear as onednn_linear
from .statistics import ExactSums, Reservoir
from .targets import elementwise_activation

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


def recording_copy(
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
            if any(_in_place(gm, user) for user in tracked.users):
                # An in-place consumer (nn.ReLU(inplace=True)) would overwrite the recorded
                # output, a leaf: it gets a copy of its own, whose gradient flows back to it.
                with graph.inserting_after(tracked):
                    fresh = graph.call_method("clone", (tracked,))
                tracked.replace_all_uses_with(fresh, delete_user_cb=lambda u, f=fresh: u is not f)
            act, act_fn = None, None
            if form == "activation":
                found = elementwise_activation(gm, site)
                act, act_fn = env[found[0]], found[1]
            probes.append(_Probe(target, i, env[site.input], tracked, act, act_fn))
    recorded = []
    for p in probes:
        recorded += [p.x, p.out] + ([p.act] if p.act is not None else [])
    graph.output((out_value, tuple(recorded)))
    return build_graph_module(gm, graph), probes


def _in_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` may write into its first argument."""
    if node.kwargs.get("inplace"):
        return True
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(node.target), "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    name = getattr(node.target, "__name__", "")
    return node.op == "call_function" and name.endswith("_") and not name.endswith("__")


def _route_linears_through_onednn(gm: fx.GraphModule, graph: fx.Graph) -> dict[fx.Node, fx.Node]:
    """Make every plain linear of ``graph`` (a copy of ``gm``'s) a call of :func:`.gemm.linear`:
    the same float32 arithmetic, through oneDNN where :func:`.gemm.gemm_path` chose it, with
    no gradient for parameters. Linear subclasses keep their own forward.
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



def collect(
    gm: fx.GraphModule,
    batches: Iterable[Any],
    loss_fn: Callable,
    chosen: dict[str, list[LinearSite]],
    form: str,
    accumulators: dict[str, ExactSums | Reservoir],
    progress: bool,
) -> int:
    """Stream ``batches`` through a recording copy of ``gm`` in eval mode, feeding every
    target's tokens to its accumulator; return the number of batches."""
    rec, probes = recording_copy(gm, chosen, form)
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



def _accumulate(
    rec: fx.GraphModule,
    probes: list[_Probe],
    inputs: tuple,
    labels: Any,
    loss_fn: Callable,
    index: int,
    accumulators: dict[str, ExactSums | Reservoir],
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


