"""Splitting analysis cost against one training step, all measured in one run.

For each model, on one batch: a training step (forward, backward, AdamW step), the
recording pass alone (``analyze(..., max_iter=0)``: forward and backward through the
recording copy, reservoir filled, no eigensolver), ``analyze(method="fast")`` and
``analyze(method="exact")`` on the same targets, and the fidelity of fast against exact
(median and max relative error of the smallest eigenvalue, Jaccard overlap of the plans
``select`` makes from each). On DeiT-S the exact path on all 48 layers would take the
better part of an hour on 2 cores, so both methods are compared on the four layers of
block 0 (qkv, proj, fc1, fc2); ``fast`` is also run on every layer.

    .venv/bin/python benchmarks/bench_analyze.py [--skip-deit] [--threads 1]

One thread by default: on a machine shared with other jobs, a second intra-op thread made
every step here many times slower (OpenMP threads waiting on each other).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import fxgrow
from fxgrow.passes import analyze, default_targets


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _train_step_seconds(gm, x, y) -> float:
    opt = torch.optim.AdamW(gm.parameters(), lr=1e-4)
    gm.train()

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(gm(x), y).backward()
        opt.step()

    step()  # warm-up (allocations, AdamW state)
    seconds, _ = _timed(step)
    opt.zero_grad(set_to_none=True)
    gm.eval()
    return seconds


def _fidelity(fast, exact, budget):
    rel = torch.cat([
        (fast.eigenvalues[t] - exact.eigenvalues[t]).abs() / exact.eigenvalues[t].abs()
        for t in exact.targets
    ])
    plans = [fxgrow.select(r, budget=budget, layer_threshold=0) for r in (fast, exact)]
    sets = [{(t, i) for t, idx in p.items() for i in idx} for p in plans]
    jaccard = len(sets[0] & sets[1]) / max(1, len(sets[0] | sets[1]))
    return float(rel.median()), float(rel.max()), jaccard


def bench(name, gm, x, y, exact_targets, rows, reservoirs=()):
    batches = [(x, y)]
    # Weights move a little from their init so the spectra are not those of a fresh model.
    train = _train_step_seconds(gm, x, y)
    everything = default_targets(gm)
    record, _ = _timed(lambda: analyze(gm, batches, F.cross_entropy, max_iter=0, progress=False))
    fast_all_s, fast_all = _timed(lambda: analyze(gm, batches, F.cross_entropy, progress=False))
    fast_s, fast = _timed(lambda: analyze(gm, batches, F.cross_entropy, targets=exact_targets,
                                          progress=False))
    exact_s, exact = _timed(lambda: analyze(gm, batches, F.cross_entropy, targets=exact_targets,
                                            method="exact", progress=False))
    neurons = sum(exact.eigenvalues[t].numel() for t in exact.targets)
    med, worst, jac = _fidelity(fast, exact, budget=max(1, neurons // 10))
    unconverged = sum(fast_all.nonconverged.values())
    tokens = next(iter(fast_all.tokens.values()))
    rows.append((name, "train step (fwd+bwd+AdamW)", train, 1.0, ""))
    rows.append((name, f"record only, {len(everything)} layers", record, record / train, ""))
    rows.append((name, f"fast, all {len(everything)} layers", fast_all_s, fast_all_s / train,
                 f"{tokens} tokens, unconverged {unconverged}"))
    label = "all layers" if len(exact_targets) == len(everything) else "block 0"
    rows.append((name, f"fast, {label} ({len(exact_targets)})", fast_s, fast_s / train, ""))
    rows.append((name, f"exact, {label} ({len(exact_targets)})", exact_s, exact_s / train,
                 f"exact/fast = {exact_s / fast_s:.1f}x"))
    rows.append((name, "fidelity fast vs exact", float("nan"), float("nan"),
                 f"median rel err {med:.1e}, max {worst:.1e}, plan Jaccard {jac:.3f}"))
    # The cost of a Lanczos step over a layer is about that of the layer's forward and
    # backward at the same token count, so the remaining lever is the reservoir size.
    for size in reservoirs:
        if size >= tokens:
            continue
        kw = dict(reservoir_tokens=size, progress=False)
        sub_s, sub = _timed(lambda: analyze(gm, batches, F.cross_entropy, targets=exact_targets, **kw))
        all_s, _ = _timed(lambda: analyze(gm, batches, F.cross_entropy, **kw))
        med, worst, jac = _fidelity(sub, exact, budget=max(1, neurons // 10))
        rows.append((name, f"fast, reservoir {size}, all layers", all_s, all_s / train, ""))
        rows.append((name, f"fast, reservoir {size}, {label}", sub_s, sub_s / train,
                     f"vs exact (all tokens): median rel err {med:.1e}, Jaccard {jac:.3f}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-deit", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows: list[tuple] = []

    gm = fxgrow.models.tiny_vit_reduced(img_size=32)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    bench("tiny_vit_reduced 32px b16", gm, x, y, default_targets(gm), rows, reservoirs=(256,))

    if not args.skip_deit:
        gm = fxgrow.models.deit_small_reduced()
        x, y = torch.randn(16, 3, 224, 224), torch.randint(0, 100, (16,))
        block0 = [t for t in default_targets(gm) if t.startswith("blocks.0.")]
        bench("deit_small_reduced 224px b16", gm, x, y, block0, rows, reservoirs=(1024,))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':<30} {'what':<30} {'seconds':>9} {'x train':>8}  notes")
    for name, what, seconds, ratio, notes in rows:
        s = "" if seconds != seconds else f"{seconds:9.2f}"
        r = "" if ratio != ratio else f"{ratio:8.2f}"
        print(f"{name:<30} {what:<30} {s:>9} {r:>8}  {notes}")


if __name__ == "__main__":
    main()
