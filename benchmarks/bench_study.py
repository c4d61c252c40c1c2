"""The full study (fxgrow.training.study.full_spec): the six conditions and five variants
(paper table 3's reduction grid, table 4's scaling interval, fused against paper pairs) x
four seeds of the ``make demo`` ViT at 16x16 on scikit-learn's digits and on the
teacher-student task, each data set in its own study directory. Resumable: rerun the same
command to continue; a finished run is skipped. Prints each study's report (mean ± std over
seeds, paired differences against the splitting condition) when its runs are done, then the
total wall time and the load average at start and end.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_study.py [--out runs/study-full]
     [--data digits teacher] [--seeds 0 1 2 3] [--conditions full base ...]
The two data sets can run as two processes (``--data digits`` and ``--data teacher``); a
part of the matrix (``--seeds``, ``--conditions``) writes a study directory of its own, whose
run directories can be moved into the full study's ``runs/`` (``fxgrow study --report``
then tabulates them).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from fxgrow.training import study


def _load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/study-full", help="parent of the study dirs")
    parser.add_argument("--data", nargs="+", default=["digits", "teacher"],
                        choices=("digits", "teacher"))
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--conditions", nargs="+", default=None,
                        help="among the six conditions and the variants of full_spec")
    args = parser.parse_args()
    begun = time.perf_counter()
    print(f"start {time.strftime('%H:%M:%S')}: {_load()}", flush=True)
    for data in args.data:
        spec = study.full_spec(data)
        if args.seeds is not None:
            spec.seeds = args.seeds
        if args.conditions is not None:
            spec.conditions = args.conditions
        spec = study.StudySpec.from_dict(spec.to_dict())  # validates the edited matrix
        root = Path(args.out) / data
        started = time.perf_counter()
        study.run_study(spec, root, quiet=True,
                        log=lambda line: print(f"[{time.strftime('%H:%M:%S')}] {data} {line}",
                                               file=sys.stderr, flush=True))
        print((root / "report.md").read_text())
        print(f"{data}: {time.perf_counter() - started:.0f} s in this process; "
              f"study directory {root}\n", flush=True)
    print(f"end {time.strftime('%H:%M:%S')}: {time.perf_counter() - begun:.0f} s in total; "
          f"{_load()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
