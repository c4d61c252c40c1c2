"""The splitting analysis (docs/splitting.md): ``splitting`` is the pass, built from
``targets`` (which linears), ``recording`` (the recording copy and the batch stream),
``statistics`` (accumulators), ``solve`` and ``eigen`` (the eigensolvers, docs/lanczos.md),
``gemm`` (float32 GEMMs through oneDNN) and ``report`` (the result)."""

from .splitting import SplittingReport, analyze, default_targets, splitting_matrices

__all__ = ["analyze", "default_targets", "splitting_matrices", "SplittingReport"]
