"""fxgrow: grow transformers by exact, verified surgery on torch.fx graphs.

The pipeline (DESIGN.md section 1): ``trace`` -> ``passes.reduce`` -> train -> ``passes.analyze``
-> ``select`` -> ``passes.grow`` -> ``verify`` -> train ...
"""

from . import passes, verify
from .errors import (
    AnalysisError,
    CheckpointError,
    DataError,
    EquivalenceError,
    FxgrowError,
    PlanError,
    ReduceError,
    ScheduleError,
    TraceError,
)
from .recipes import history, recipe
from .linears import LinearSite, linear_sites
from .tracing import trace

__version__ = "0.1.0"

__all__ = [
    "AnalysisError",
    "CheckpointError",
    "DataError",
    "EquivalenceError",
    "FxgrowError",
    "LinearSite",
    "PlanError",
    "ReduceError",
    "ScheduleError",
    "TraceError",
    "history",
    "linear_sites",
    "passes",
    "recipe",
    "trace",
    "verify",
]
