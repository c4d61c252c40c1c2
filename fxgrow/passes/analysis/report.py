"""The result of the splitting analysis: per target linear, the smallest eigenvalue of each
neuron's splitting matrix, with its save/load (safetensors, no pickle) and plots."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...errors import AnalysisError

_FORMAT = "fxgrow.SplittingReport"
_VERSION = 1


@dataclass
class SplittingReport:
    """Per target linear: the smallest splitting-matrix eigenvalue of every neuron.

    All dicts are keyed by target, in the order the targets appear in the graph.
    ``eigenvalues[t]`` is a float64 tensor (out_features,), ``eigenvectors[t]`` (present
    only when requested) is (out_features, fan_in + bias) with unit rows, ``tokens[t]`` the
    number of tokens the statistics saw, ``reservoir[t]`` how many of them the fast method
    kept, ``nonconverged[t]`` how many neurons the iterative solver left unconverged.
    ``settings`` records the form, method and the other arguments of :func:`analyze`.
    ``seconds`` is how long the call spent recording and solving (``{"record": s, "solve":
    s}``; a measurement, not a result: it is neither saved nor compared)."""

    eigenvalues: dict[str, torch.Tensor]
    fan_in: dict[str, int]
    bias: dict[str, bool]
    tokens: dict[str, int]
    reservoir: dict[str, int]
    nonconverged: dict[str, int]
    settings: dict[str, Any]
    eigenvectors: dict[str, torch.Tensor] | None = None
    seconds: dict[str, float] | None = field(default=None, compare=False)

    @property
    def targets(self) -> list[str]:
        return list(self.eigenvalues)

    def neuron_cost(self, target: str) -> int:
        """Parameters that growing one neuron of ``target`` adds (paper mode): 2 (d + 1)
        with a bias, 2 d without."""
        return 2 * (self.fan_in[target] + int(self.bias[target]))

    def save(self, path: str | Path) -> None:
        """Write the report to one safetensors file at ``path``: the tensors, and the rest
        as JSON in the file's metadata (no pickle)."""
        from safetensors.torch import save_file

        tensors = {f"eigenvalues/{t}": v.contiguous() for t, v in self.eigenvalues.items()}
        if self.eigenvectors is not None:
            tensors.update(
                {f"eigenvectors/{t}": v.contiguous() for t, v in self.eigenvectors.items()}
            )
        meta = {
            "format": _FORMAT, "version": _VERSION, "targets": self.targets,
            "fan_in": self.fan_in, "bias": self.bias, "tokens": self.tokens,
            "reservoir": self.reservoir, "nonconverged": self.nonconverged,
            "settings": self.settings, "eigenvectors": self.eigenvectors is not None,
        }
        save_file({k: v.detach().cpu() for k, v in tensors.items()}, str(path),
                  metadata={"fxgrow": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> SplittingReport:
        """Read a report written by :meth:`save`."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["fxgrow"])
                if meta.get("format") != _FORMAT or meta.get("version") != _VERSION:
                    raise AnalysisError(f"{path} is not a version {_VERSION} splitting report")
                targets = meta["targets"]
                values = {t: f.get_tensor(f"eigenvalues/{t}") for t in targets}
                vectors = (
                    {t: f.get_tensor(f"eigenvectors/{t}") for t in targets}
                    if meta["eigenvectors"] else None
                )
        except (OSError, KeyError, ValueError, SafetensorError) as exc:
            raise AnalysisError(f"cannot read a splitting report from {path}: {exc}") from exc
        return cls(
            eigenvalues=values, fan_in=meta["fan_in"], bias=meta["bias"], tokens=meta["tokens"],
            reservoir=meta["reservoir"], nonconverged=meta["nonconverged"],
            settings=meta["settings"], eigenvectors=vectors,
        )

    def summary(self) -> str:
        """A text table: per target its neurons, negative ones, smallest eigenvalue, median,
        tokens and unconverged count."""
        head = f"{'target':<34} {'neurons':>7} {'neg':>5} {'min':>11} {'median':>11} " \
               f"{'tokens':>8} {'unconv':>6}"
        lines = [f"splitting report: form={self.settings.get('form')} "
                 f"method={self.settings.get('method')}", head, "-" * len(head)]
        for t, v in self.eigenvalues.items():
            neg = int((v < 0).sum())
            vmin = float(v.min()) if v.numel() else math.nan
            med = float(v.median()) if v.numel() else math.nan
            lines.append(f"{t:<34} {v.numel():>7} {neg:>5} {vmin:>11.3e} {med:>11.3e} "
                         f"{self.tokens[t]:>8} {self.nonconverged[t]:>6}")
        if self.eigenvalues and not any(bool(v.any()) for v in self.eigenvalues.values()):
            lines.append("every eigenvalue is exactly 0: no loss gradient reaches these layers "
                         "(a zero-initialised classifier head?); nothing can be selected")
        return "\n".join(lines)

    def plot(self, targets: Sequence[str] | None = None, path: str | Path | None = None):
        """Figure-2 style plot (paper section 5.5): the negative eigenvalues of each neuron
        of ``targets`` (default: the first two), one panel per target, neurons on the x axis
        and the eigenvalue's magnitude on the y axis. Saved to ``path`` when given; returns
        the matplotlib Figure."""
        # A bare Figure (no pyplot): no global figure registry, no backend switch; it renders
        # with Agg when saved.
        from matplotlib.figure import Figure

        targets = list(targets) if targets is not None else self.targets[:2]
        unknown = [t for t in targets if t not in self.eigenvalues]
        if unknown:
            raise AnalysisError(f"targets not in the report: {unknown}")
        fig = Figure(figsize=(8, 2.6 * max(1, len(targets))))
        axes = fig.subplots(len(targets), 1, squeeze=False)
        for ax, t in zip(axes[:, 0], targets):
            v = self.eigenvalues[t].double().cpu()
            idx = torch.nonzero(v < 0).flatten()
            ax.bar(idx.numpy(), (-v[idx]).numpy(), width=1.0, color="tab:red")
            ax.set_xlim(-0.5, v.numel() - 0.5)
            ax.set_title(f"{t}: {idx.numel()} of {v.numel()} neurons negative", fontsize=9)
            ax.set_xlabel("neuron")
            ax.set_ylabel("|negative eigenvalue|")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
        return fig


def merge_reports(parts: Sequence[SplittingReport], order: Sequence[str]) -> SplittingReport:
    """One report from reports of disjoint sets of targets analysed with the same settings
    (the shares of a sharded analysis, docs/distributed.md), its targets in ``order``.

    Raises:
        AnalysisError: no parts; parts whose settings or eigenvector choice differ; a target
            in two parts, or in ``order`` and in no part (or the reverse).
    """
    if not parts:
        raise AnalysisError("no reports to merge")
    first = parts[0]
    for part in parts[1:]:
        if part.settings != first.settings or (part.eigenvectors is None) != (
                first.eigenvectors is None):
            raise AnalysisError(f"reports to merge differ in their settings: "
                                f"{first.settings} vs {part.settings}")
    held = [t for part in parts for t in part.targets]
    if len(held) != len(set(held)) or set(held) != set(order) or len(order) != len(set(order)):
        raise AnalysisError(f"the reports to merge hold targets {held}, not each of "
                            f"{list(order)} once")
    owner = {t: part for part in parts for t in part.targets}

    def gathered(name: str) -> dict[str, Any]:
        return {t: getattr(owner[t], name)[t] for t in order}

    return SplittingReport(
        eigenvalues=gathered("eigenvalues"), fan_in=gathered("fan_in"), bias=gathered("bias"),
        tokens=gathered("tokens"), reservoir=gathered("reservoir"),
        nonconverged=gathered("nonconverged"), settings=dict(first.settings),
        eigenvectors=gathered("eigenvectors") if first.eigenvectors is not None else None,
    )
