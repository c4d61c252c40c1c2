import time

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxgrow
from fxgrow import PlanError
from fxgrow.passes import exact_form, grow, grow_lineage, is_packed, pack, unpack
from fxgrow.passes.grow import add_to_channels

from grown_models import (FAMILIES, family, grads, grow_randomly, randomise_grown, relative,
                          saved_and_loaded)


def _grown_calls(gm: fx.GraphModule) -> list[str]:
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and "_grow" in n.target]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_packed_matches_exact_values_and_gradients(name):
    base, x = family(name)
    grown = grow_randomly(base, name)
    packed = pack(grown)
    assert relative(grown(x), base(x)) > 1e-6  # the pseudo-layers contribute (CaiT: layer scale 1e-5)
    assert _grown_calls(grown) and not _grown_calls(packed)  # every target is one GEMM
    out, want = grads(grown, x)
    out_packed, got = grads(packed, x)
    # float64: the packed GEMM sums in another order, nothing else differs
    assert relative(out_packed, out) < 1e-12
    scale = max(g.abs().max() for g in want.values())
    assert got.keys() == want.keys()
    assert max(relative(got[n], want[n], scale) for n in want) < 1e-12
    targets = fxgrow.recipe(packed)["history"][-1]
    roots = {parent for parent, *_ in grow_lineage(grown).values() if "_grow" not in parent}
    assert targets["pass"] == "pack" and set(targets["args"]["targets"]) == roots


def test_packed_float32_within_1e_5():
    base, x = family("deit_small_patch16_224", torch.float32)
    grown = grow_randomly(base, "f32")
    out, want = grads(grown, x)
    out_packed, got = grads(pack(grown), x)
    assert relative(out_packed, out) < 1e-5
    scale = max(g.abs().max() for g in want.values())
    assert max(relative(got[n], want[n], scale) for n in want) < 1e-5


def test_pack_keeps_the_parameters_grow_created():
    base, x = family("deit_small_patch16_224")
    grown = grow_randomly(base, "identity")
    packed = pack(grown)
    mine = dict(grown.named_parameters())
    theirs = dict(packed.named_parameters())
    assert mine.keys() == theirs.keys() and all(theirs[n] is p for n, p in mine.items())
    assert grown.state_dict().keys() == packed.state_dict().keys()
    assert grow_lineage(packed) == grow_lineage(grown)
    # an optimizer built on the exact form trains the packed model's parameters
    optimizer = torch.optim.SGD(grown.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in mine.items()}
    packed(x).square().sum().backward()
    optimizer.step()
    moved = [n for n, p in mine.items() if not torch.equal(p, before[n])]
    assert any("_grow" in n for n in moved) and any("_grow" not in n for n in moved)


def test_pack_leaves_its_input_alone_and_unpacks_exactly():
    base, x = family("deit_small_patch16_224")
    grown = grow_randomly(base, "unpack")
    code, state = grown.code, {k: v.clone() for k, v in grown.state_dict().items()}
    history = fxgrow.recipe(grown)["history"]
    packed = pack(grown)
    assert grown.code == code and not is_packed(grown) and is_packed(packed)
    assert all(torch.equal(v, state[k]) for k, v in grown.state_dict().items())
    exact = unpack(packed)
    assert exact.code == code and fxgrow.recipe(exact)["history"] == history
    assert torch.equal(exact(x), grown(x))
    assert exact_form(grown) is grown
    repacked = pack(packed)  # packing a packed model packs its exact form
    assert repacked.code == packed.code
    assert [r["pass"] for r in fxgrow.recipe(repacked)["history"]].count("pack") == 1
    with pytest.raises(PlanError, match="pack"):
        unpack(grown)
    with pytest.raises(PlanError, match="GraphModule"):
        pack(nn.Linear(2, 2))


