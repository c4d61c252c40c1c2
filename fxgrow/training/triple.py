"""TripLe's serialized schedule: widen before training, grow the depth during it.

With depth expansion (``depth`` > the model's l blocks)::

    widen (before training) -> stage I: train at depth l for stage1_epochs
    -> deepen to L by copying the warmed-up blocks with their optimizer states ("+m")
    -> stage II: stage2_epochs with the old blocks, the patch embedding and the position
       embedding frozen -> stage III: train everything

Without it (TripLe's variant for width only, ``depth`` None or l): stage I trains the bottom
half of the blocks and only the operator's zero-initialised entries of the top half (the
z / z_s blocks of eq. 9, found by applying widen's parameter map to ones); stage II trains
those entries of the bottom half and all of the top half; stage III everything. A frozen
entry gets no gradient and is restored after each step, so weight decay does not move it.

:class:`TripleScaler` does this inside any loop (``fxgrow.training.trainer.fit`` calls it):
``start`` widens, ``after_step`` restores frozen entries, ``after_epoch`` changes stage and
may return a deeper model and a new optimizer (:func:`fxgrow.training.expand.expand_optimizer`).
It composes with neuron growth (:class:`fxgrow.training.scaler.Scaler`): a run may widen,
deepen and grow neurons.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .._ops import get_attr_value
from ..errors import ScheduleError
from .expand import expand_optimizer

_WIDTH_OPS = ("st", "b2b", "pad0")
_DEPTH_OPS = ("stck", "inpt", "st", "st_stck", "st_inpt")


@dataclass
class TripleSchedule:
    """``width``: the residual width to widen to before training (None: keep). ``depth``: the
    number of blocks after stage I (None: TripLe without depth expansion). ``carry_state``:
    "+m" (True) or "-m" (False) at every expansion. Stage lengths are in epochs."""

    width: int | None = None
    depth: int | None = None
    stage1_epochs: int = 1
    stage2_epochs: int = 1
    width_operator: str = "st"
    heads: str = "follow"
    depth_operator: str = "stck"
    carry_state: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("width", "depth"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value <= 0):
                raise ScheduleError(f"{name} must be a positive int or None, got {value!r}")
        for name in ("stage1_epochs", "stage2_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ScheduleError(f"{name} must be an int >= 0, got {value!r}")
        if self.width_operator not in _WIDTH_OPS:
            raise ScheduleError(f"width_operator must be one of {_WIDTH_OPS}, "
                                f"got {self.width_operator!r}")
        if self.depth_operator not in _DEPTH_OPS:
            raise ScheduleError(f"depth_operator must be one of {_DEPTH_OPS}, "
                                f"got {self.depth_operator!r}")
        if self.heads not in ("follow", "keep"):
            raise ScheduleError(f"heads must be 'follow' or 'keep', got {self.heads!r}")
        if self.width is None and self.depth is None:
            raise ScheduleError("a TripLe schedule needs a width, a depth or both")
        if self.depth is not None and self.stage1_epochs < 1:
            raise ScheduleError("stage1_epochs must be at least 1: the depth grows after stage I")

    def check_epochs(self, epochs: int) -> None:
        """Refuse a run of ``epochs`` that ends before the stages do."""
        if self.stage1_epochs + self.stage2_epochs >= epochs:
            raise ScheduleError(
                f"stages I and II take {self.stage1_epochs} + {self.stage2_epochs} epochs, "
                f"the run {epochs}: leave at least one epoch for stage III")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _node_params(model: fx.GraphModule, node: fx.Node, names: dict[int, str]) -> set[str]:
    """The names of the parameters a node calls (a module) or reads (an attribute)."""
    if node.op == "call_module":
        return {names[id(p)] for p in model.get_submodule(node.target).parameters()}
    if node.op == "get_attr":
        value = get_attr_value(model, node.target)
        if isinstance(value, nn.Parameter):
            return {names[id(value)]}
    return set()


def _block_params(model: fx.GraphModule) -> list[set[str]]:
    """The parameter names of each block, in order (blocks found from the graph)."""
    from ..passes.residual import blocks

    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}
    return [set().union(*(_node_params(model, node, names) for node in block.nodes))
            for block in blocks(model)]


def _embedding_params(model: fx.GraphModule, inside: set[str]) -> set[str]:
    """Parameters before the first block: patch embedding, position embedding, tokens."""
    from ..passes.residual import blocks

    first = blocks(model)[0].entry
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}
    found: set[str] = set()
    for node in model.graph.nodes:
        found |= _node_params(model, node, names)
        if node is first:
            break
    return found - inside


class TripleScaler:
    """Runs a :class:`TripleSchedule` (see the module docstring). ``records`` lists what
    happened at each stage change."""

    def __init__(self, schedule: TripleSchedule) -> None:
        if not isinstance(schedule, TripleSchedule):
            raise ScheduleError(f"schedule must be a TripleSchedule, got {type(schedule).__name__}")
        self.schedule = schedule
        self.records: list[dict[str, Any]] = []
        self._masks: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []
        self._hooks: list[Any] = []
        self._zero_masks: dict[str, torch.Tensor] = {}
        self._depth_done = False

    # -- stage 0 -----------------------------------------------------------------------------
    def start(self, model: fx.GraphModule, optimizer: torch.optim.Optimizer | None = None
              ) -> tuple[fx.GraphModule, torch.optim.Optimizer | None]:
        """Widen ``model`` (if the schedule has a width) and, given the small model's
        optimizer, carry its state ("+m") or drop it ("-m"); then enter stage I."""
        from ..passes import expansion_map, widen

        s = self.schedule
        if s.width is not None:
            wide = widen(model, s.width, s.width_operator, s.heads, seed=s.seed)
            mapping = expansion_map(wide)
            self._zero_masks = {name: src.apply(torch.ones(()).expand(_source_shape(model, src))
                                                .contiguous()) == 0
                                for name, src in mapping.items() if src.source is not None}
            if optimizer is not None:
                optimizer = expand_optimizer(optimizer, model, wide, mapping,
                                             carry_state=s.carry_state)
            self.records.append({"stage": 0, "event": "widen", "width": s.width,
                                 "params": sum(p.numel() for p in wide.parameters())})
            model = wide
        self._enter_stage_one(model)
        return model, optimizer

    def _enter_stage_one(self, model: fx.GraphModule) -> None:
        if self._deepens(model):
            self.records.append({"stage": 1, "event": "train at the small depth"})
            return
        blocks = _block_params(model)
        half = len(blocks) // 2
        bottom = set().union(*blocks[:half]) if half else set()
        top = set().union(*blocks[half:])
        # stage I: bottom blocks, and only the zero-initialised entries of the top blocks
        self._apply(model, frozen=set(), zeros_only=top - bottom)
        self.records.append({"stage": 1, "event": "bottom blocks and top zeros"})
        self._split = (bottom, top)

    def _deepens(self, model: fx.GraphModule) -> bool:
        from ..passes.residual import blocks

        return self.schedule.depth is not None and self.schedule.depth > len(blocks(model))

    # -- per step and per epoch --------------------------------------------------------------
    def after_step(self) -> None:
        """Restore the frozen entries of partly trained parameters (call after each step)."""
        with torch.no_grad():
            for param, keep, saved in self._masks:
                param.copy_(torch.where(keep, param, saved))

    def after_epoch(self, epoch: int, model: fx.GraphModule, optimizer: torch.optim.Optimizer
                    ) -> tuple[fx.GraphModule, torch.optim.Optimizer, bool]:
        """Change stage after the epoch with 0-based index ``epoch``; returns the model and
        optimizer to train from now on and whether they changed."""
        from ..passes import deepen, exact_form

        s = self.schedule
        done = epoch + 1
        if done == s.stage1_epochs and not self._depth_done:
            if self._deepens(model):
                old = dict(model.named_parameters(remove_duplicate=True))
                old_ids = {id(old[n]) for n in set().union(*_block_params(model))}
                # a model the scaler packed is deepened in its exact form (docs/packing.md)
                deep = deepen(exact_form(model), s.depth, s.depth_operator, seed=s.seed)
                optimizer = expand_optimizer(optimizer, model, deep, carry_state=s.carry_state)
                self._depth_done = True
                # the old blocks (under their new names, for inpt) stay frozen in stage II
                bottom = {n for n, p in deep.named_parameters(remove_duplicate=True)
                          if id(p) in old_ids}
                frozen = bottom | _embedding_params(deep, bottom)
                self._clear()
                self._apply(deep, frozen=frozen, zeros_only=set())
                self.records.append({"stage": 2, "epoch": epoch, "event": "deepen",
                                     "depth": s.depth, "frozen": len(frozen),
                                     "params": sum(p.numel() for p in deep.parameters())})
                return deep, optimizer, True
            bottom, top = self._split
            self._clear()
            self._apply(model, frozen=set(), zeros_only=bottom - top)
            self.records.append({"stage": 2, "epoch": epoch, "event": "bottom zeros and top blocks"})
        if done == s.stage1_epochs + s.stage2_epochs:
            self._clear()
            self.records.append({"stage": 3, "epoch": epoch, "event": "train all"})
        return model, optimizer, False

    # -- freezing ----------------------------------------------------------------------------
    def _apply(self, model: fx.GraphModule, frozen: set[str], zeros_only: set[str]) -> None:
        for name, param in model.named_parameters(remove_duplicate=True):
            if name in frozen:
                param.requires_grad_(False)
                self._frozen = getattr(self, "_frozen", []) + [param]
            elif name in zeros_only:
                zero = self._zero_masks.get(name)
                if zero is None or zero.shape != param.shape or not bool(zero.any()):
                    param.requires_grad_(False)  # no operator zeros in it: frozen this stage
                    self._frozen = getattr(self, "_frozen", []) + [param]
                    continue
                keep = zero.to(param.device)
                self._masks.append((param, keep, param.detach().clone()))
                self._hooks.append(param.register_hook(lambda g, m=keep: g * m))

    def _clear(self) -> None:
        for hook in self._hooks:
            hook.remove()
        for param in getattr(self, "_frozen", []):
            param.requires_grad_(True)
        self._hooks, self._masks, self._frozen = [], [], []

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.to_dict(), "records": [dict(r) for r in self.records]}


def _source_shape(model: fx.GraphModule, source: Any) -> tuple[int, ...]:
    return tuple(get_attr_value(model, source.source).shape)
