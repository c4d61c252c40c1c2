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

import json
import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointError


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class RunDir:
    """A run directory. A new run refuses a path that exists (nothing is overwritten); a
    resumed run needs one holding ``config.json``."""

    def __init__(self, path: str | os.PathLike, *, resume: bool = False) -> None:
        self.path = Path(path)
        if resume:
            if not (self.path / "config.json").is_file():
                raise CheckpointError(f"cannot resume: {str(self.path)!r} is not a run directory "
                                      f"(no config.json)")
        elif self.path.exists():
            raise CheckpointError(
                f"run directory {str(self.path)!r} already exists; pass --resume to continue it "
                f"or choose another directory (nothing was written)"
            )

    def create(self, config: dict[str, Any]) -> None:
        self.path.mkdir(parents=True)
        (self.path / "plots").mkdir()
        _atomic_write(self.path / "config.json", json.dumps(config, indent=1, sort_keys=True))

    def config(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{self.path}/config.json is unreadable: {exc}") from exc

    def write_metrics(self, metrics: list[dict[str, Any]]) -> None:
        _atomic_write(self.path / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))

    def write_growth(self, records: list[dict[str, Any]]) -> None:
        _atomic_write(self.path / "growth.jsonl", "".join(json.dumps(r) + "\n" for r in records))

    def read_jsonl(self, name: str) -> list[dict[str, Any]]:
        path = self.path / name
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

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


def summary_table(metrics: list[dict[str, Any]], records: list[dict[str, Any]]) -> str:
    """The table printed at the end of a run: per epoch, with growth rounds marked."""
    grown = {r["epoch"]: r for r in records if r.get("grown")}
    lines = [f"{'epoch':>5} {'loss':>8} {'val loss':>8} {'top-1':>7} {'top-5':>7} "
             f"{'params':>10} {'MFLOPs':>9} {'lr':>9}  growth"]
    for m in metrics:
        note = ""
        if m["epoch"] in grown:
            r = grown[m["epoch"]]
            note = (f"+{r['params_after'] - r['params_before']} params, "
                    f"loss equal: {r['loss_equal']}")
        lines.append(
            f"{m['epoch'] + 1:>5} {m['train_loss']:>8.4f} {m['val_loss']:>8.4f} "
            f"{m['top1']:>7.2f} {m['top5']:>7.2f} {m['params']:>10,} {m['flops'] / 1e6:>9.2f} "
            f"{m['lr']:>9.2e}  {note}"
        )
    return "\n".join(lines)
