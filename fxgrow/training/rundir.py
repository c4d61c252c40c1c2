"""The run directory: config, per-epoch metrics, growth records, plots and checkpoints.

::

    RUN_DIR/config.json       the run's configuration (resume checks checkpoints against it)
    RUN_DIR/metrics.jsonl     one JSON line per epoch: loss, top-1, top-5, params, FLOPs, lr, time
    RUN_DIR/growth.jsonl      one JSON line per growth round: plan size per layer, eigenvalue
                              statistics, params/FLOPs before and after, loss before and after
                              growth (and their float.hex, which must match), equivalence check
    RUN_DIR/plots/*.png       accuracy, parameters and FLOPs over epochs; eigenvalues per round
    RUN_DIR/reports/round{r}.safetensors  the splitting report of growth round r (every
                              neuron's eigenvalue; fxgrow.SplittingReport.load reads it)
    RUN_DIR/checkpoints/      see fxgrow.training.checkpoint

The JSONL files are rewritten whole (atomically) from the run's state, so after a resume they
hold exactly the epochs of the checkpoint the run continued from, plus the new ones.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import Any

from .. import _fsio
from ..errors import CheckpointError, RunLockedError

LOCK_FILE = ".lock"


class RunDir:
    """A run directory. A new run refuses a path that exists (nothing is overwritten); a
    resumed run needs one holding ``config.json``.

    One writer at a time: :meth:`create` and :meth:`lock` take an exclusive ``flock`` on
    ``RUN_DIR/.lock``, held until :meth:`unlock` or the process ends. The kernel releases it
    when its holder exits in any way, SIGKILL included, so a lock is never stale.
    """

    def __init__(self, path: str | os.PathLike, *, resume: bool = False) -> None:
        self.path = Path(path)
        self._lock_fd: int | None = None
        if resume:
            if not (self.path / "config.json").is_file():
                raise CheckpointError(f"cannot resume: {str(self.path)!r} is not a run directory "
                                      f"(no config.json)")
        elif self.path.exists() or self.path.is_symlink():
            raise CheckpointError(
                f"run directory {str(self.path)!r} already exists; pass --resume to continue it "
                f"or choose another directory (nothing was written)"
            )

    def create(self, config: dict[str, Any]) -> None:
        """Make the directory with its ``config.json`` in one rename (a run killed while
        creating it leaves either nothing or a directory that resumes), locked."""
        with _fsio.storage_errors(f"creating the run directory {self.path}"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _fsio.make_temp_dir(self.path.parent, f".{self.path.name}.tmp-")
            try:
                (tmp / "plots").mkdir()
                _fsio.atomic_write(tmp / "config.json", json.dumps(config, indent=1,
                                                                   sort_keys=True))
                self._lock_fd = _take_lock(tmp / LOCK_FILE, self.path)
                try:
                    os.rename(tmp, self.path)  # fails if a concurrent run created it first
                except OSError:
                    self.unlock()
                    if self.path.exists():
                        raise CheckpointError(
                            f"run directory {str(self.path)!r} was created by another process "
                            f"meanwhile (nothing was written)") from None
                    raise
                _fsio.fsync_path(self.path.parent)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)

    def lock(self) -> None:
        """Take the writer's lock of an existing run directory.

        Raises:
            RunLockedError: another live process holds it.
        """
        if self._lock_fd is None:
            with _fsio.storage_errors(f"locking the run directory {self.path}"):
                self._lock_fd = _take_lock(self.path / LOCK_FILE, self.path)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def config(self) -> dict[str, Any]:
        try:
            config = json.loads((self.path / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{self.path}/config.json is unreadable: {exc}") from exc
        if not isinstance(config, dict):
            raise CheckpointError(f"{self.path}/config.json is not a run configuration")
        return config

    def write_metrics(self, metrics: list[dict[str, Any]]) -> None:
        _fsio.atomic_write(self.path / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))

    def write_growth(self, records: list[dict[str, Any]]) -> None:
        _fsio.atomic_write(self.path / "growth.jsonl", "".join(json.dumps(r) + "\n" for r in records))

    def read_jsonl(self, name: str) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl`` or ``growth.jsonl`` (none if the file is absent)."""
        path = self.path / name
        if not path.is_file():
            return []
        try:
            records = [json.loads(line) for line in
                       path.read_text(encoding="utf-8").splitlines() if line]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path} is unreadable: {exc}") from exc
        if not all(isinstance(r, dict) for r in records):
            raise CheckpointError(f"{path} holds a line that is not a JSON object")
        return records

    def plot_metrics(self, metrics: list[dict[str, Any]], growth_epochs: list[int]) -> Path:
        """Accuracy, parameters and FLOPs over epochs, growth rounds marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [m["epoch"] + 1 for m in metrics]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        axes[0].plot(epochs, [m["top1"] for m in metrics], label="top-1")
        axes[0].plot(epochs, [m["top5"] for m in metrics], label="top-5")
        axes[0].set_ylabel("validation accuracy (%)")
        axes[0].legend()
        axes[1].plot(epochs, [m["params"] / 1e6 for m in metrics])
        axes[1].set_ylabel("parameters (M)")
        axes[2].plot(epochs, [m["flops"] / 1e6 for m in metrics])
        axes[2].set_ylabel("FLOPs per image (M)")
        for ax in axes:
            ax.set_xlabel("epoch")
            for grown in growth_epochs:
                ax.axvline(grown + 1, color="grey", linestyle=":", linewidth=1)
        fig.tight_layout()
        out = self.path / "plots" / "metrics.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out

    def save_report(self, report: Any, round_index: int) -> Path:
        """The analysis report of one growth round, every neuron's eigenvalue included
        (growth.jsonl keeps only per-layer statistics)."""
        out = self.path / "reports" / f"round{round_index}.safetensors"
        out.parent.mkdir(exist_ok=True)
        report.save(out)
        return out

    def plot_round(self, report: Any, round_index: int) -> Path:
        """The analysis report's eigenvalue plot of one growth round."""
        import matplotlib.pyplot as plt

        out = self.path / "plots" / f"eigenvalues_round{round_index}.png"
        figure = report.plot(path=str(out))
        if figure is not None:
            plt.close(figure)
        return out


