"""fxgrow: grow transformers by exact, verified surgery on torch.fx graphs.

The pipeline (DESIGN.md section 1): ``trace`` -> ``passes.reduce`` -> train -> ``passes.analyze``
-> ``select`` -> ``passes.grow`` -> ``verify`` -> train ...
"""

from . import models, passes, verify
from . import distributed
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
    "EquivalenceError",
    "FxgrowError",
    "GraphDiff",
    "GrowthPlan",
    "SplittingReport",
    "select",
    "LinearSite",
    "ModelError",
    "PlanError",
    "ReduceError",
    "ScheduleError",
    "Scaler",
    "ScalingSchedule",
    "Summary",
    "TraceError",
    "diff",
    "distributed",
    "draw_growth",
    "history",
    "linear_sites",
    "models",
    "load",
    "passes",
    "recipe",
    "save",
    "summary",
    "trace",
    "verify",
]
