"""Short, self-checking walks through one step of the pipeline: ``fxgrow demo-reduce`` runs
:func:`reduction_demo` (``make demo`` runs the whole loop instead, ``fxgrow compare``)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import torch
import torch.fx as fx
import torch.nn.functional as F

from .linears import linear_sites
from .models import build
from .verify import count_flops, params_by_module

__all__ = ["reduction_demo"]


def _head_dim(gm: fx.GraphModule, qkv_target: str) -> int | None:
    """The head size literal of the reshape that splits ``qkv_target``'s output into heads,
    read from the graph, so the table shows what the code will actually run."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == qkv_target:
            for user in node.users:
                if user.op == "call_method" and user.target in ("reshape", "view"):
                    last = user.args[-1]
                    return last if isinstance(last, int) and last > 0 else None
    return None


def _block_widths(gm: fx.GraphModule, block: str) -> tuple[Any, Any, Any]:
    sites = linear_sites(gm)

    def out(target: str) -> Any:
        return sites[target][0].out_features if target in sites else "-"

    qkv = f"{block}.attn.qkv"
    return out(qkv), _head_dim(gm, qkv) or "-", out(f"{block}.mlp.fc1")


def _blocks(gm: fx.GraphModule) -> list[str]:
    names = {name for name, _ in gm.named_modules()}
    count = 0
    while f"blocks.{count}" in names:
        count += 1
    return [f"blocks.{i}" for i in range(count)]


def reduction_demo(
    name: str = "deit_small_patch16_224",
    num_classes: int = 100,
    img_size: int = 224,
    file: TextIO = sys.stdout,
    *,
    model_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Trace a timm ViT, reduce it as the paper does (head dim and MLP hidden width halved,
    residual width kept), print a per-block table of widths, parameters and FLOPs before and
    after, then run a forward and backward pass at batch 2 (the FLOPs are counted at batch 1).

    The global RNG state is left as it was. Returns the figures it printed:
    ``params``/``flops`` as ``(before, after)`` pairs, ``loss`` and ``grads_finite``.
    """
    from .passes.reduce import ReduceSpec, reduce

    def say(line: str = "") -> None:
        print(line, file=file)

    spec = {
        "source": "timm",
        "name": name,
        "kwargs": {**(model_kwargs or {}), "num_classes": num_classes, "img_size": img_size},
    }
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        start = time.perf_counter()
        full = build(spec)
        traced = time.perf_counter()
        example = torch.randn(1, 3, img_size, img_size)
        reduced = reduce(full, ReduceSpec(head_dim=0.5, mlp_hidden=0.5, keep="first"), example)
        done = time.perf_counter()
        say(f"{name} ({num_classes} classes, {img_size}x{img_size}): built and traced in "
            f"{traced - start:.2f} s, reduced (head dim and MLP hidden halved) in "
            f"{done - traced:.2f} s")

        flops = (count_flops(full, example), count_flops(reduced, example))
        params = (params_by_module(full), params_by_module(reduced))
        header = ("block", "qkv out", "head dim", "fc1 out", "params", "GFLOPs")
        rows = []
        for block in _blocks(full):
            widths = zip(_block_widths(full, block), _block_widths(reduced, block))
            rows.append((
                block,
                *(f"{a} -> {b}" for a, b in widths),
                f"{params[0][block]:,} -> {params[1][block]:,}",
                f"{flops[0].module(block) / 1e9:.3f} -> {flops[1].module(block) / 1e9:.3f}",
            ))
        rows.append((
            "total", "", "", "",
            f"{params[0]['']:,} -> {params[1]['']:,}",
            f"{flops[0].total / 1e9:.3f} -> {flops[1].total / 1e9:.3f}",
        ))
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(f"{c:>{w}}" for c, w in zip(row, widths)) for row in [header, *rows]]
        say(lines[0])
        say("-" * len(lines[0]))
        for line in lines[1:-1]:
            say(line)
        say("-" * len(lines[0]))
        say(lines[-1])
        say(f"parameters x{params[1][''] / params[0]['']:.3f}, "
            f"FLOPs x{flops[1].total / flops[0].total:.3f} "
            f"(one multiply-add = one flop, attention products counted, batch 1)")

        batch = 2
        x = torch.randn(batch, 3, img_size, img_size)
        labels = torch.randint(0, num_classes, (batch,))
        reduced.train()
        logits = reduced(x)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        grads = [p.grad for p in reduced.parameters() if p.requires_grad]
        finite = all(g is not None and bool(g.isfinite().all()) for g in grads)
        say(f"forward + backward at batch {batch}: logits {tuple(logits.shape)}, "
            f"loss {loss.item():.4f}, {len(grads)} gradients all finite: {finite}")
    return {
        "params": (params[0][""], params[1][""]),
        "flops": (flops[0].total, flops[1].total),
        "loss": loss.item(),
        "grads_finite": finite,
    }
