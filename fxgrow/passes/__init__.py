"""Graph passes. Each takes a GraphModule and returns a new one; the input is never mutated."""

from .deepen import deepen
from .expansion import ParamSource, expansion_map
from .analysis import SplittingReport, analyze, default_targets, splitting_matrices
from .grow import grow, grow_lineage, replay_grow
from .pack import exact_form, fold, is_packed, pack, unpack
from .replay import register_replay, registered_passes, replay_history
from .reduce import ReduceSpec, reduce, replay_reduce
from .width_groups import WidthGroup, width_groups
from .widen import widen

__all__ = [
    "analyze",
    "deepen",
    "default_targets",
    "exact_form",
    "expansion_map",
    "fold",
    "grow",
    "grow_lineage",
    "is_packed",
    "pack",
    "ParamSource",
    "reduce",
    "ReduceSpec",
    "register_replay",
    "registered_passes",
    "replay_grow",
    "replay_history",
    "replay_reduce",
    "splitting_matrices",
    "SplittingReport",
    "unpack",
    "width_groups",
    "WidthGroup",
    "widen",
]
