"""Grown models against the dense model they replace, at paper scale (docs/packing.md).

Reduced DeiT-S (head dim 64 -> 32, MLP 1536 -> 768, 100 classes) is grown to about 19.4M
parameters over the paper's 9 rounds with nested growth, and compared with DeiT-S in three
forms: ``exact`` (the graph ``grow`` writes, today's form), ``packed`` (``fxgrow.passes.pack``,
for training) and ``folded`` (``fxgrow.passes.fold``, for inference). The plans are random,
not analysed: each round spends the paper's per-round parameter budget on randomly chosen
linears with 60 to 192 neurons each (60 is the paper's layer threshold), and from the second
round on half the picks may be the plus member (or fused neuron) of an earlier round, i.e.
nested growth. Timing depends on the shapes only, so random plans time what analysed ones
would.

Per model and form: parameters, GFLOPs (fvcore, batch 1), graph nodes, the training step
(forward and backward of cross-entropy) and inference (no grad) in eager mode and under
``torch.compile``, for each thread count, and the peak memory of one training step
(parameters plus the process's peak resident growth during the step). Memory is measured in
a child process whose glibc mmap threshold is fixed, so that freed buffers are returned and
the peak of a step is that step's own; times are measured in this process with the default
allocator, as users run it (a fixed threshold turns every large buffer into a fresh mmap
and its page faults, which charges a model per allocation: that made the packed step look
12% slower). Every figure is a ratio to DeiT-S measured in the same run; models are timed
interleaved (one repetition of each in turn), taking each one's fastest repetition, so the
load of a shared machine weighs on all alike. Times are given twice: wall clock, and the
process's CPU time, which other jobs' load barely moves (with several threads it sums their
CPU time, spin-waits included).

Run (the reported table): python benchmarks/bench_grown.py --batch 8 --reps 3
Quick: python benchmarks/bench_grown.py --batch 2 --reps 2 --threads 1 --no-compile
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

import fxgrow
from fxgrow.models import build, deit_small_reduced
from fxgrow.passes import fold, grow, pack
from fxgrow.verify import count_flops, count_params

GOALS = {"packed train": 0.90, "folded inference": 0.75, "packed memory": 1.00,
         "compile time": 2.00}


def deit_small(num_classes: int) -> fx.GraphModule:
    return build({"source": "timm", "name": "deit_small_patch16_224",
                  "kwargs": {"num_classes": num_classes}, "fused_attn": True})


def grow_like_the_paper(base: fx.GraphModule, target: int, rounds: int, seed: int) -> fx.GraphModule:
    """``rounds`` rounds of random plans spending (target - params) / rounds left each."""
    rng = random.Random(seed)
    gm = base
    for r in range(rounds):
        budget = (target - count_params(gm)) // (rounds - r)
        sites = fxgrow.linear_sites(gm)
        roots = [t for t in sites if "_grow" not in t and t != "head"]
        members = [t for t in sites if t.endswith(("_plus", "_fused"))]
        plan: dict[str, list[int]] = {}
        while budget > 0:
            pool = members if members and rng.random() < 0.5 else roots
            t = rng.choice(pool)
            width = sites[t][0].out_features
            if t in plan or width < 60:
                if all(u in plan or sites[u][0].out_features < 60 for u in roots + members):
                    break
                continue
            cost = 2 * (sites[t][0].in_features + 1)
            count = min(rng.randint(60, 192), width, max(1, budget // cost))
            plan[t] = sorted(rng.sample(range(width), count))
            budget -= count * cost
        gm = grow(gm, plan)
    return gm


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def build_models(args: argparse.Namespace) -> dict[str, fx.GraphModule]:
    base = deit_small_reduced(num_classes=100)
    exact = grow_like_the_paper(base, int(args.target_params), args.rounds, args.seed)
    return {"DeiT-S": deit_small(100), "reduced base": base, "grown exact": exact,
            "grown packed": pack(exact), "grown folded": fold(exact)}


def batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(size, 3, 224, 224), torch.randint(0, 100, (size,))


def train_step(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor
               ) -> Callable[[], None]:
    params = list(model.parameters())

    def step() -> None:
        F.cross_entropy(model(x), labels).backward()
        for p in params:
            p.grad = None
    return step


def peak_memory(models: dict[str, fx.GraphModule], size: int) -> dict[str, int]:
    """Peak bytes of one eager training step per trainable model (run in the child)."""
    x, labels = batch(size)
    peaks = {}
    for name, model in models.items():
        if name == "grown folded":
            continue
        model.train()
        step = train_step(model, x, labels)
        step()  # warm-up: the first step allocates what later steps reuse
        peaks[name] = peak_step_bytes(step, model)
    return peaks


def memory_in_child() -> dict[str, int]:
    """:func:`peak_memory` in a child process with a fixed mmap threshold (see the module
    docstring), the same models rebuilt from the same arguments."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, *sys.argv, "--memory-child"], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def peak_step_bytes(step: Callable[[], None], model: fx.GraphModule) -> int:
    """Parameter bytes plus the peak resident growth while ``step`` runs."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets the peak resident size (VmHWM)
    before = _rss_kib("VmRSS:")
    step()
    grown = (_rss_kib("VmHWM:") - before) * 1024
    return grown + sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--compile-all", action="store_true",
                        help="also compile the reduced base and the exact form (the slowest)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--target-params", type=float, default=19.4e6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    torch.manual_seed(args.seed)

    started = time.perf_counter()
    models = build_models(args)
    if args.memory_child:
        print(json.dumps(peak_memory(models, args.batch)))
        return
    print(f"built and grown in {time.perf_counter() - started:.0f} s "
          f"(torch {torch.__version__}, batch {args.batch} at 224)", flush=True)
    trainable = [n for n in models if n != "grown folded"]  # fold is for inference

    x, labels = batch(args.batch)
    one = torch.randn(1, 3, 224, 224)
    static = {}
    for name, model in models.items():
        static[name] = dict(params=count_params(model), flops=count_flops(model.eval(), one).total,
                            nodes=len(model.graph.nodes))
    forms: dict[str, dict[str, Callable[[], None]]] = {}

    def infer(model: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                model(x)
        return run

    compile_seconds: dict[str, float] = {}
    # cold compiles only: a cache filled by an earlier model or run would time a lookup
    torch.compiler.config.force_disable_caches = True
    for name in models:
        model = models[name]
        if name in trainable:
            forms.setdefault("train eager", {})[name] = train_step(model, x, labels)
        forms.setdefault("inference eager", {})[name] = infer(model)
        if args.no_compile or (name in ("reduced base", "grown exact") and not args.compile_all):
            continue
        if name in trainable:
            compiled = torch.compile(model.train())
            step = train_step(compiled, x, labels)
            t0 = time.perf_counter()
            step()
            compile_seconds[f"{name} train"] = time.perf_counter() - t0
            forms.setdefault("train compiled", {})[name] = step
        compiled_eval = torch.compile(models[name])
        run = infer(compiled_eval)
        model.eval()
        t0 = time.perf_counter()
        run()
        compile_seconds[f"{name} inference"] = time.perf_counter() - t0
        forms.setdefault("inference compiled", {})[name] = run
        print(f"compiled {name}: {compile_seconds.get(f'{name} train', 0):.0f} s train, "
              f"{compile_seconds[f'{name} inference']:.0f} s inference", flush=True)

    times: dict[tuple[str, str, int], dict[str, float]] = {}  # (clock, kind, threads)
    memory = memory_in_child()
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for kind, runs in forms.items():
            training = kind.startswith("train")
            for name in runs:
                models[name].train(training)
            wall = {name: float("inf") for name in runs}
            cpu = dict(wall)
            for name, run in runs.items():
                run()  # warm-up
            for _ in range(args.reps):
                for name, run in runs.items():
                    t0, c0 = time.perf_counter(), time.process_time()
                    run()
                    wall[name] = min(wall[name], time.perf_counter() - t0)
                    cpu[name] = min(cpu[name], time.process_time() - c0)
            times[("wall", kind, n_threads)], times[("cpu", kind, n_threads)] = wall, cpu
            print(f"{kind}, {n_threads} thread(s), wall (cpu): "
                  + ", ".join(f"{n} {wall[n]:.2f} s ({cpu[n]:.2f} s)" for n in runs), flush=True)

    for clock in ("wall", "cpu"):
        print(f"\n{clock} time" + (" (process CPU seconds: robust to other jobs' load; with"
                                   " several threads it adds up their CPU time)"
                                   if clock == "cpu" else ""))
        _table(models, static, forms, threads, times, memory, clock)
        _goals(threads, times, memory, clock)
    for key, seconds in compile_seconds.items():
        name, kind = key.rsplit(" ", 1)
        ratio = seconds / compile_seconds[f"DeiT-S {kind}"]
        print(f"compile {key}: {seconds:.0f} s ({ratio:.2f}x DeiT-S's)")
        if name != "DeiT-S":
            verdict = "met" if ratio <= GOALS["compile time"] else "NOT met"
            print(f"goal compile time ({key}) <= {GOALS['compile time']:.2f}x DeiT-S: "
                  f"{ratio:.2f}x, {verdict}")


def _table(models, static, forms, threads, times, memory, clock) -> None:
    columns = [(kind, t) for kind in forms for t in threads]
    header = ["model", "params", "GFLOPs", "nodes"] + [f"{k} {t}t" for k, t in columns] \
        + ["peak train mem"]
    dense_flops = static["DeiT-S"]["flops"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name in models:
        flops = static[name]["flops"]
        row = [name, f"{static[name]['params'] / 1e6:.2f}M",
               f"{flops / 1e9:.2f} ({flops / dense_flops:.2f}x)", str(static[name]["nodes"])]
        for kind, n_threads in columns:
            measured = times[(clock, kind, n_threads)]
            value = measured.get(name)
            if value is None:
                row.append("-")
            elif name == "DeiT-S":
                row.append(f"1.00x ({value:.2f} s)")
            else:
                row.append(f"{value / measured['DeiT-S']:.2f}x")
        if name in memory:
            row.append(f"{memory[name] / 2**20:.0f} MiB ({memory[name] / memory['DeiT-S']:.2f}x)")
        else:
            row.append("-")
        print("| " + " | ".join(row) + " |")


def _goals(threads, times, memory, clock) -> None:
    for n_threads in threads:
        for mode in ("eager", "compiled"):
            train = times.get((clock, f"train {mode}", n_threads))
            infer = times.get((clock, f"inference {mode}", n_threads))
            if train is None or "grown packed" not in train:
                continue
            checks = {"packed train": train["grown packed"] / train["DeiT-S"],
                      "folded inference": infer["grown folded"] / infer["DeiT-S"]}
            if mode == "eager":
                checks["packed memory"] = memory["grown packed"] / memory["DeiT-S"]
            for goal, ratio in checks.items():
                verdict = "met" if ratio <= GOALS[goal] else "NOT met"
                print(f"goal {goal} ({mode}, {n_threads}t, {clock}) <= {GOALS[goal]:.2f}x "
                      f"DeiT-S: {ratio:.3f}x, {verdict}")


if __name__ == "__main__":
    main()
