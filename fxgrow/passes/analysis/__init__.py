"""The splitting analysis: recording nodes, splitting-matrix statistics and the eigensolver."""

from .splitting import SplittingReport, analyze, default_targets, splitting_matrices

__all__ = ["analyze", "default_targets", "splitting_matrices", "SplittingReport"]
