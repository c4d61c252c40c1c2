"""The training side: scaling schedules, optimizer surgery, the trainer, checkpoints, DDP, data.

The graph side of fxgrow (tracing, passes, verification, plans, saving, inspection) never
imports this package.
"""

from .scaler import Scaler, ScalingSchedule

__all__ = ["Scaler", "ScalingSchedule"]
