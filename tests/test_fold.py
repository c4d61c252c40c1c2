import pytest
import torch

import fxgrow
from fxgrow.passes import fold, grow, grow_lineage, pack
from fxgrow.verify import count_flops, count_params

from grown_models import FAMILIES, family, grow_randomly, relative, saved_and_loaded


@pytest.mark.parametrize("name", list(FAMILIES))
def test_folded_matches_unfolded(name):
    base, x = family(name)
    grown = grow_randomly(base, f"fold-{name}")
    folded = fold(grown)
    want = grown(x)
    assert relative(folded(x), want) < 1e-12  # float64: only the summation order differs
    assert relative(fold(pack(grown))(x), want) < 1e-12
    assert not any("_grow" in n for n, _ in folded.named_parameters())
    lineage = grow_lineage(grown)
    roots = {parent for parent, *_ in lineage.values() if "_grow" not in parent}
    assert set(fxgrow.recipe(folded)["history"][-1]["args"]["targets"]) == roots


def test_fold_float32_and_its_costs():
    base, x = family("deit_small_patch16_224", torch.float32)
    grown = grow(base, {"blocks.0.mlp.fc1": [1, 4, 7], "blocks.1.attn.qkv": [0, 2]})
    grown = grow(grown, {"blocks.0.mlp.fc1_grow0_minus": [0, 2], "blocks.0.mlp.fc1": [4]},
                 mode="fused")
    grown = grow_randomly(grown, "fold-costs", rounds=1)
    folded = fold(grown)
    assert relative(folded(x), grown(x)) < 1e-5
    # each pair becomes one neuron: its second member's parameters and multiply-adds go
    exact_flops = count_flops(grown, x)
    minus = {name.rsplit(".", 1)[0]: (parent, indices) for name, (parent, indices, role, _)
             in grow_lineage(grown).items() if role == "minus"}
    sites = fxgrow.linear_sites(grown)
    saved_params = sum(len(indices) * (sites[parent][0].in_features + 1)
                       for parent, indices in minus.values())
    assert count_params(folded) == count_params(grown) - saved_params
    saved_flops = sum(exact_flops.module(name) for name in minus)
    assert saved_flops > 0
    assert count_flops(folded, x).total == exact_flops.total - saved_flops
    assert count_flops(pack(grown), x).total == exact_flops.total


def test_folded_model_saves_and_loads(tmp_path):
    folded, loaded, x = saved_and_loaded(fold, tmp_path)
    assert torch.equal(loaded(x), folded(x))


def test_export_of_a_folded_model():
    base, x = family("deit_small_patch16_224", torch.float32)
    folded = fold(grow_randomly(base, "fold-export"))
    program = torch.export.export(folded, (x,))
    assert relative(program.module()(x), folded(x)) < 1e-5


def test_compile_of_a_folded_model():
    gm = fxgrow.models.tiny_vit(num_classes=3, img_size=8, patch_size=4, embed_dim=16,
                                depth=1, num_heads=2)
    folded = fold(grow_randomly(gm, "fold-compile", rounds=2)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert relative(torch.compile(folded)(x), folded(x)) < 1e-5
