"""Splitting analysis cost against one training step, all measured in one run.

For each model, on one batch, measured interleaved (one of each per round, medians of the
rounds after a warm-up): the plain PyTorch training step (forward, backward, AdamW step;
PyTorch's own kernels, MKL's GEMM on x86), the recording pass alone (``analyze(...,
max_iter=0)``: forward and backward through the recording copy, no eigensolver) and
``analyze(method="fast")`` on every layer, the headline ratio. Then ``fast`` and ``exact``
on the same targets, and the fidelity of fast against exact (median relative error of the
smallest eigenvalue, share of neurons off by more than 3%, Jaccard overlap of the plans
``select`` makes from each), and the Lanczos products per neuron by layer kind (the
solver's own counts, ``EigenResult.steps``). On DeiT-S the exact path on all 48 layers
would take about 16 minutes on one core, so both methods are compared on the four layers
of block 0 (qkv, proj, fc1, fc2).

The header names the CPU, the GEMM path the analysis took on it and why
(``fxgrow.passes.analysis.gemm.gemm_path``: oneDNN only where it is float32-accurate and
faster) and the float32 error of each GEMM against float64. Every time is float32; no
baseline runs in another precision.

    .venv/bin/python benchmarks/bench_analyze.py [--skip-deit] [--threads 1]

One thread by default: on a machine shared with other jobs, a second intra-op thread made
every step here many times slower (OpenMP threads waiting on each other). The load average
is printed: compare ratios, which are measured under the same load, not seconds.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

import fxgrow
from fxgrow.passes import analyze, default_targets
from fxgrow.passes.analysis import splitting
from fxgrow.passes.analysis.gemm import gemm_path


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _interleaved(fns: dict, rounds: int = 3) -> tuple[dict[str, float], dict]:
    """Median wall time of each function over ``rounds`` rounds that run each once, after
    one untimed warm-up of each, and each one's last result. Interleaving puts every
    function under the same load; the warm-up pays the first run's fresh allocations and
    oneDNN's kernel builds, which a training loop that analyses every few epochs does not
    pay again."""
    out = {name: fn() for name, fn in fns.items()}
    times = defaultdict(list)
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, out


def _timed_once(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _train_step(gm, x, y):
    opt = torch.optim.AdamW(gm.parameters(), lr=1e-4)

    def step():
        gm.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(gm(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        gm.eval()

    return step


def _products_per_neuron(gm, batches) -> dict[str, float]:
    """Lanczos products per neuron by layer kind (the last part of the target's name), from
    the per-matrix counts of one ``fast`` analysis of every layer."""
    results = {}
    solve_fast = splitting.solve_fast

    def capture(problems, **kwargs):
        out = solve_fast(problems, **kwargs)
        results.update(out)
        return out

    splitting.solve_fast = capture
    try:
        analyze(gm, batches, F.cross_entropy, progress=False)
    finally:
        splitting.solve_fast = solve_fast
    kinds = defaultdict(lambda: [0, 0])
    for target, result in results.items():
        kind = kinds[target.rsplit(".", 1)[-1]]
        kind[0] += int(result.steps.sum())
        kind[1] += result.steps.numel()
    return {kind: products / neurons for kind, (products, neurons) in kinds.items()}


def _fidelity(fast, exact, budget):
    """Median relative eigenvalue error; the share of neurons off by more than 3% (errors
    of eigenvalues below 1e-3 of the layer's largest taken against that level); Jaccard
    overlap of the plans."""
    rel, off = [], []
    for t in exact.targets:
        e, f = exact.eigenvalues[t], fast.eigenvalues[t]
        rel.append((f - e).abs() / e.abs())
        off.append((f - e).abs() > 3e-2 * torch.maximum(e.abs(), 1e-3 * e.abs().max()))
    plans = [fxgrow.select(r, budget=budget, layer_threshold=0) for r in (fast, exact)]
    sets = [{(t, i) for t, idx in p.items() for i in idx} for p in plans]
    jaccard = len(sets[0] & sets[1]) / max(1, len(sets[0] | sets[1]))
    return float(torch.cat(rel).median()), float(torch.cat(off).float().mean()), jaccard


def bench(name, gm, x, y, exact_targets, rows, reservoirs=()):
    batches = [(x, y)]
    everything = default_targets(gm)
    seconds, out = _interleaved({
        "train": _train_step(gm, x, y),
        "record": lambda: analyze(gm, batches, F.cross_entropy, max_iter=0, progress=False),
        "fast": lambda: analyze(gm, batches, F.cross_entropy, progress=False),
    })
    train = seconds["train"]
    fast_all = out["fast"]
    fast_s, fast = _interleaved({"fast": lambda: analyze(
        gm, batches, F.cross_entropy, targets=exact_targets, progress=False)}, rounds=2)
    fast_s, fast = fast_s["fast"], fast["fast"]
    exact_s, exact = _timed_once(lambda: analyze(gm, batches, F.cross_entropy,
                                                 targets=exact_targets, method="exact",
                                                 progress=False))
    neurons = sum(exact.eigenvalues[t].numel() for t in exact.targets)
    med, off, jac = _fidelity(fast, exact, budget=max(1, neurons // 10))
    unconverged = sum(fast_all.nonconverged.values())
    tokens = next(iter(fast_all.tokens.values()))
    products = _products_per_neuron(gm, batches)
    rows.append((name, "train step (fwd+bwd+AdamW)", train, 1.0, "PyTorch's default kernels"))
    rows.append((name, f"record only, {len(everything)} layers", seconds["record"],
                 seconds["record"] / train, ""))
    rows.append((name, f"fast, all {len(everything)} layers", seconds["fast"],
                 seconds["fast"] / train, f"{tokens} tokens, unconverged {unconverged}"))
    label = "all layers" if len(exact_targets) == len(everything) else "block 0"
    rows.append((name, f"fast, {label} ({len(exact_targets)})", fast_s, fast_s / train, ""))
    rows.append((name, f"exact, {label} ({len(exact_targets)})", exact_s, exact_s / train,
                 f"exact/fast = {exact_s / fast_s:.1f}x (exact timed once)"))
    rows.append((name, "fidelity fast vs exact", float("nan"), float("nan"),
                 f"median rel err {med:.1e}, off >3%: {off:.2%}, plan Jaccard {jac:.3f}"))
    rows.append((name, "Lanczos products per neuron", float("nan"), float("nan"),
                 ", ".join(f"{kind} {n:.2f}" for kind, n in products.items())))
    # The cost of a Lanczos step over a layer is about that of the layer's forward and
    # backward at the same token count, so the remaining lever is the reservoir size.
    for size in reservoirs:
        if size >= tokens:
            continue
        kw = dict(reservoir_tokens=size, progress=False)
        timed, sub = _interleaved({
            "block": lambda: analyze(gm, batches, F.cross_entropy, targets=exact_targets, **kw),
            "all": lambda: analyze(gm, batches, F.cross_entropy, **kw),
        }, rounds=2)
        med, off, jac = _fidelity(sub["block"], exact, budget=max(1, neurons // 10))
        rows.append((name, f"fast, reservoir {size}, all layers", timed["all"],
                     timed["all"] / train, ""))
        rows.append((name, f"fast, reservoir {size}, {label}", timed["block"],
                     timed["block"] / train,
                     f"vs exact (all tokens): median rel err {med:.1e}, Jaccard {jac:.3f}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-deit", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]
    rows: list[tuple] = []

    gm = fxgrow.models.tiny_vit_reduced(img_size=32)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    bench("tiny_vit_reduced 32px b16", gm, x, y, default_targets(gm), rows, reservoirs=(256,))

    if not args.skip_deit:
        gm = fxgrow.models.deit_small_reduced()
        x, y = torch.randn(16, 3, 224, 224), torch.randint(0, 100, (16,))
        block0 = [t for t in default_targets(gm) if t.startswith("blocks.0.")]
        bench("deit_small_reduced 224px b16", gm, x, y, block0, rows, reservoirs=(1024,))

    path = gemm_path()
    print(f"CPU: {_cpu_model()} ({platform.machine()}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    print(f"analysis GEMM path: {path.describe()}")
    print(f"{'model':<30} {'what':<30} {'seconds':>9} {'x train':>8}  notes")
    for name, what, seconds, ratio, notes in rows:
        s = "" if seconds != seconds else f"{seconds:9.2f}"
        r = "" if ratio != ratio else f"{ratio:8.2f}"
        print(f"{name:<30} {what:<30} {s:>9} {r:>8}  {notes}")


if __name__ == "__main__":
    main()
