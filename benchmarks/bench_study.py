"""The full study (fxgrow.training.study.full_spec): six conditions x three seeds of the
``make demo`` ViT at 16x16 on scikit-learn's digits and on the teacher-student task, each
data set in its own study directory. Resumable: rerun the same command to continue; a
finished run is skipped. Prints each study's report (mean ± std over seeds, paired
differences against the splitting condition) when its runs are done.

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_study.py [--out runs/study-full]
     [--data digits teacher] [--seeds 0 1 2] [--conditions full base ...]
The two data sets can run as two processes (``--data digits`` and ``--data teacher``); a
part of the matrix (``--seeds``, ``--conditions``) writes a study directory of its own, whose
run directories can be moved into the full study's ``runs/`` (``fxgrow study --report``
then tabulates them).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fxgrow.training import study


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/study-full", help="parent of the study dirs")
    parser.add_argument("--data", nargs="+", default=["digits", "teacher"],
                        choices=("digits", "teacher"))
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--conditions", nargs="+", default=None, choices=study.CONDITIONS)
    args = parser.parse_args()
    for data in args.data:
        spec = study.full_spec(data)
        if args.seeds is not None:
            spec.seeds = args.seeds
        if args.conditions is not None:
            spec.conditions = args.conditions
        root = Path(args.out) / data
        started = time.perf_counter()
        study.run_study(spec, root, quiet=True,
                        log=lambda line: print(f"[{time.strftime('%H:%M:%S')}] {data} {line}",
                                               file=sys.stderr, flush=True))
        print((root / "report.md").read_text())
        print(f"{data}: {time.perf_counter() - started:.0f} s in this process; "
              f"study directory {root}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