def _take_lock(path: Path, run: Path) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = ""
        with contextlib.suppress(OSError):
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        os.close(fd)
        raise RunLockedError(
            f"run directory {str(run)!r} is in use by another fxgrow process (pid "
            f"{holder or 'unknown'}); wait for it to finish or stop it first (nothing was "
            f"written)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
    return fd


def summary_table(metrics: list[dict[str, Any]], records: list[dict[str, Any]]) -> str:
    """The table printed at the end of a run: per epoch, with growth rounds marked."""
    grown = {r["epoch"]: r for r in records if r.get("grown")}
    skipped = {r["epoch"]: r["why_not_grown"] for r in records if r.get("why_not_grown")}
    lines = [f"{'epoch':>5} {'loss':>8} {'val loss':>8} {'top-1':>7} {'top-5':>7} "
             f"{'params':>10} {'MFLOPs':>9} {'lr':>9}  growth"]
    for m in metrics:
        note = ""
        if m["epoch"] in grown:
            r = grown[m["epoch"]]
            note = (f"+{r['params_after'] - r['params_before']} params, "
                    f"loss equal: {r['loss_equal']}")
        elif m["epoch"] in skipped:
            note = f"no growth: {skipped[m['epoch']]}"
        lines.append(
            f"{m['epoch'] + 1:>5} {m['train_loss']:>8.4f} {m['val_loss']:>8.4f} "
            f"{m['top1']:>7.2f} {m['top5']:>7.2f} {m['params']:>10,} {m['flops'] / 1e6:>9.2f} "
            f"{m['lr']:>9.2e}  {note}"
        )
    return "\n".join(lines)
