"""Growth-pass benchmark on a reduced DeiT-B (head dim 64 -> 32, MLP 3072 -> 1536).

1. Time to grow 5% of the candidate neurons (all four linears of all 12 blocks), both modes.
2. Time against the number of targets (6 .. 48 targets, 5% of each): should be linear, so
   the marginal time per added target should stay flat.
3. Bytes autograd saves for backward in one training step, grown vs reduced, counted with
   torch.autograd.graph.saved_tensors_hooks and de-duplicated by storage. The growth adds
   exactly its own new tensors (new weights, the GeLU inputs of the k new neurons, the index
   buffers); no pseudo-layer saves another copy of the input its parent linear saves. The
   "naive" column is what one more copy of the input per pseudo-layer would add.

Run: .venv/bin/python benchmarks/bench_grow.py [--batch 4] [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import fxgrow
from fxgrow import GrowthPlan
from fxgrow.passes import grow
from fxgrow.passes.reduce import ReduceSpec, reduce


def reduced_deit_base(img: int = 224) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    model = timm.create_model("deit_base_patch16_224", pretrained=False, num_classes=100).eval()
    gm = fxgrow.trace(model)
    spec = ReduceSpec(head_dim=0.5, mlp_hidden=0.5, keep="first")
    return reduce(gm, spec, torch.zeros(1, 3, img, img))


def plan_for(gm: torch.fx.GraphModule, targets: list[str], fraction: float) -> GrowthPlan:
    sites = fxgrow.linear_sites(gm)
    g = torch.Generator().manual_seed(0)
    return GrowthPlan({
        t: torch.randperm(sites[t][0].out_features, generator=g)[
            : max(1, round(fraction * sites[t][0].out_features))]
        for t in targets
    })


def timed(fn, repeats: int) -> float:
    """The fastest of ``repeats`` runs: on a shared machine the others measure the load."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def saved_bytes(gm: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves in one forward/backward step."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr():
            storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = gm(x)
    params = [p for p in gm.parameters() if p.requires_grad]
    torch.autograd.grad(out.sum(), params)  # the step's backward (grads not stored)
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fraction", type=float, default=0.05)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    base = reduced_deit_base()
    print(f"reduced DeiT-B built in {time.perf_counter() - start:.1f} s: "
          f"{sum(p.numel() for p in base.parameters()) / 1e6:.2f}M parameters")
    sites = fxgrow.linear_sites(base)
    targets = [t for t in sites if t.startswith("blocks.")]
    plan = plan_for(base, targets, args.fraction)
    candidates = sum(sites[t][0].out_features for t in targets)

    print(f"\n1. grow {plan.num_neurons} of {candidates} candidate neurons "
          f"({100 * args.fraction:.0f}%, {len(targets)} targets), best of {args.repeats}")
    print(f"{'mode':<8}{'time (s)':>10}{'new params':>14}{'ms/target':>11}")
    for mode in ("paper", "fused"):
        seconds = timed(lambda: grow(base, plan, mode=mode), args.repeats)
        print(f"{mode:<8}{seconds:>10.3f}{plan.num_params(base, mode):>14,}"
              f"{1e3 * seconds / len(targets):>11.2f}")

    # linear = a fixed cost (graph copy, code generation) plus a constant cost per target;
    # a least-squares line through all points, and each measurement against it
    print("\n2. time against the number of targets (paper mode)")
    counts = list(range(6, len(targets) + 1, 6))
    seconds = [timed(lambda: grow(base, plan_for(base, targets[:n], args.fraction)),
                     args.repeats) for n in counts]
    mean_n, mean_t = statistics.fmean(counts), statistics.fmean(seconds)
    slope = sum((n - mean_n) * (t - mean_t) for n, t in zip(counts, seconds)) / sum(
        (n - mean_n) ** 2 for n in counts)
    fixed = mean_t - slope * mean_n
    print(f"fit: {1e3 * fixed:.1f} ms fixed + {1e3 * slope:.2f} ms per target")
    print(f"{'targets':>8}{'time (s)':>10}{'ms/target':>11}{'fit (s)':>10}{'measured/fit':>14}")
    for n, t in zip(counts, seconds):
        fit = fixed + slope * n
        print(f"{n:>8}{t:>10.3f}{1e3 * t / n:>11.2f}{fit:>10.3f}{t / fit:>14.2f}")

    print(f"\n3. bytes autograd saves in one training step, batch {args.batch} at 224x224")
    x = torch.randn(args.batch, 3, 224, 224)
    base.train()
    tokens = args.batch * ((224 // 16) ** 2 + 1)
    reference = saved_bytes(base, x)
    print(f"{'model':<14}{'saved MB':>10}{'extra MB':>10}{'own MB':>9}{'naive MB':>10}"
          f"{'extra/own':>11}")
    print(f"{'reduced':<14}{reference / 2**20:>10.1f}")
    for mode in ("paper", "fused"):
        grown = grow(base, plan, mode=mode).train()
        total = saved_bytes(grown, x)
        members = 2 if mode == "paper" else 1
        # what the pseudo-layers need of their own: new weights, the GeLU input A (k values
        # per token) and the int64 index
        own = sum(
            4 * members * len(plan[t]) * sites[t][0].in_features
            + 4 * tokens * len(plan[t]) + 8 * len(plan[t])
            for t in targets
        )
        naive = own + sum(4 * tokens * sites[t][0].in_features * members for t in targets)
        extra = total - reference
        print(f"{'grown ' + mode:<14}{total / 2**20:>10.1f}{extra / 2**20:>10.2f}"
              f"{own / 2**20:>9.2f}{naive / 2**20:>10.1f}{extra / own:>11.3f}")


if __name__ == "__main__":
    main()
