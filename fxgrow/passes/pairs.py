"""A grown pair is one growth candidate (docs/packing.md).

The two members of a pair read the same input and, since the pair acts only through the sum
of their values, receive the same gradient; their splitting matrices are therefore the same
and analysis would rank the twins together. Growing both would add two nested pseudo-layers
that start equal (zero sum), get equal gradients and so stay equal under SGD, Adam or AdamW:
twice the parameters and FLOPs of growing one for the same function class. So only the plus
member is a candidate: analysis leaves the minus member out of its default targets and
selection drops a minus member whose plus twin is in the same report.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch.fx as fx

from .grow import created_modules

_MINUS = re.compile(r"_grow\d+_minus$")


def second_members(gm: fx.GraphModule) -> set[str]:
    """The minus member of every pair ``grow`` created in ``gm`` (module paths)."""
    return {c.name for c in created_modules(gm) if c.role == "minus"}


def twin_of(target: str) -> str | None:
    """The plus twin of a minus member's target, by the names ``grow`` gives; else None."""
    if _MINUS.search(target) is None:
        return None
    return target[: -len("minus")] + "plus"


def without_second_members(targets: Iterable[str]) -> list[str]:
    """``targets`` without the minus members whose plus twin is among them, order kept."""
    targets = list(targets)
    present = set(targets)
    return [t for t in targets if twin_of(t) not in present]