def test_packed_matches_the_closed_form():
    """One linear, a pair on neurons 1 and 2, then a fused pseudo-layer nested on the plus
    member's neuron 0, computed by hand in float64."""
    torch.manual_seed(3)
    gm = fxgrow.trace(nn.Sequential(nn.Linear(5, 4)).double())
    gm = grow(gm, {"0": [1, 2]})
    gm = grow(gm, {"0_grow0_plus": [0]}, mode="fused")
    randomise_grown(gm, 7)
    x = torch.randn(3, 5, dtype=torch.float64)

    def lin(name):
        module = gm.get_submodule(name)
        return x @ module.weight.T + module.bias

    def d(a):
        return F.gelu(a) + a

    plus = lin("0_grow0_plus").clone()
    plus[:, 0] += d(lin("0_grow0_plus_grow0_fused")[:, 0])
    expected = lin("0").clone()
    expected[:, [1, 2]] += d(plus + lin("0_grow0_minus"))
    assert relative(pack(gm)(x), expected) < 1e-12
    assert relative(gm(x), expected) < 1e-12


def test_growth_on_a_packed_model_keeps_the_bitwise_loss_check():
    base, x = family("deit_small_patch16_224", torch.float32)
    packed = pack(grow_randomly(base, "regrow"))
    labels = torch.tensor([1, 3])
    before = F.cross_entropy(unpack(packed)(x), labels)
    plan = {"blocks.1.mlp.fc1": [0, 5], "blocks.0.attn.qkv": [3]}
    nested = [t for t in fxgrow.linear_sites(unpack(packed)) if t.endswith("_plus")]
    plan[nested[0]] = [0]
    grown = grow(packed, plan)  # grows the exact form
    assert not is_packed(grown)
    assert torch.equal(F.cross_entropy(grown(x), labels), before)
    report = fxgrow.verify.check_equivalence(unpack(packed), grown, x)
    assert report.ok
    repacked = pack(grown)
    assert relative(repacked(x), grown(x)) < 1e-5
    kept = dict(packed.named_parameters())
    assert all(dict(repacked.named_parameters())[n] is p for n, p in kept.items())
    passes = [r["pass"] for r in fxgrow.recipe(repacked)["history"]]
    assert passes[-3:] == ["grow", "grow", "pack"] and passes.count("pack") == 1


def test_packed_model_saves_and_loads(tmp_path):
    packed, loaded, x = saved_and_loaded(pack, tmp_path)
    assert is_packed(loaded)
    assert torch.equal(loaded(x), packed(x))
    assert fxgrow.recipe(loaded) == fxgrow.recipe(packed)


def test_export_of_a_packed_model():
    base, x = family("deit_small_patch16_224", torch.float32)
    packed = pack(grow_randomly(base, "export"))
    program = torch.export.export(packed, (x,))
    assert relative(program.module()(x), packed(x)) < 1e-5
    # plain aten operators only: the program runs where fxgrow's operators are not loaded
    assert not [n for n in program.graph.nodes if "fxgrow" in str(n.target)]


def test_compile_of_a_packed_model():
    gm = fxgrow.models.tiny_vit(num_classes=3, img_size=8, patch_size=4, embed_dim=16,
                                depth=1, num_heads=2)
    packed = pack(grow_randomly(gm, "compile", rounds=2)).train()
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(packed)
    started = time.perf_counter()
    out = compiled(x)
    out.square().sum().backward()
    compile_seconds = time.perf_counter() - started
    compiled_grads = {n: p.grad for n, p in packed.named_parameters()}
    packed.zero_grad(set_to_none=True)
    reference = packed(x)
    reference.square().sum().backward()
    assert relative(out, reference) < 1e-5
    assert all(compiled_grads[n] is not None for n in compiled_grads if "_grow" in n)
    scale = max(p.grad.abs().max() for p in packed.parameters())
    assert max(relative(compiled_grads[n], p.grad, scale)
               for n, p in packed.named_parameters()) < 1e-5
    print(f"compile of a packed tiny ViT, forward and backward: {compile_seconds:.1f} s")


def test_pack_leaves_an_edited_subgraph_as_it_is():
    base, x = family("deit_small_patch16_224")
    grown = grow(base, {"blocks.0.mlp.fc1": [1, 2], "blocks.1.mlp.fc2": [0]})
    graph = grown.graph
    plus = next(n for n in graph.nodes if n.op == "call_module" and n.target.endswith(
        "blocks.0.mlp.fc1_grow0_plus"))
    out = graph.find_nodes(op="output")[0]
    # read a member's value outside its pseudo-layer: that tree cannot be replaced
    with graph.inserting_before(out):
        extra = graph.call_function(torch.sum, (plus,))
        total = graph.call_function(torch.add, (out.args[0], extra))
    out.args = (total,)
    grown.recompile()
    packed = pack(grown)
    assert fxgrow.recipe(packed)["history"][-1]["args"]["targets"] == ["blocks.1.mlp.fc2"]
    assert relative(packed(x), grown(x)) < 1e-12
    assert add_to_channels in {n.target for n in packed.graph.nodes}


