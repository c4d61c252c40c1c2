"""The recipe a GraphModule carries: the spec of its base model and the passes applied since.

It lives in ``gm.meta["fxgrow"]`` as plain JSON data, so that a model can be rebuilt from
its base and its history (docs/passes.md, docs/saving.md) without pickling any code.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import torch.fx as fx

META_KEY = "fxgrow"


def recipe(gm: fx.GraphModule) -> dict[str, Any]:
    """Return a copy of ``gm``'s recipe: ``{"base": spec or None, "history": [records]}``."""
    stored = getattr(gm, "meta", {}).get(META_KEY)
    if stored is None:
        return {"base": None, "history": []}
    return copy.deepcopy(stored)


def history(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """The passes applied to ``gm`` since its base, oldest first."""
    return recipe(gm)["history"]


def set_base(gm: fx.GraphModule, spec: dict[str, Any] | None) -> None:
    """Record how to rebuild ``gm``'s base model (a JSON-serialisable spec)."""
    if spec is not None:
        json.dumps(spec)  # fail here, not at save time, on a spec that cannot be stored
    data = recipe(gm)
    data["base"] = copy.deepcopy(spec)
    gm.meta[META_KEY] = data


def inherit(source: fx.GraphModule, result: fx.GraphModule, record: dict[str, Any] | None) -> None:
    """Give ``result`` the recipe of ``source`` plus ``record`` (a pass name and its arguments)."""
    data = recipe(source)
    if record is not None:
        json.dumps(record)
        data["history"].append(copy.deepcopy(record))
    result.meta[META_KEY] = data
