"""Inspection of graphs: per-node summaries, graph diffs and drawings of grown subgraphs."""

from .draw import draw_growth
from .diff import GraphDiff, diff
from .summary import Summary, summary

__all__ = ["diff", "draw_growth", "GraphDiff", "summary", "Summary"]
