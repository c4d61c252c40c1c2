"""The figures of a study report (:mod:`fxgrow.training.study`): learning curves, the
paper's figure 2 (negative splitting eigenvalues of the first block's qkv and fc1 at every
growth round) and depth heterogeneity (per layer, how many neurons reached which depth).

Figures are bare matplotlib ``Figure`` objects (no pyplot state), saved as PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

def _figure(rows: int, cols: int, width: float, height: float, bottom: float = 0.6):
    # Fixed margins in inches (tight_layout costs more than drawing these figures).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height * rows + bottom))
    total = height * rows + bottom
    fig.subplots_adjust(left=0.7 / (width * cols), right=1 - 0.2 / (width * cols),
                        bottom=bottom / total, top=1 - 0.45 / total,
                        hspace=0.75, wspace=0.3)
    return fig, fig.subplots(rows, cols, squeeze=False)


def _grew(run: dict[str, Any]) -> bool:
    # A grown condition, one of the rules or a variant, is known by its growth records.
    return bool(run["eigenvalues"])


def _by_condition(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(runs, key=lambda r: r["seed"]):
        grouped.setdefault(r["condition"], []).append(r)
    return grouped


def learning_curves(runs: list[dict[str, Any]], path: Path) -> Path:
    """Validation top-1 and loss per epoch: per condition the mean over seeds (over the
    seeds that reached the epoch) and a min..max band."""
    fig, axes = _figure(1, 2, 6.0, 4.0)
    for index, (condition, group) in enumerate(_by_condition(runs).items()):
        # matplotlib cycles 10 colours: the six conditions and the variants need more.
        style = ("-", "--", ":")[index // 10 % 3]
        for ax, key in zip(axes[0], ("top1", "val_loss")):
            length = max(len(r["curve"][key]) for r in group)
            epochs, mean, low, high = [], [], [], []
            for e in range(length):
                values = [r["curve"][key][e] for r in group if len(r["curve"][key]) > e]
                epochs.append(e + 1)
                mean.append(sum(values) / len(values))
                low.append(min(values))
                high.append(max(values))
            line, = ax.plot(epochs, mean, style, label=f"{condition} (n={len(group)})")
            ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.15)
    axes[0][0].set_ylabel("validation top-1 (%)")
    axes[0][1].set_ylabel("validation loss")
    for ax in axes[0]:
        ax.set_xlabel("epoch")
    axes[0][0].legend(fontsize=8)
    fig.savefig(path, dpi=90)
    return path


def figure2_targets(targets: list[str]) -> list[str]:
    """The first block's qkv and fc1 as figure 2 plots them: the first target ending in
    ``qkv`` and the first ending in ``fc1`` (else the first two targets)."""
    chosen = [next((t for t in targets if t.endswith(suffix)), None) for suffix in ("qkv", "fc1")]
    chosen = [t for t in chosen if t is not None]
    return chosen if len(chosen) == 2 else targets[:2]


def eigenvalues(run_dir: Path, title: str, path: Path) -> Path | None:
    """Figure 2 for one run: per growth round (rows) and target (columns), the magnitude of
    every negative eigenvalue, neuron by neuron, from the run's saved round reports."""
    from ..passes.analysis import SplittingReport

    files = sorted((run_dir / "reports").glob("round*.safetensors"),
                   key=lambda p: int(p.stem[len("round"):]))
    if not files:
        return None
    reports = [SplittingReport.load(f) for f in files]
    targets = figure2_targets(reports[0].targets)
    fig, axes = _figure(len(reports), len(targets), 5.0, 1.9)
    for row, (file, report) in enumerate(zip(files, reports)):
        for col, target in enumerate(targets):
            ax = axes[row][col]
            values = report.eigenvalues[target].double()
            negative = (values < 0).nonzero().flatten()
            ax.vlines(negative.numpy(), 0.0, (-values[negative]).numpy(), color="tab:red")
            ax.set_xlim(-0.5, values.numel() - 0.5)
            ax.set_title(f"{file.stem}: {target}, {negative.numel()}/{values.numel()} negative",
                         fontsize=8)
            ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("neuron")
    fig.suptitle(f"{title}: |negative eigenvalue| per neuron", fontsize=9)
    fig.savefig(path, dpi=90)
    return path


