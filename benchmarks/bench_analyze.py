"""Splitting analysis cost against one training step, all measured in one run.

For each model, on one batch: a training step (forward, backward, AdamW step), the same
step with its GEMMs routed through oneDNN as the eigensolver's are (the like-for-like
baseline where that is faster, as on AMD CPUs; see ``_onednn_train_step_seconds``), the
recording pass alone (``analyze(..., max_iter=0)``: forward and backward through the
recording copy, reservoir filled, no eigensolver), ``analyze(method="fast")`` and
``analyze(method="exact")`` on the same targets, and the fidelity of fast against exact
(median relative error of the smallest eigenvalue, share of neurons off by more than 3%,
Jaccard overlap of the plans ``select`` makes from each). Every time is the median of warm
runs (see ``_timed``). On DeiT-S the exact path on all 48 layers would take about 16
minutes on one core (81 s for block 0), so both methods are compared on the four layers of
block 0 (qkv, proj, fc1, fc2); ``fast`` is also run on every layer.

    .venv/bin/python benchmarks/bench_analyze.py [--skip-deit] [--threads 1]

One thread by default: on a machine shared with other jobs, a second intra-op thread made
every step here many times slower (OpenMP threads waiting on each other).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fxgrow
from fxgrow.passes import analyze, default_targets


def _timed(fn, repeats: int = 2, warm_up: bool = True):
    """Median wall time of ``repeats`` runs after one untimed warm-up, and the last result.

    The first run of anything large pays for fresh allocations (page faults until glibc's
    malloc has raised its mmap threshold); a training loop that analyses every few epochs
    runs warm, so warm runs are what is compared. (The exact path, minutes long, is timed
    once, cold: its warm-up would change nothing that matters.)"""
    out = fn() if warm_up else None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def _train_step_seconds(gm, x, y) -> float:
    opt = torch.optim.AdamW(gm.parameters(), lr=1e-4)
    gm.train()

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(gm(x), y).backward()
        opt.step()

    seconds, _ = _timed(step, repeats=3)
    opt.zero_grad(set_to_none=True)
    gm.eval()
    return seconds


def _onednn_train_step_seconds(gm, x, y) -> tuple[float, str]:
    """The training step again with every float32 GEMM routed through oneDNN, as ``analyze``
    routes its own (fxgrow/passes/analysis/gemm.py: the eigensolver's and the recording copy's linears):
    the like-for-like baseline on a CPU where oneDNN's GEMM is faster than MKL's. PyTorch
    exposes that routing only as oneDNN's bf16 math mode, so the note says whether this
    CPU's results stayed float32-accurate."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 384, generator=g), torch.randn(384, 256, generator=g)
    exact = a.double() @ b.double()
    saved = torch.backends.mkldnn.matmul.fp32_precision
    try:
        plain = float((a @ b - exact).abs().max())
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        routed = float((a @ b - exact).abs().max())
        seconds = _train_step_seconds(gm, x, y)
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = saved
    accuracy = "float32-accurate here" if routed <= 4 * plain else "bf16 math on this CPU"
    return seconds, f"GEMM max error {routed:.1e} vs MKL {plain:.1e}: {accuracy}"


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
    # Weights move a little from their init so the spectra are not those of a fresh model.
    train = _train_step_seconds(gm, x, y)
    everything = default_targets(gm)
    record, _ = _timed(lambda: analyze(gm, batches, F.cross_entropy, max_iter=0, progress=False))
    fast_all_s, fast_all = _timed(lambda: analyze(gm, batches, F.cross_entropy, progress=False))
    fast_s, fast = _timed(lambda: analyze(gm, batches, F.cross_entropy, targets=exact_targets,
                                          progress=False))
    exact_s, exact = _timed(lambda: analyze(gm, batches, F.cross_entropy, targets=exact_targets,
                                            method="exact", progress=False), repeats=1,
                            warm_up=False)
    neurons = sum(exact.eigenvalues[t].numel() for t in exact.targets)
    med, off, jac = _fidelity(fast, exact, budget=max(1, neurons // 10))
    unconverged = sum(fast_all.nonconverged.values())
    tokens = next(iter(fast_all.tokens.values()))
    train_onednn, onednn_note = _onednn_train_step_seconds(gm, x, y)
    rows.append((name, "train step (fwd+bwd+AdamW)", train, 1.0, ""))
    rows.append((name, "train step, oneDNN GEMMs", train_onednn, train_onednn / train,
                 onednn_note))
    rows.append((name, f"record only, {len(everything)} layers", record, record / train, ""))
    rows.append((name, f"fast, all {len(everything)} layers", fast_all_s, fast_all_s / train,
                 f"{tokens} tokens, unconverged {unconverged}; "
                 f"{fast_all_s / train_onednn:.2f}x the oneDNN train step"))
    label = "all layers" if len(exact_targets) == len(everything) else "block 0"
    rows.append((name, f"fast, {label} ({len(exact_targets)})", fast_s, fast_s / train, ""))
    rows.append((name, f"exact, {label} ({len(exact_targets)})", exact_s, exact_s / train,
                 f"exact/fast = {exact_s / fast_s:.1f}x"))
    rows.append((name, "fidelity fast vs exact", float("nan"), float("nan"),
                 f"median rel err {med:.1e}, off >3%: {off:.2%}, plan Jaccard {jac:.3f}"))
    # The cost of a Lanczos step over a layer is about that of the layer's forward and
    # backward at the same token count, so the remaining lever is the reservoir size.
    for size in reservoirs:
        if size >= tokens:
            continue
        kw = dict(reservoir_tokens=size, progress=False)
        sub_s, sub = _timed(lambda: analyze(gm, batches, F.cross_entropy, targets=exact_targets, **kw))
        all_s, _ = _timed(lambda: analyze(gm, batches, F.cross_entropy, **kw))
        med, off, jac = _fidelity(sub, exact, budget=max(1, neurons // 10))
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
