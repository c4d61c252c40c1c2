"""Replaying a pass history on a freshly built base (docs/saving.md).

A pass's history record is ``{"pass": name, "args": {...JSON...}}``. A *replayer* turns such a
record back into a call of the pass: ``replayer(gm, args) -> GraphModule``. ``fxgrow.load``
rebuilds the base model and feeds every record of the saved history through this registry,
so the structure comes back from data alone (no pickled code); weights are loaded afterwards.

A pass makes itself loadable with ``register_replay("my_pass", fn)`` (or as a decorator),
next to its own definition, as ``fxgrow.passes.reduce`` and ``fxgrow.passes.grow`` do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch.fx as fx

from ..errors import CheckpointError

Replayer = Callable[[fx.GraphModule, dict[str, Any]], fx.GraphModule]

_REPLAYERS: dict[str, Replayer] = {}


def register_replay(name: str, fn: Replayer | None = None) -> Any:
    """Register ``fn(gm, record_args) -> GraphModule`` as the replayer of pass ``name``.

    Usable as ``register_replay("name", fn)`` or as a decorator ``@register_replay("name")``.
    Registering a name again replaces the earlier replayer (so a reloaded module is harmless).
    """
    if fn is None:
        def decorator(func: Replayer) -> Replayer:
            _REPLAYERS[name] = func
            return func

        return decorator
    _REPLAYERS[name] = fn
    return fn


def registered_passes() -> list[str]:
    """The pass names that can be replayed, sorted."""
    return sorted(_REPLAYERS)


def replay_history(gm: fx.GraphModule, history: Iterable[dict[str, Any]]) -> fx.GraphModule:
    """Apply every record of ``history`` to ``gm`` in order and return the result.

    Raises:
        CheckpointError: a record that is malformed, names a pass with no replayer, or whose
            pass fails on this graph (the record's index and pass name are in the message).
    """
    for index, record in enumerate(history):
        if not isinstance(record, dict) or not isinstance(record.get("pass"), str):
            raise CheckpointError(
                f"history record {index} is malformed: expected {{'pass': name, 'args': {{...}}}},"
                f" got {record!r}"
            )
        name = record["pass"]
        args = record.get("args", {})
        if not isinstance(args, dict):
            raise CheckpointError(f"history record {index} ({name!r}): 'args' is not an object")
        replayer = _REPLAYERS.get(name)
        if replayer is None:
            raise CheckpointError(
                f"history record {index} names unknown pass {name!r}; passes that can be "
                f"replayed: {', '.join(registered_passes()) or 'none'} (a pass defined outside "
                f"fxgrow must be imported and registered with "
                f"fxgrow.passes.register_replay before loading)"
            )
        try:
            gm = replayer(gm, args)
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"replaying history record {index} (pass {name!r}) failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    return gm

