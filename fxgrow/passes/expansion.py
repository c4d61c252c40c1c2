"""How an expansion pass (``widen``, ``deepen``) built each new parameter from an old one.

A :class:`ParamSource` says, per dimension of the new tensor, which old position each new
position reads (``-1``: none, the entry is zero), a coefficient per position, and a block id
per position: with block ids on two or more dimensions, an entry is kept only where they
agree (TripLe's ``st`` width operator is block-diagonal). So

    new[i_0, i_1, ...] = old[src_0[i_0], src_1[i_1], ...] * prod_d coef_d[i_d]
                         * [all block ids agree] * [no src is -1]

The same map applied to AdamW's ``exp_avg`` and ``exp_avg_sq`` is TripLe's "+m" optimizer
state (``fxgrow.training.expand``). A pass stores the maps of its result in
``gm.meta[EXPANSION_KEY]``; :func:`expansion_map` reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..errors import InternalError, WidenError

EXPANSION_KEY = "fxgrow_expansion"


@dataclass(frozen=True)
class ParamSource:
    """The map from one old parameter ``source`` to a new parameter of ``shape`` (see the
    module docstring). ``source`` None: a new parameter with no origin (fresh init)."""

    source: str | None
    shape: tuple[int, ...]
    index: tuple[torch.Tensor | None, ...] = field(default=())
    coef: tuple[torch.Tensor | None, ...] = field(default=())
    block: tuple[torch.Tensor | None, ...] = field(default=())
    zero: bool = False  # every entry zero (an identity block's zeroed parameter)
    template: str | None = None  # the old parameter whose optimizer group a new one joins

    @property
    def group_of(self) -> str | None:
        """The old parameter whose optimizer param group the new parameter joins."""
        return self.source if self.source is not None else self.template

    def apply(self, old: torch.Tensor) -> torch.Tensor:
        """The new tensor built from ``old`` (a parameter, or optimizer state of its shape)."""
        if self.zero:
            return torch.zeros(self.shape, dtype=old.dtype, device=old.device)
        out = old.detach()
        dims = len(self.shape)
        index = list(self.index) + [None] * (dims - len(self.index))
        coef = list(self.coef) + [None] * (dims - len(self.coef))
        block = list(self.block) + [None] * (dims - len(self.block))
        mask = None
        for d, src in enumerate(index):
            if src is None:
                continue
            src = src.to(out.device)
            out = out.index_select(d, src.clamp(min=0))
            if bool((src < 0).any()):
                keep = (src >= 0).to(out.dtype).reshape([-1 if x == d else 1 for x in range(dims)])
                mask = keep if mask is None else mask * keep
        for d, c in enumerate(coef):
            if c is not None:
                shaped = c.to(out.device, out.dtype).reshape([-1 if x == d else 1 for x in range(dims)])
                mask = shaped if mask is None else mask * shaped
        blocked = [(d, b) for d, b in enumerate(block) if b is not None]
        if len(blocked) >= 2:
            (d0, b0), rest = blocked[0], blocked[1:]
            first = b0.to(out.device).reshape([-1 if x == d0 else 1 for x in range(dims)])
            agree = torch.ones((), dtype=torch.bool, device=out.device)
            for d, b in rest:
                agree = agree & (first == b.to(out.device).reshape(
                    [-1 if x == d else 1 for x in range(dims)]))
            agree = agree.to(out.dtype)
            mask = agree if mask is None else mask * agree
        if mask is not None:
            out = out * mask
        if tuple(out.shape) != tuple(self.shape):
            raise InternalError(f"mapped {self.source!r} to shape "
                              f"{tuple(out.shape)}, expected {self.shape}")
        out = out.contiguous()
        return out.clone() if out.data_ptr() == old.data_ptr() else out


def expansion_map(gm: fx.GraphModule) -> dict[str, ParamSource]:
    """``{new parameter name: ParamSource}`` of the expansion pass that produced ``gm``.
    Parameters shared with the pass's input (the same tensor object) are not listed."""
    stored = getattr(gm, "meta", {}).get(EXPANSION_KEY)
    if stored is None:
        raise WidenError("this GraphModule was not produced by widen or deepen (no expansion map)")
    return dict(stored["params"])


def set_expansion_map(gm: fx.GraphModule, pass_name: str, params: dict[str, ParamSource]) -> None:
    gm.meta[EXPANSION_KEY] = {"pass": pass_name, "params": dict(params)}
