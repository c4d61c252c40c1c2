"""``deepen``: insert transformer blocks (TripLe's depth operators; ``docs/triple.md`` derives
what each preserves).

Blocks are found from the graph (:func:`fxgrow.passes.residual.blocks`: the residual-stream
values between blocks, and the period of the branches' structure), never from module names.
For l blocks w_0..w_{l-1} and a target depth L, block i of the result is:

- ``"stck"`` (stacking): a copy of w_{i mod l};
- ``"inpt"`` (interpolation): a copy of w_{floor(i/k)}, k = L // l (the last source is
  repeated when l does not divide L);
- ``"st"``: i < l the old block, i >= l an identity block: freshly initialised linears (timm's
  truncated normal, std 0.02, zero biases; seeded) whose stream-reading norms (weight and
  bias) and branch-output linears (weight and bias) are zero, so the block adds exactly 0;
- ``"st_stck"`` / ``"st_inpt"``: the placement and sources of stck / inpt, every copy (not
  the first occurrence of a source) made an identity block the same way.

The first occurrence of each source is the old block itself (its modules and parameters are
shared with the input); every other block is a new module with its own parameters (copies).
When the old blocks live in one container (``blocks.0`` ... ``blocks.{l-1}``) block i is named
``blocks.{i}``, so the state_dict matches the model of depth L built directly; otherwise a copy
of block ``p`` is named ``{p}_copy{i}``.
"""

from __future__ import annotations

import copy
import operator
import re
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn

from .._ops import LAYER_NORM_FUNCTIONS, get_attr_value
from ..errors import DeepenError
from ..linears import linear_site
from ._rebuild import build_graph_module
from .expansion import ParamSource, set_expansion_map
from .replay import register_replay
from .residual import Block, blocks as find_blocks, residual_chain

PASS_NAME = "deepen"
OPERATORS = ("stck", "inpt", "st", "st_stck", "st_inpt")
_PASS_THROUGH = (nn.Identity, nn.Dropout)


def block_sources(l: int, depth: int, operator: str) -> list[tuple[int, bool]]:
    """For each new block i: (source block, is it an identity block)."""
    if operator in ("stck", "st_stck"):
        sources = [i % l for i in range(depth)]
    elif operator in ("inpt", "st_inpt"):
        k = depth // l
        sources = [min(i // k, l - 1) for i in range(depth)]
    else:  # "st": new identity blocks on top, made from the last block's structure
        sources = [min(i, l - 1) for i in range(depth)]
    seen: set[int] = set()
    result = []
    for i, src in enumerate(sources):
        first = src not in seen and (operator != "st" or i < l)
        seen.add(src)
        result.append((src, operator in ("st", "st_stck", "st_inpt") and not first))
    return result


def _prefix(targets: Sequence[str]) -> str:
    if not targets:
        return ""
    parts = [t.split(".") for t in targets]
    common = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    # a prefix must name a module, never a whole target
    if common and any(len(p) == len(common) for p in parts):
        common = common[:-1]
    return ".".join(common)


def _targets(block: Block) -> list[str]:
    return [n.target for n in block.nodes if n.op in ("call_module", "get_attr")]


def _check_self_contained(gm: fx.GraphModule, found: list[Block]) -> set[fx.Node]:
    """The nodes before the first block; raises if a block reads another block's inside."""
    inside = {n: b for b in found for n in b.nodes}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first = order[found[0].entry]
    for b in found:
        for n in b.nodes:
            for arg in n.all_input_nodes:
                if arg is b.entry or inside.get(arg) is b:
                    continue
                if order[arg] <= first:
                    continue
                raise DeepenError(f"block ending at node {b.exit.name!r}: node {n.name!r} reads "
                                  f"{arg.name!r} from outside the block; deepen cannot copy it")
    last = found[-1].exit
    for n in gm.graph.nodes:
        if order[n] <= order[last]:
            continue
        for arg in n.all_input_nodes:
            if arg in inside and arg is not last:
                raise DeepenError(f"node {n.name!r} after the last block reads {arg.name!r} "
                                  f"from inside a block; deepen cannot move it")
    return {n for n in gm.graph.nodes if order[n] <= first}


def _identity_params(gm: fx.GraphModule, block: Block) -> set[str]:
    """Parameter names to zero so that ``block`` adds exactly 0: the norms that read the
    stream and the linear that ends each branch (weights and biases)."""
    chain = _chain_of(gm, block)
    stream = {block.entry, *chain}
    names: set[str] = set()
    inside = set(block.nodes)
    for value in stream:
        for user in value.users:
            if user not in inside:
                continue
            names |= _norm_params(gm, user)
    for add in chain:
        branch = next(a for a in add.args if isinstance(a, fx.Node) and a not in stream)
        node = branch
        while True:
            site = linear_site(gm, node)
            if site is not None:
                names.add(site.weight_node.target if site.weight_node is not None
                          else f"{site.target}.weight")
                if site.kind == "module" and gm.get_submodule(site.target).bias is not None:
                    names.add(f"{site.target}.bias")
                elif site.bias_node is not None and site.bias_node.op == "get_attr":
                    names.add(site.bias_node.target)
                break
            inputs = node.all_input_nodes
            if _is_scale(node):  # a per-channel scale (LayerScale's x * gamma)
                inputs = [a for a in inputs if a.op != "get_attr"]
            passes = node.op == "call_module" and isinstance(
                gm.get_submodule(node.target), _PASS_THROUGH) or (
                node.op == "call_module" and type(gm.get_submodule(node.target)).__name__
                in ("DropPath", "LayerScale")) or _is_scale(node)
            if not passes or len(inputs) != 1:
                raise DeepenError(f"block ending at {block.exit.name!r}: the branch added at "
                                  f"node {add.name!r} does not end in a linear (met "
                                  f"{node.name!r}); an identity block cannot be made from it")
            node = inputs[0]
    if not names:
        raise DeepenError(f"block ending at {block.exit.name!r}: nothing to zero")
    return names


def _is_scale(node: fx.Node) -> bool:
    """``x * p`` or ``x.mul(p)`` with ``p`` an attribute of the model."""
    is_mul = (node.op == "call_function" and node.target in (operator.mul, torch.mul)) or (
        node.op == "call_method" and node.target in ("mul", "mul_"))
    return is_mul and sum(a.op == "get_attr" for a in node.all_input_nodes) == 1 and \
        len(node.all_input_nodes) == 2


def _chain_of(gm: fx.GraphModule, block: Block) -> list[fx.Node]:
    inside = set(block.nodes)
    return [n for n in residual_chain(gm) if n in inside]


def _norm_params(gm: fx.GraphModule, node: fx.Node) -> set[str]:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)):
            return {f"{node.target}.{n}" for n, p in module.named_parameters()}
        return set()
    if node.op == "call_function" and node.target in LAYER_NORM_FUNCTIONS:
        return {a.target for a in [*node.args, *node.kwargs.values()]
                if isinstance(a, fx.Node) and a.op == "get_attr"}
    return set()


