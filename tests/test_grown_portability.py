"""A grown model works where a user takes it: torch.export, torch.compile, torch.jit.trace,
training mode with dropout, and eval mode."""

import warnings

import pytest
import timm
import torch

import fxgrow
from fxgrow.passes import grow


def _model(drop: float = 0.0, attn_drop: float | None = None) -> torch.nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=16, patch_size=8,
        depth=2, embed_dim=24, num_heads=2, mlp_ratio=2.0, drop_rate=drop, proj_drop_rate=drop,
        attn_drop_rate=drop if attn_drop is None else attn_drop,
    )


def _plan(gm) -> dict[str, list[int]]:
    return {t: [0, s[0].out_features - 1] for t, s in fxgrow.linear_sites(gm).items()}


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    base = fxgrow.trace(_model().eval())
    grown = grow(base, _plan(base))
    grown = grow(grown, {"blocks.0.mlp.fc1": [3], "blocks.1.attn.qkv_grow0_plus": [1]},
                 mode="fused")
    return base, grown


def test_torch_export(pair):
    base, grown = pair
    x = torch.randn(2, 3, 16, 16)
    exported = torch.export.export(grown, (x,))
    x2 = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(exported.module()(x2), grown(x2), rtol=0, atol=0)
    torch.testing.assert_close(exported.module()(x2), base(x2), rtol=0, atol=0)
    ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert any("index_put" in op for op in ops)


def test_torch_jit_trace(pair):
    base, grown = pair
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(grown, (x,))
    x2 = torch.randn(2, 3, 16, 16)
    assert torch.equal(traced(x2), grown(x2))
    assert torch.equal(traced(x2), base(x2))


@pytest.mark.slow  # about 75 s of inductor compilation on a loaded 2-core machine
def test_torch_compile(pair):
    base, grown = pair
    torch._dynamo.reset()
    compiled = torch.compile(grown, backend="inductor", dynamic=False)
    x = torch.randn(2, 3, 16, 16)
    # inductor may reassociate and fuse: equal up to float32 rounding
    torch.testing.assert_close(compiled(x), base(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_training_mode_with_dropout_matches_the_base_under_the_same_seed():
    torch.manual_seed(1)
    # Traced in training mode: timm's fused attention passes dropout_p only when training.
    base = fxgrow.trace(_model(drop=0.3).train())
    grown = grow(grow(base, _plan(base)), {"blocks.1.mlp.fc2": [2, 3]}, mode="fused")
    x = torch.randn(2, 3, 16, 16)
    outs = []
    for gm in (base, grown, base):
        torch.manual_seed(7)
        outs.append(gm(x))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    torch.manual_seed(8)
    assert not torch.equal(grown(x), outs[1])  # dropout is active


def test_eval_switches_every_module_and_keeps_the_function():
    torch.manual_seed(2)
    # No attention dropout: timm's fused attention bakes dropout_p into a training-mode trace
    # (a tracing limit, docs/tracing.md); module dropouts follow .eval().
    base = fxgrow.trace(_model(drop=0.3, attn_drop=0.0).train())
    grown = grow(base, _plan(base))
    grown.eval()
    base.eval()
    assert not any(m.training for m in grown.modules())
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(grown(x), grown(x))
    assert torch.equal(grown(x), base(x))
    grown.train()
    assert all(m.training for m in grown.modules())
    assert not torch.equal(grown(x), grown(x))
