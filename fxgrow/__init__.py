"""fxgrow: grow transformers by exact, verified surgery on torch.fx graphs.

The pipeline (docs/passes.md): ``trace`` -> ``passes.reduce`` -> train -> ``passes.analyze``
-> ``select`` -> ``passes.grow`` -> ``verify`` -> train ...
"""

from . import inspection, models, passes, verify
from .errors import (
    AnalysisError,
    CheckpointError,
    DataError,
    DeepenError,
    EquivalenceError,
    FxgrowError,
    ModelError,
    PlanError,
    ReduceError,
    ScheduleError,
    StudyError,
    TraceError,
    WidenError,
)
from .recipes import history, recipe
from .linears import LinearSite, linear_sites
from .plan import GrowthPlan
from .passes.analysis import SplittingReport
from .select import select, why_nothing_selected
from .tracing import trace
from .io import load, save
from .inspection import GraphDiff, Summary, diff, draw_growth, summary

__version__ = "0.1.0"

# The training side is imported on first use, so that the graph side (tracing, passes,
# verification, saving) loads without it.
def __getattr__(name: str):
    import importlib

    if name == "training":
        return importlib.import_module(".training", __name__)
    if name == "distributed":
        return importlib.import_module(".training.distributed", __name__)
    if name in ("Scaler", "ScalingSchedule", "TripleScaler", "TripleSchedule"):
        return getattr(importlib.import_module(".training", __name__), name)
    raise AttributeError(f"module 'fxgrow' has no attribute {name!r}")


__all__ = [
    "AnalysisError",
    "CheckpointError",
    "DataError",
    "DeepenError",
    "diff",
    "distributed",
    "draw_growth",
    "EquivalenceError",
    "FxgrowError",
    "GraphDiff",
    "GrowthPlan",
    "history",
    "linear_sites",
    "LinearSite",
    "load",
    "ModelError",
    "models",
    "passes",
    "PlanError",
    "recipe",
    "ReduceError",
    "save",
    "Scaler",
    "ScalingSchedule",
    "ScheduleError",
    "TripleScaler",
    "TripleSchedule",
    "select",
    "StudyError",
    "why_nothing_selected",
    "SplittingReport",
    "summary",
    "Summary",
    "trace",
    "TraceError",
    "training",
    "verify",
    "WidenError",
]