def eigenvalue_trend(runs: list[dict[str, Any]], path: Path) -> Path | None:
    """Per grown condition, the most negative eigenvalue of the figure-2 targets at every
    round, mean over seeds (growth.jsonl's per-layer statistics)."""
    grouped = {c: [r for r in g if _grew(r)] for c, g in _by_condition(runs).items()}
    grouped = {c: g for c, g in grouped.items() if g}
    if not grouped:
        return None
    first = next(r for g in grouped.values() for r in g if r["eigenvalues"])
    targets = figure2_targets(list(first["eigenvalues"][0]["stats"]))
    fig, axes = _figure(1, len(targets), 5.0, 3.4)
    for condition, group in grouped.items():
        for ax, target in zip(axes[0], targets):
            rounds = max(len(r["eigenvalues"]) for r in group)
            xs, ys = [], []
            for k in range(rounds):
                values = [r["eigenvalues"][k]["stats"][target]["min"] for r in group
                          if len(r["eigenvalues"]) > k]
                xs.append(group[0]["eigenvalues"][k]["epoch"] + 1 if
                          len(group[0]["eigenvalues"]) > k else k)
                ys.append(sum(values) / len(values))
            ax.plot(xs, ys, marker="o", label=condition)
    for ax, target in zip(axes[0], targets):
        ax.set_title(f"{target}: smallest eigenvalue at each round", fontsize=9)
        ax.set_xlabel("epochs completed")
        ax.axhline(0.0, color="grey", linewidth=0.8)
    axes[0][0].legend(fontsize=8)
    fig.savefig(path, dpi=90)
    return path


def depths(run_dir: Path, title: str, path: Path) -> Path | None:
    """Depth heterogeneity of one run's final model: per layer of the base, stacked counts of
    neurons at depth 0 (never grown), 1, 2, ..."""
    from .study import run_depths

    per_layer = run_depths(run_dir)
    if per_layer is None:
        return None
    deepest = max((max(v) for v in per_layer.values() if v), default=0)
    fig, axes = _figure(1, 1, max(6.0, 0.45 * len(per_layer)), 3.0, bottom=1.6)
    ax = axes[0][0]
    names = list(per_layer)
    bottom = [0] * len(names)
    for d in range(deepest + 1):
        counts = [per_layer[t].count(d) for t in names]
        ax.bar(range(len(names)), counts, bottom=bottom, label=f"depth {d}")
        bottom = [b + c for b, c in zip(bottom, counts)]
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=70, fontsize=7, ha="right")
    ax.set_ylabel("neurons")
    ax.set_title(f"{title}: neurons per depth, per layer", fontsize=9)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=90)
    return path


def plot_all(study_dir: Path, runs: list[dict[str, Any]]) -> list[Path]:
    """Every figure of the report into ``study_dir/plots``; returns the paths written."""
    from .study import run_name

    out = study_dir / "plots"
    out.mkdir(exist_ok=True)
    written = [learning_curves(runs, out / "learning_curves.png"),
               eigenvalue_trend(runs, out / "eigenvalue_trend.png")]
    for condition, group in _by_condition(runs).items():
        first = next((r for r in group if _grew(r)), None)
        if first is None:
            continue
        name = run_name(condition, first["seed"])
        run_dir = study_dir / "runs" / name
        written.append(eigenvalues(run_dir, name, out / f"eigenvalues_{name}.png"))
        written.append(depths(run_dir, name, out / f"depth_{name}.png"))
    return [p for p in written if p is not None]
