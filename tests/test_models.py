import json

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import fxgrow
import fxgrow.models as models
from fxgrow.errors import ModelError
from fxgrow.verify import count_params
from helpers import vit_flops, vit_params, vit_shape

SMALL_TIMM = {
    "source": "timm",
    "name": "vit_tiny_patch16_224",
    "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 5},
}


def _state(gm):
    return {k: v.clone() for k, v in gm.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("spec", ["tiny_vit", SMALL_TIMM], ids=["fxgrow", "timm"])
def test_build_is_deterministic_given_the_seed(spec):
    torch.manual_seed(3)
    first = _state(models.build(spec))
    torch.manual_seed(3)
    again = _state(models.build(spec))
    torch.manual_seed(4)
    other = _state(models.build(spec))
    assert _same(first, again)
    assert not _same(first, other)


def test_tiny_vit_is_timms_vision_transformer_traced():
    torch.manual_seed(1)
    gm = models.tiny_vit(num_classes=7)
    torch.manual_seed(1)
    eager = VisionTransformer(img_size=32, patch_size=4, num_classes=7, embed_dim=64, depth=4,
                              num_heads=4, mlp_ratio=4.0).eval()
    gm.eval()
    assert isinstance(gm, fx.GraphModule)
    assert _same(_state(gm), eager.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(gm(x), eager(x))


def test_tiny_vit_trains_at_any_batch_size():
    gm = models.tiny_vit()
    for batch in (1, 8):
        gm.zero_grad()
        loss = F.cross_entropy(gm(torch.randn(batch, 3, 32, 32)), torch.randint(0, 10, (batch,)))
        loss.backward()
        assert all(p.grad is not None and p.grad.isfinite().all() for p in gm.parameters())


def test_fused_attention_can_be_switched_off_and_is_recorded():
    fused = models.build("tiny_vit")
    explicit = models.build({"source": "fxgrow", "name": "tiny_vit", "kwargs": {},
                             "fused_attn": False})
    timm_explicit = models.build({**SMALL_TIMM, "fused_attn": False})
    assert "scaled_dot_product_attention" in fused.code
    assert "scaled_dot_product_attention" not in explicit.code
    assert "scaled_dot_product_attention" not in timm_explicit.code
    assert fxgrow.recipe(explicit)["base"]["kwargs"]["fused_attn"] is False
    assert fxgrow.recipe(timm_explicit)["base"]["fused_attn"] is False
    explicit.load_state_dict(fused.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(explicit.eval()(x), fused.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["tiny_vit", SMALL_TIMM], ids=["fxgrow", "timm"])
def test_the_recipe_base_rebuilds_the_model(spec):
    torch.manual_seed(5)
    gm = models.build(spec, num_classes=3)
    base = fxgrow.recipe(gm)["base"]
    assert json.loads(json.dumps(base)) == base
    assert base["kwargs"]["num_classes"] == 3
    assert fxgrow.recipe(gm)["history"] == []
    torch.manual_seed(5)
    assert _same(_state(models.build(base)), _state(gm))


def test_fxgrow_spec_records_every_argument():
    gm = models.build("tiny_vit", depth=2)
    kwargs = fxgrow.recipe(gm)["base"]["kwargs"]
    assert kwargs["depth"] == 2
    assert set(kwargs) == {"num_classes", "img_size", "patch_size", "embed_dim", "depth",
                           "num_heads", "mlp_ratio", "qk_norm", "fused_attn"}


@pytest.mark.parametrize(
    "spec,kwargs,match",
    [
        ("no_such_model_xyz", {}, "no_such_model_xyz"),
        ({"source": "fxgrow", "name": "resnet_nope"}, {}, "resnet_nope"),
        ({"source": "timm", "name": "deit_nope_224"}, {}, "deit_nope_224"),
        ({"source": "hub", "name": "tiny_vit"}, {}, "'hub'"),
        ({"source": "timm", "name": "tiny_vit", "weights": "x"}, {}, "weights"),
        ({"source": "fxgrow", "name": "tiny_vit", "fused_attn": "yes"}, {}, "fused_attn"),
        ("tiny_vit", {"width": 3}, "width"),
        (SMALL_TIMM, {"pretrained": True}, "pretrained"),
        (SMALL_TIMM, {"not_a_vit_arg": 1}, "not_a_vit_arg"),
        (3, {}, "int"),
    ],
)
def test_bad_specs_raise_model_error_naming_the_problem(spec, kwargs, match):
    with pytest.raises(ModelError, match=match):
        models.build(spec, **kwargs)
    assert issubclass(ModelError, fxgrow.FxgrowError) and fxgrow.ModelError is ModelError


def test_tiny_vit_reduced_halves_head_dim_and_mlp():
    torch.manual_seed(2)
    gm = models.tiny_vit_reduced()
    attn, hidden = 32, 128
    shape = vit_shape(dim=64, depth=4, heads=4, head_dim=attn // 4, hidden=hidden, classes=10,
                      patch=4, img=32)
    assert count_params(gm) == vit_params(**shape)
    assert gm.get_submodule("blocks.3.attn.qkv").out_features == 3 * attn
    recipe = fxgrow.recipe(gm)
    assert recipe["base"]["name"] == "tiny_vit"
    assert [r["pass"] for r in recipe["history"]] == ["reduce"]
    torch.manual_seed(2)
    full = models.tiny_vit()
    # keep="first": the reduced model is the first rows of the same random init
    assert torch.equal(gm.get_submodule("blocks.0.mlp.fc1").weight,
                       full.get_submodule("blocks.0.mlp.fc1").weight[:hidden])
    loss = F.cross_entropy(gm(torch.randn(5, 3, 32, 32)), torch.randint(0, 10, (5,)))
    loss.backward()
    assert all(p.grad.isfinite().all() for p in gm.parameters())


def test_reduction_demo_prints_widths_params_flops_and_trains():
    import io

    import timm

    from fxgrow.demos import reduction_demo

    kwargs = {"patch_size": 8, "depth": 2}
    rng_before = torch.random.get_rng_state()
    out = io.StringIO()
    summary = reduction_demo("vit_tiny_patch16_224", num_classes=10, img_size=32, file=out,
                             model_kwargs=kwargs, seed=0)
    text = out.getvalue()
    assert torch.equal(torch.random.get_rng_state(), rng_before)

    def shape(head_dim, hidden):
        return vit_shape(dim=192, depth=2, heads=3, head_dim=head_dim, hidden=hidden,
                         classes=10, patch=8, img=32)

    full, half = shape(64, 768), shape(32, 384)
    eager = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, **kwargs)
    assert summary["params"][0] == sum(p.numel() for p in eager.parameters())
    assert summary["params"] == (vit_params(**full), vit_params(**half))
    assert summary["flops"] == (vit_flops(**full), vit_flops(**half))

    # The printed loss is the cross-entropy of the reduced model on the demo's batch: the
    # same seed, the first rows kept, drawn in the demo's order (example input, batch, labels).
    torch.manual_seed(0)
    reduced = fxgrow.passes.reduce(
        models.build({"source": "timm", "name": "vit_tiny_patch16_224",
                      "kwargs": {**kwargs, "num_classes": 10, "img_size": 32}}),
        head_dim=0.5, mlp_hidden=0.5, keep="first", example_inputs=torch.randn(1, 3, 32, 32))
    x, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    loss = F.cross_entropy(reduced.train()(x), labels)
    torch.random.set_rng_state(rng_before)
    assert summary["loss"] == loss.item()
    assert summary["grads_finite"]

    block_rows = [line.split() for line in text.splitlines() if line.strip().startswith("blocks.")]
    assert len(block_rows) == 2
    # qkv out, head dim (read from the reshape literal) and fc1 out, before -> after
    assert block_rows[1][1:10] == ["576", "->", "288", "64", "->", "32", "768", "->", "384"]
    assert f"{vit_params(**full):,} -> {vit_params(**half):,}" in text
    assert f"{vit_flops(**full) / 1e9:.3f} -> {vit_flops(**half) / 1e9:.3f}" in text
    assert f"loss {loss.item():.4f}" in text and "all finite: True" in text


def test_reduced_builder_recipe_rebuilds_through_save_and_load(tmp_path):
    gm = models.tiny_vit_reduced(num_classes=4).eval()
    fxgrow.save(gm, tmp_path / "reduced")
    loaded = fxgrow.load(tmp_path / "reduced").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))
    assert fxgrow.recipe(loaded) == fxgrow.recipe(gm)