@pytest.mark.parametrize("packed", [True, False])
def test_scaler_trains_packed_and_keeps_the_bitwise_loss_check(packed):
    from fxgrow.training.scaler import Scaler, ScalingSchedule

    torch.manual_seed(0)
    gm = fxgrow.models.build("tiny_vit", num_classes=4, img_size=8, embed_dim=16, depth=2,
                             num_heads=2)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g))
               for _ in range(2)]
    optimizer = torch.optim.AdamW(gm.parameters(), lr=1e-2)
    schedule = ScalingSchedule(warmup_epochs=1, interval=1, end_epoch=3, epochs=4,
                               budget_per_round=6, layer_threshold=1, analysis_batches=1)
    scaler = Scaler(gm, optimizer, schedule, batches, F.cross_entropy, pack=packed)
    for epoch in range(4):
        for x, y in batches:
            optimizer.zero_grad()
            F.cross_entropy(gm(x), y).backward()
            optimizer.step()
        gm = scaler.after_epoch(epoch)
        if scaler.records and scaler.records[-1]["grown"]:
            assert is_packed(gm) == packed
    grown = [r for r in scaler.records if r["grown"]]
    assert len(grown) >= 2  # the later rounds grow a packed model
    assert all(r["loss_equal"] and r["equivalent"] and r["packed"] == packed for r in grown)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in gm.parameters()} == held
    nested = [t for r in grown[1:] for t in r["plan"]["neurons"] if "_grow" in t]
    assert not any(t.endswith("_minus") for t in nested)  # a pair is one candidate


def _as_operator(out, pre, widths, pairs, *indices):
    """packed_levels as torch.compile sees it: the fxgrow::packed_levels operator."""
    return torch.ops.fxgrow.packed_levels(out, pre, list(widths), [p for p, _ in pairs],
                                          [s for _, s in pairs], list(indices))


@pytest.mark.parametrize("form", ["eager", "operator"])
def test_packed_levels_kernel_matches_its_out_of_place_form(form):
    """The eager kernel (in place, hand-written backward) and the operators torch.compile
    calls, against the same computation in out-of-place operators, whose backward autograd
    derives, in float64: two levels, a level of pairs and single members, channels written
    by more than one pseudo-layer."""
    from fxgrow.passes.pack import levels_out_of_place, packed_levels

    kernel = packed_levels if form == "eager" else _as_operator

    generator = torch.Generator().manual_seed(0)
    widths, pairs = (2 * 3 + 2, 2), ((3, 2), (0, 2))  # level 1: 3 pair columns + 2 singles
    indices = (torch.tensor([4, 0, 4, 1, 2]), torch.tensor([6, 6]))

    def inputs():
        out = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64)
        pre = torch.randn(2, 3, sum(widths), generator=generator, dtype=torch.float64)
        return out.requires_grad_(), pre.requires_grad_()

    out, pre = inputs()
    # in place on a fresh non-leaf, as packed_levels always receives a linear's output
    got = kernel(out * 1, pre * 1, widths, pairs, *indices)
    want = levels_out_of_place(out, pre, widths, pairs, *indices)
    assert torch.allclose(got, want, rtol=0, atol=1e-14)
    weights = torch.randn(want.shape, generator=generator, dtype=torch.float64)
    grads_got = torch.autograd.grad((got * weights).sum(), (out, pre))
    grads_want = torch.autograd.grad((want * weights).sum(), (out, pre))
    for g, w in zip(grads_got, grads_want):
        assert torch.allclose(g, w, rtol=0, atol=1e-13)
    assert torch.autograd.gradcheck(
        lambda o, p: kernel(o * 1, p * 1, widths, pairs, *indices), inputs())
