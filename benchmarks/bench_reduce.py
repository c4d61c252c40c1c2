"""Time fxgrow's trace + reduce of DeiT-S and DeiT-B at 224 (head dim and MLP hidden halved)
next to Torch-Pruning pruning the same model to the same widths, in one run, and check that
each result runs a forward pass.

    .venv/bin/python benchmarks/bench_reduce.py [--runs 5] [--models deit_small_patch16_224 ...]

Torch-Pruning's pruned timm model fails at its first forward (head sizes are attributes of
timm's Attention); that is reported as is. The row "torch-pruning + manual patch" sets
``head_dim``, ``attn_dim`` and ``scale`` of every Attention by hand afterwards, as a user would.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import timm
import torch
from timm.models.vision_transformer import Attention

import fxgrow
from fxgrow.passes import reduce

SPEC = {"head_dim": 0.5, "mlp_hidden": 0.5}


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def runs_forward(model: torch.nn.Module) -> str:
    try:
        with torch.no_grad():
            model(torch.randn(2, 3, 224, 224))
        return "yes"
    except Exception as exc:  # reported, not hidden: this is what the user would see
        return f"no: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"


def clock() -> tuple[float, float]:
    """Wall and CPU seconds: on a shared machine CPU time is the steadier of the two."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def median(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def bench_fxgrow(name: str, runs: int) -> tuple[list, list, torch.nn.Module]:
    model = timm.create_model(name, num_classes=100).eval()
    total, reduce_only = [], []
    for _ in range(runs):
        start = clock()
        gm = fxgrow.trace(model)
        traced = clock()
        reduced = reduce(gm, SPEC, torch.randn(1, 3, 224, 224))
        total.append(since(start))
        reduce_only.append(since(traced))
    return total, reduce_only, reduced


def prune_with_torch_pruning(name: str) -> tuple[tuple[float, float], torch.nn.Module]:
    import torch_pruning as tp

    model = timm.create_model(name, num_classes=100).eval()
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    # the residual width must stay: only qkv (head dims) and fc1 (MLP hidden) may be pruned
    ignored = [model.head, model.patch_embed.proj, *(a.proj for a in attns),
               *(b.mlp.fc2 for b in model.blocks)]
    start = clock()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            model, torch.randn(1, 3, 224, 224), importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=0.5, ignored_layers=ignored, num_heads={a.qkv: a.num_heads for a in attns},
            prune_head_dims=True, prune_num_heads=False, head_pruning_ratio=0.0)
        pruner.step()
    return since(start), model


def patch_timm_attention(model: torch.nn.Module) -> None:
    for attn in model.modules():
        if isinstance(attn, Attention):
            attn.head_dim = attn.qkv.out_features // (3 * attn.num_heads)
            attn.attn_dim = attn.head_dim * attn.num_heads
            attn.scale = attn.head_dim ** -0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fxgrow repetitions (median reported)")
    parser.add_argument("--tp-runs", type=int, default=3, help="Torch-Pruning repetitions")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=["deit_small_patch16_224", "deit_base_patch16_224"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench_fxgrow(args.models[0], 1)  # warm-up (imports, first-call costs), not timed
    prune_with_torch_pruning(args.models[0])
    rows = []
    for name in args.models:
        total, reduce_only, reduced = bench_fxgrow(name, args.runs)
        tp_times, pruned = [], None
        for _ in range(args.tp_runs):
            seconds, pruned = prune_with_torch_pruning(name)
            tp_times.append(seconds)
        tp_forward = runs_forward(pruned)
        patch_timm_attention(pruned)
        base = median(total)
        for method, (wall, cpu), count, forward in (
            ("fxgrow trace + reduce", base, params(reduced), runs_forward(reduced)),
            ("fxgrow reduce only", median(reduce_only), params(reduced), runs_forward(reduced)),
            ("torch-pruning", median(tp_times), params(pruned), tp_forward),
            ("torch-pruning + manual patch", median(tp_times), params(pruned), runs_forward(pruned)),
        ):
            rows.append((name, method, wall, cpu, wall / base[0], count, forward))
    print(f"head dim and MLP hidden halved, 224x224, median of {args.runs} (fxgrow) / "
          f"{args.tp_runs} (torch-pruning) runs, {torch.get_num_threads()} threads")
    print(f"{'model':24} {'method':30} {'wall s':>7} {'cpu s':>7} {'x fxgrow':>9} {'params':>11}  forward")
    for name, method, wall, cpu, ratio, count, forward in rows:
        print(f"{name:24} {method:30} {wall:7.3f} {cpu:7.3f} {ratio:9.2f} {count:11,d}  {forward}")

if __name__ == "__main__":
    main()
