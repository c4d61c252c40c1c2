"""The training side: scaling schedules, optimizer surgery, the trainer, checkpoints, DDP, data,
and experiment matrices (study).

The graph side of fxgrow (tracing, passes, verification, plans, saving, inspection) never
imports this package.
"""

from .expand import expand_optimizer
from .scaler import Scaler, ScalingSchedule
from .triple import TripleScaler, TripleSchedule

__all__ = ["expand_optimizer", "Scaler", "ScalingSchedule", "TripleScaler", "TripleSchedule"]
