"""Sharded splitting analysis under DDP: per-rank record and solve seconds, 1 vs N ranks.

For each world size, that many gloo processes (one intra-op thread each) run
:func:`fxgrow.training.sharding.analyze_sharded` on the same global batch (all 48 targets of
reduced DeiT-S by default): one untimed warm-up, then ``--repeats`` timed calls. Printed per
rank: its targets, its share of the estimated cost, the recording seconds (forward and
backward through the recording copy over the global batch), the solve seconds, and the
wall time of the whole call (including gathering the reports), each the median over the
repeats; then the ratios to one process and whether the gathered report is bitwise the
one-process report.

    .venv/bin/python benchmarks/bench_ddp_analysis.py [--model tiny_vit_reduced] [--worlds 1 2]

Ranks are processes on this machine: with N ranks on N free cores, the max-rank solve time
is what a round waits for.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import fxgrow

_MODELS = {
    "deit_small_reduced": (lambda: fxgrow.models.deit_small_reduced(), 224, 100),
    "tiny_vit_reduced": (lambda: fxgrow.models.tiny_vit_reduced(img_size=32), 32, 10),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: Path) -> None:
    import fxgrow.training.distributed as fd
    from fxgrow.passes.analysis.shards import target_costs
    from fxgrow.training.sharding import analyze_sharded

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    fd.init_from_env("gloo", timeout=1800)
    build, size, classes = _MODELS[args.model]
    torch.manual_seed(0)
    gm = build()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch, 3, size, size, generator=g),
                torch.randint(0, classes, (args.batch,), generator=g))]
    runs = []
    for _ in range(1 + args.repeats):
        fd.barrier()
        start = time.perf_counter()
        sharded = analyze_sharded(gm, batches, F.cross_entropy, progress=False)
        runs.append((time.perf_counter() - start, sharded))
    timed = runs[1:]
    walls = fd.all_gather_object(statistics.median(w for w, _ in timed), "gathering walls")
    if rank == 0:
        costs = target_costs(gm)
        shares = timed[0][1].shares
        result = {
            "shares": [len(s) for s in shares],
            "cost": [sum(costs[t] for t in s) / sum(costs.values()) for s in shares],
            "record": [statistics.median(s.record_seconds[r] for _, s in timed)
                       for r in range(world)],
            "solve": [statistics.median(s.solve_seconds[r] for _, s in timed)
                      for r in range(world)],
            "wall": walls,
        }
        timed[0][1].report.save(out / f"report{world}.safetensors")
        (out / f"world{world}.json").write_text(json.dumps(result))
    fd.shutdown()


def _bitwise_equal(a: Path, b: Path) -> bool:
    from fxgrow.passes.analysis.report import SplittingReport

    x, y = SplittingReport.load(a), SplittingReport.load(b)
    return x.targets == y.targets and all(
        torch.equal(x.eigenvalues[t], y.eigenvalues[t]) for t in x.targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(_MODELS), default="deit_small_reduced")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        results = {}
        for world in args.worlds:
            mp.spawn(_rank, args=(world, _free_port(), args, out), nprocs=world, join=True)
            results[world] = json.loads((out / f"world{world}.json").read_text())
        base = results[args.worlds[0]]
        reference = out / f"report{args.worlds[0]}.safetensors"
        print(f"{args.model}, batch {args.batch}, torch {torch.__version__}, 1 thread per "
              f"rank, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
        print(f"{'ranks':>5} {'rank':>4} {'targets':>7} {'cost':>6} {'record s':>9} "
              f"{'solve s':>8} {'wall s':>7}")
        for world, r in results.items():
            for rank in range(world):
                print(f"{world:>5} {rank:>4} {r['shares'][rank]:>7} {r['cost'][rank]:>6.2f} "
                      f"{r['record'][rank]:>9.2f} {r['solve'][rank]:>8.2f} "
                      f"{r['wall'][rank]:>7.2f}")
        print(f"\nratios to {args.worlds[0]} rank(s): max-rank solve, max-rank record, "
              f"max-rank wall; report bitwise equal")
        for world, r in results.items():
            print(f"{world:>5}: solve {max(r['solve']) / max(base['solve']):.2f}  "
                  f"record {max(r['record']) / max(base['record']):.2f}  "
                  f"wall {max(r['wall']) / max(base['wall']):.2f}  "
                  f"{_bitwise_equal(out / f'report{world}.safetensors', reference)}")


if __name__ == "__main__":
    main()
