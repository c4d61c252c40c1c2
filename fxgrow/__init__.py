"""fxgrow: grow transformers by exact, verified surgery on torch.fx graphs.

The pipeline (DESIGN.md section 1): ``trace`` -> ``passes.reduce`` -> train -> ``passes.analyze``
-> ``select`` -> ``passes.grow`` -> ``verify`` -> train ...
"""

from . import distributed, models, passes, verify
from .errors import (
    AnalysisError,
    CheckpointError,
    DataError,
    EquivalenceError,
    FxgrowError,
    ModelError,
    PlanError,
    ReduceError,
    ScheduleError,
    TraceError,
)
from .recipes import history, recipe
from .linears import LinearSite, linear_sites
from .plan import GrowthPlan
from .passes.analyze import SplittingReport
from .select import select
from .scaling import Scaler, ScalingSchedule
from .tracing import trace
from .io import load, save
from .inspect import GraphDiff, Summary, diff, summary
from .visualize import draw_growth

__version__ = "0.1.0"

__all__ = [
    "AnalysisError",
    "CheckpointError",
    "DataError",
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
    "select",
    "SplittingReport",
    "summary",
    "Summary",
    "trace",
    "TraceError",
    "verify",
]