def _check_args(gm: Any, depth: Any, operator: Any, seed: Any) -> None:
    if not isinstance(gm, fx.GraphModule):
        raise DeepenError(f"deepen expects a torch.fx.GraphModule (see fxgrow.trace), "
                          f"got {type(gm).__name__}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth <= 0:
        raise DeepenError(f"depth must be a positive int, got {depth!r}")
    if operator not in OPERATORS:
        raise DeepenError(f"operator must be one of {OPERATORS}, got {operator!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DeepenError(f"seed must be an int, got {seed!r}")


def deepen(
    gm: fx.GraphModule,
    depth: int,
    operator: Literal["stck", "inpt", "st", "st_stck", "st_inpt"] = "stck",
    *,
    seed: int = 0,
) -> fx.GraphModule:
    """A new GraphModule with ``depth`` blocks (see the module docstring for the operators).

    The input is never modified; its blocks are shared with the result where a block is its
    source's first occurrence. The result records a ``"deepen"`` history entry (replayed by
    ``fxgrow.load``) and its parameter map (:func:`fxgrow.passes.expansion_map`: a copy names
    its source parameter, a zeroed or freshly initialised parameter has no source).

    Raises:
        DeepenError: bad arguments, a depth below the current one, a graph without repeated
            blocks or with a block that reads values from outside it.
    """
    _check_args(gm, depth, operator, seed)
    found = find_blocks(gm)
    if not found:
        raise DeepenError("no blocks found: the graph has no residual stream (a chain of "
                          "additions x + f(x))")
    l = len(found)
    if depth < l:
        raise DeepenError(f"depth {depth} is below the current depth {l}; deepen only grows")
    prologue = _check_self_contained(gm, found)
    prefixes = [_prefix(_targets(b)) for b in found]
    match = [re.fullmatch(r"(.*)\.(\d+)", p) for p in prefixes]
    container = None
    if all(m is not None for m in match) and len({m.group(1) for m in match}) == 1 and \
            [int(m.group(2)) for m in match] == list(range(l)):
        container = match[0].group(1)
    if container is None and operator in ("inpt", "st_inpt") and any(p == "" for p in prefixes):
        raise DeepenError("the blocks' modules share no common path; deepen cannot name copies")

    plan = block_sources(l, depth, operator)
    generator = torch.Generator().manual_seed(seed)
    new_attrs: dict[str, Any] = {}
    sources: dict[str, ParamSource] = {}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    order = list(gm.graph.nodes)
    for n in order:
        if n in prologue:
            env[n] = graph.node_copy(n, lambda a: env[a])
    stream = env[found[0].entry]
    used_first: set[int] = set()
    for i, (src, identity) in enumerate(plan):
        block = found[src]
        first = src not in used_first and not identity
        used_first.add(src)
        old_prefix = prefixes[src]
        if container is not None:
            new_prefix = f"{container}.{i}"
        else:
            new_prefix = old_prefix if first else f"{old_prefix}_copy{i}"
        rename = (lambda t, o=old_prefix, p=new_prefix: p + t[len(o):])
        if not first:
            zeroed = _identity_params(gm, block) if identity else set()
            _copy_block(gm, block, rename, zeroed, fresh=operator == "st",
                        generator=generator, new_attrs=new_attrs, sources=sources)
        elif new_prefix != old_prefix:
            for target in dict.fromkeys(_targets(block)):
                new_attrs[rename(target)] = get_attr_value(gm, target)
        benv: dict[fx.Node, fx.Node] = {block.entry: stream}
        for n in block.nodes:
            args, kwargs = fx.node.map_arg((n.args, n.kwargs),
                                           lambda a: benv[a] if a in benv else env[a])
            target = rename(n.target) if n.op in ("call_module", "get_attr") else n.target
            # a copy's nodes get names of their own, so that every node of the input keeps
            # its name (the equivalence checker matches nodes by name)
            name = n.name if first else f"{n.name}_copy{i}"
            new = graph.create_node(n.op, target, args, kwargs, name=name, type_expr=n.type)
            new.meta = copy.copy(n.meta)
            benv[n] = new
        stream = benv[block.exit]
    env[found[-1].exit] = stream
    last = order.index(found[-1].exit)
    for n in order[last + 1:]:
        env[n] = graph.node_copy(n, lambda a: env[a])
    record = {"pass": PASS_NAME, "args": {"depth": depth, "operator": operator, "seed": seed}}
    try:
        result = build_graph_module(gm, graph, new_attrs, record)
    except RuntimeError as exc:
        raise DeepenError(f"the deepened graph is invalid: {exc}") from exc
    set_expansion_map(result, PASS_NAME, sources)
    return result


def _copy_block(gm: fx.GraphModule, block: Block, rename: Any, zeroed: set[str], *, fresh: bool,
                generator: torch.Generator, new_attrs: dict[str, Any],
                sources: dict[str, ParamSource]) -> None:
    """Copies of the block's modules and attributes under their new names, zeroed where the
    block is made an identity, re-drawn where ``fresh``."""
    for target in dict.fromkeys(_targets(block)):
        value = get_attr_value(gm, target)
        if isinstance(value, nn.Module):
            module = copy.deepcopy(value)
            named = dict(module.named_parameters(remove_duplicate=False))
            for local, param in named.items():
                old_name = f"{target}.{local}"
                _fill(param, old_name, rename(old_name), zeroed, fresh, generator, sources,
                      owner=module, local=local)
            new_attrs[rename(target)] = module
        elif isinstance(value, torch.Tensor):
            tensor = value.detach().clone()
            new = nn.Parameter(tensor, requires_grad=value.requires_grad) \
                if isinstance(value, nn.Parameter) else tensor
            if isinstance(new, nn.Parameter):
                _fill(new, target, rename(target), zeroed, fresh, generator, sources,
                      owner=None, local=target.rpartition(".")[2])
            new_attrs[rename(target)] = new
        else:
            new_attrs[rename(target)] = copy.deepcopy(value)


def _fill(param: nn.Parameter, old_name: str, new_name: str, zeroed: set[str], fresh: bool,
          generator: torch.Generator, sources: dict[str, ParamSource], *, owner: Any,
          local: str) -> None:
    with torch.no_grad():
        if old_name in zeroed:
            param.zero_()
            sources[new_name] = ParamSource(None, tuple(param.shape), zero=True,
                                            template=old_name)
            return
        if fresh and isinstance(owner, nn.Linear):
            if local == "weight":
                param.copy_(_trunc_normal(param.shape, generator))
            else:
                param.zero_()
            sources[new_name] = ParamSource(None, tuple(param.shape), template=old_name)
            return
        sources[new_name] = ParamSource(old_name, tuple(param.shape))


def _trunc_normal(shape: Sequence[int], generator: torch.Generator, std: float = 0.02) -> torch.Tensor:
    # timm's ViT init: N(0, std) truncated to [-2, 2] (absolute, so effectively untruncated)
    values = torch.randn(tuple(shape), generator=generator) * std
    return values.clamp_(-2.0, 2.0)


def _replay_deepen(gm: fx.GraphModule, args: dict[str, Any]) -> fx.GraphModule:
    return deepen(gm, args["depth"], args["operator"], seed=args["seed"])


register_replay(PASS_NAME, _replay_deepen)
