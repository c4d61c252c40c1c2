"""TripLe's width and depth operators as graph passes: what each preserves (docs/triple.md),
TripLe's Investigation 1 on a tiny ViT, DeiT-Ti -> DeiT-S width and DeiT-S -> 24 blocks."""

import pytest
import timm
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxgrow
from fxgrow import DeepenError, WidenError
from fxgrow.models import build
from fxgrow.passes import deepen, expansion_map, widen
from fxgrow.verify import check_equivalence, count_params

DIM, HEADS, DEPTH, IMG, PATCH, CLASSES = 32, 2, 2, 16, 8, 10


def _tiny(depth: int = DEPTH, dim: int = DIM, heads: int = HEADS, **kw) -> fx.GraphModule:
    gm = build("tiny_vit", embed_dim=dim, depth=depth, num_heads=heads, img_size=IMG,
               patch_size=PATCH, num_classes=CLASSES, **kw).eval()
    # weights away from timm's init (zero biases, unit norms): a trained-like model, so
    # that an operator that ignores a bias or a norm scale cannot pass by accident
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return gm


def _x(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))


def _labels(batch: int = 3) -> torch.Tensor:
    return torch.randint(0, CLASSES, (batch,), generator=torch.Generator().manual_seed(3))


def _loss(gm: fx.GraphModule, x: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(gm(x), _labels(len(x)))


def _input_grad(gm: fx.GraphModule, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(_loss(gm, x), x)[0]


def _node_value(gm: fx.GraphModule, name: str, x: torch.Tensor) -> torch.Tensor:
    seen = {}

    class Rec(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            seen[n.name] = out
            return out

    with torch.no_grad():
        Rec(gm).run(x)
    return seen[name]


# -- widen: what each operator preserves ------------------------------------------------------

@pytest.mark.parametrize("width", [64, 96])
def test_st_follow_preserves_outputs_and_gradients(width):
    gm, x = _tiny(), _x()
    wide = widen(gm, width, "st", "follow").eval()
    k = width // DIM
    torch.testing.assert_close(wide(x), gm(x), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(_input_grad(wide, x), _input_grad(gm, x), atol=1e-6, rtol=1e-4)
    # each copy carries 1/k of the gradient: every block of a widened weight (off-diagonal
    # ones included) has gradient grad(W) / k
    names = ["blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.weight"]
    old_params = dict(gm.named_parameters())
    new_params = dict(wide.named_parameters())
    old_g = torch.autograd.grad(_loss(gm, x), [old_params[n] for n in names])
    new_g = torch.autograd.grad(_loss(wide, x), [new_params[n] for n in names])
    qkv_old, qkv_new = old_g[0], new_g[0]
    for p in range(3):  # q, k, v parts, each (heads * head_dim) rows
        part_old = qkv_old[p * DIM:(p + 1) * DIM]
        part_new = qkv_new[p * width:(p + 1) * width]
        torch.testing.assert_close(part_new, part_old.repeat(k, k) / k, atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(new_g[1], old_g[1].repeat(k, k) / k, atol=1e-7, rtol=1e-4)


def test_st_widened_model_has_the_directly_built_architecture():
    gm = _tiny()
    wide = widen(gm, 64, "st")
    direct = build("tiny_vit", embed_dim=64, depth=DEPTH, num_heads=4, img_size=IMG,
                   patch_size=PATCH, num_classes=CLASSES)
    assert {k: v.shape for k, v in wide.state_dict().items()} == \
        {k: v.shape for k, v in direct.state_dict().items()}
    keep = widen(gm, 64, "st", "keep")
    direct_keep = build("tiny_vit", embed_dim=64, depth=DEPTH, num_heads=HEADS, img_size=IMG,
                        patch_size=PATCH, num_classes=CLASSES)
    assert count_params(keep) == count_params(direct_keep)


def test_stream_values_before_the_first_norm():
    """Every operator is exact up to the first LayerNorm: the stream is x[src] (b2b), the
    k copies of x (st) or x padded with zeros (pad0). The norms are where they differ."""
    gm, x = _tiny(), _x()
    old = _node_value(gm, "norm_pre", x)
    st = _node_value(widen(gm, 64, "st"), "norm_pre", x)
    assert torch.equal(st, torch.cat([old, old], -1))
    pad = _node_value(widen(gm, 48, "pad0"), "norm_pre", x)
    assert torch.equal(pad[..., :DIM], old) and bool((pad[..., DIM:] == 0).all())
    b2b = widen(gm, 48, "b2b", seed=5)
    src = expansion_map(b2b)["cls_token"].index[2]
    assert torch.equal(_node_value(b2b, "norm_pre", x), old[..., src])
    # after the norm: st gives the copies of LN(x) exactly, b2b and pad0 change the statistics
    ln_old = _node_value(gm, "layer_norm", x)
    torch.testing.assert_close(_node_value(widen(gm, 64, "st"), "layer_norm", x),
                               torch.cat([ln_old, ln_old], -1), atol=1e-6, rtol=1e-5)
    ln_b2b = _node_value(b2b, "layer_norm", x)[..., :DIM]
    assert (ln_b2b - ln_old).abs().max() > 1e-3


def test_investigation_1_classification():
    """TripLe's Investigation 1 on a tiny ViT: full functionality preservation (outputs and
    input gradients to float tolerance) for st (d | D, heads follow) and the identity-block
    depth operators; every other operator changes the fixed-batch loss (the measured change
    is printed; benchmarks/bench_triple.py reports it with accuracies)."""
    gm, x = _tiny(), _x(8)
    base = float(_loss(gm, x).detach())
    full = {
        "st": widen(gm, 64, "st"),
        "depth st": deepen(gm, 4, "st"),
        "depth st_stck": deepen(gm, 4, "st_stck"),
        "depth st_inpt": deepen(gm, 4, "st_inpt"),
    }
    for name, model in full.items():
        model.eval()
        assert abs(float(_loss(model, x).detach()) - base) < 1e-5, name
        torch.testing.assert_close(_input_grad(model, x), _input_grad(gm, x), atol=1e-6,
                                   rtol=1e-4, msg=name)
    changed = {
        "st keep": widen(gm, 64, "st", "keep"),
        "st D=48": widen(gm, 48, "st"),
        "b2b": widen(gm, 64, "b2b"),
        "pad0": widen(gm, 64, "pad0"),
        "depth stck": deepen(gm, 4, "stck"),
        "depth inpt": deepen(gm, 4, "inpt"),
    }
    deltas = {}
    for name, model in changed.items():
        deltas[name] = float(_loss(model.eval(), x).detach()) - base
        assert abs(deltas[name]) > 1e-4, name
    print("fixed-batch loss change:", {k: round(v, 4) for k, v in deltas.items()})


def test_identity_blocks_are_bitwise_and_keep_every_gradient():
    gm, x = _tiny(), _x()
    for op in ("st", "st_stck", "st_inpt"):
        deep = deepen(gm, 5, op)
        report = check_equivalence(gm, deep, x)
        assert report.ok, (op, str(report))
        assert len(report.rows) > 0
    # at the first step only the zeroed branch outputs of a new block receive gradient: every
    # other parameter of the block sits behind a zero projection (exact zeros, any CPU)
    deep = deepen(gm, 4, "st_stck")
    params = dict(deep.named_parameters())
    new = [n for n in params if n.startswith(("blocks.2.", "blocks.3."))]
    grads = dict(zip(new, torch.autograd.grad(_loss(deep, x), [params[n] for n in new])))
    learning = {n for n, g in grads.items() if bool((g != 0).any())}
    assert learning == {f"blocks.{i}.{m}.{p}" for i in (2, 3) for m in ("attn.proj", "mlp.fc2")
                        for p in ("weight", "bias")}


def test_deepen_names_and_copies():
    gm = _tiny()
    direct = build("tiny_vit", embed_dim=DIM, depth=5, num_heads=HEADS, img_size=IMG,
                   patch_size=PATCH, num_classes=CLASSES)
    old = dict(gm.named_parameters())
    for op in ("stck", "inpt", "st", "st_stck", "st_inpt"):
        deep = deepen(gm, 5, op)
        assert {k: v.shape for k, v in deep.state_dict().items()} == \
            {k: v.shape for k, v in direct.state_dict().items()}, op
        new = dict(deep.named_parameters())
        # new blocks own their parameters: no tensor is shared between two blocks
        assert len({id(p) for p in new.values()}) == len(new)
    stck = dict(deepen(gm, 5, "stck").named_parameters())
    assert stck["blocks.0.attn.qkv.weight"] is old["blocks.0.attn.qkv.weight"]
    assert torch.equal(stck["blocks.4.attn.qkv.weight"], old["blocks.0.attn.qkv.weight"])
    assert stck["blocks.4.attn.qkv.weight"] is not old["blocks.0.attn.qkv.weight"]
    assert torch.equal(stck["blocks.3.mlp.fc1.bias"], old["blocks.1.mlp.fc1.bias"])
    inpt = dict(deepen(gm, 4, "inpt").named_parameters())  # k = 2: w0 w0 w1 w1
    assert inpt["blocks.2.norm1.weight"] is old["blocks.1.norm1.weight"]
    assert torch.equal(inpt["blocks.1.norm1.weight"], old["blocks.0.norm1.weight"])
    ident = dict(deepen(gm, 4, "st_inpt").named_parameters())
    assert bool((ident["blocks.1.attn.proj.weight"] == 0).all())
    assert bool((ident["blocks.1.norm2.weight"] == 0).all())
    assert torch.equal(ident["blocks.1.attn.qkv.weight"], old["blocks.0.attn.qkv.weight"])


def test_passes_leave_the_input_alone_and_round_trip(tmp_path):
    gm, x = _tiny(), _x()
    before = ({k: v.clone() for k, v in gm.state_dict().items()}, gm.code)
    grown = deepen(widen(gm, 64, "b2b", seed=3), 3, "st_stck")
    assert gm.code == before[1]
    assert all(torch.equal(v, before[0][k]) for k, v in gm.state_dict().items())
    assert [r["pass"] for r in fxgrow.history(grown)] == ["widen", "deepen"]
    fxgrow.save(grown, tmp_path / "m")
    loaded = fxgrow.load(tmp_path / "m").eval()
    assert torch.equal(loaded(x), grown.eval()(x))
    assert widen(gm, 64, "b2b", seed=3).state_dict().keys() == \
        widen(gm, 64, "b2b", seed=3).state_dict().keys()
    a, b = widen(gm, 64, "b2b", seed=3), widen(gm, 64, "b2b", seed=3)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_non_fused_attention_scale_follows_the_head_dim():
    gm, x = _tiny(fused_attn=False), _x()
    wide = widen(gm, 64, "st", "follow").eval()
    torch.testing.assert_close(wide(x), gm(x), atol=2e-5, rtol=1e-5)
    keep = widen(gm, 64, "st", "keep")
    assert "0.17677669" in keep.code  # 32 ** -0.5, the new head dim's scale
    fused = _tiny()
    fused.load_state_dict(gm.state_dict())
    fused_keep = widen(fused, 64, "st", "keep").eval()
    torch.testing.assert_close(keep.eval()(x), fused_keep(x), atol=1e-5, rtol=1e-5)


def test_refusals():
    gm = _tiny()
    with pytest.raises(WidenError, match="head dim"):
        widen(gm, 40, "st", "follow")  # 40 is not a multiple of the head dim 16
    with pytest.raises(WidenError, match="heads"):
        widen(gm, 33, "st", "keep")
    with pytest.raises(WidenError, match="below"):
        widen(gm, 16)
    with pytest.raises(WidenError, match="operator"):
        widen(gm, 64, "net2net")
    with pytest.raises(WidenError, match="GraphModule"):
        widen(nn.Linear(3, 3), 64)
    mlp = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)))
    with pytest.raises(WidenError, match="residual"):
        widen(mlp, 8, example_inputs=torch.zeros(1, 4))
    with pytest.raises(DeepenError, match="no blocks"):
        deepen(mlp, 3)
    with pytest.raises(DeepenError, match="below"):
        deepen(gm, 1)
    with pytest.raises(DeepenError, match="operator"):
        deepen(gm, 4, "copy")
    assert issubclass(WidenError, fxgrow.FxgrowError) and issubclass(DeepenError, fxgrow.FxgrowError)
    # after neuron growth: copying blocks works, widening and identity blocks are refused
    grown = fxgrow.passes.grow(gm, fxgrow.GrowthPlan({"blocks.0.mlp.fc1": [0, 3],
                                                      "blocks.0.attn.proj": [1]}))
    x = _x()
    assert deepen(grown, 3, "stck")(x).shape == (3, CLASSES)
    with pytest.raises(WidenError, match="could not be followed|cannot follow"):
        widen(grown, 64)
    with pytest.raises(DeepenError, match="does not end in a linear"):
        deepen(grown, 3, "st_stck")


# -- DeiT ---------------------------------------------------------------------------------------

def test_deit_tiny_to_small_width_and_small_to_24_blocks():
    tiny = build("deit_tiny_patch16_224")
    small_direct = timm.create_model("deit_small_patch16_224", pretrained=False)
    wide = widen(tiny, 384, "st")
    assert count_params(wide) == count_params(small_direct)
    assert {k: v.shape for k, v in wide.state_dict().items()} == \
        {k: v.shape for k, v in small_direct.state_dict().items()}
    small = build("deit_small_patch16_224")
    deep = deepen(small, 24, "st_stck")
    direct_24 = timm.create_model("deit_small_patch16_224", pretrained=False, depth=24)
    assert count_params(deep) == count_params(direct_24)
    assert {k: v.shape for k, v in deep.state_dict().items()} == \
        {k: v.shape for k, v in direct_24.state_dict().items()}


def test_deit_function_preserved_at_a_small_image():
    # the same architectures at 32x32 (5 tokens), so that one forward is cheap
    tiny = build("deit_tiny_patch16_224", img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    wide = widen(tiny, 384, "st").eval()
    torch.testing.assert_close(wide(x), tiny(x), atol=1e-5, rtol=1e-4)
    small = build("deit_small_patch16_224", img_size=32).eval()
    deep = deepen(small, 24, "st_stck").eval()
    assert torch.equal(deep(x), small(x))


def test_register_tokens_layer_scale_and_qk_norm():
    def vit(**kw):
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=CLASSES,
                                  img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=2,
                                  num_heads=HEADS, **kw).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        return fxgrow.trace(model)

    x = _x()
    regs = vit(reg_tokens=2)  # [cls, reg, reg, patches]: all carry the stream's channels
    torch.testing.assert_close(widen(regs, 64, "st").eval()(x), regs(x), atol=2e-5, rtol=1e-5)
    scaled = vit(init_values=0.1)  # LayerScale: the branch ends in x * gamma
    assert torch.equal(deepen(scaled, 4, "st_stck")(x), scaled(x))
    wide = widen(scaled, 64, "st")
    assert dict(wide.named_parameters())["blocks.0.ls1.gamma"].shape == (64,)
    qk = vit(qk_norm=True)  # a norm over the head dim: heads follow is exact, keep refused
    torch.testing.assert_close(widen(qk, 64, "st").eval()(x), qk(x), atol=2e-5, rtol=1e-5)
    with pytest.raises(WidenError, match="q_norm"):
        widen(qk, 64, "st", "keep")
