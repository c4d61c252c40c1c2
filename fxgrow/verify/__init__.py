"""Verification: parameter and FLOP accounting, and equivalence of two graphs."""

from .equivalence import EquivalenceReport, assert_equivalent, check_equivalence
from .flops import FlopCrossCheck, FlopReport, count_flops, cross_check_flops, torch_flops
from .params import count_params, params_by_module

__all__ = [
    "assert_equivalent",
    "check_equivalence",
    "count_flops",
    "count_params",
    "cross_check_flops",
    "EquivalenceReport",
    "FlopCrossCheck",
    "FlopReport",
    "params_by_module",
    "torch_flops",
]
