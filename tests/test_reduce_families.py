"""reduce over model families, fused and non-fused attention: traces, runs forward and
backward, and the parameter count matches a closed form computed here from the architecture
(which parameters lose half of one dimension), not from the pass's bookkeeping."""

import re

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import fxgrow
from fxgrow.passes import reduce


class SeparateQKV(nn.Module):
    """A hand-written pre-norm block whose attention has separate q/k/v linears."""

    def __init__(self, dim: int = 32, heads: int = 4, hidden: int = 64, fused: bool = False):
        super().__init__()
        self.heads, self.fused = heads, fused
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x):
        B, N, C = x.shape
        h = self.norm1(x)
        q = self.q(h).reshape(B, N, self.heads, C // self.heads).transpose(1, 2)
        k = self.k(h).reshape(B, N, self.heads, C // self.heads).transpose(1, 2)
        v = self.v(h).reshape(B, N, self.heads, C // self.heads).transpose(1, 2)
        if self.fused:
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            a = ((q * (C // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        x = x + self.proj(a.transpose(1, 2).reshape(B, N, C))
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(x.mean(1))


HALVED_ATTN = [
    r"\.attn\.qkv\.(weight|bias)$", r"\.attn\.proj\.weight$", r"\.attn\.[qk]_norm\.(weight|bias)$",
    r"\.attn\.[qv]_bias$", r"\.attn\.[qkv]\.(weight|bias)$",
    r"\.attn\.qkv\.(linear\.weight|bn\.(weight|bias))$", r"\.attn\.proj\.ln\.linear\.weight$",
    r"attn_downsample\.(kv|q\.ln)\.(linear\.weight|bn\.(weight|bias))$",
    r"attn_downsample\.proj\.ln\.linear\.weight$", r"^[qkv]\.(weight|bias)$", r"^proj\.weight$",
]
HALVED_MLP = [
    r"\.mlp\.fc1\.(weight|bias)$", r"\.mlp\.fc2\.weight$",
    r"\.mlp\.ln1\.(linear\.weight|bn\.(weight|bias))$", r"\.mlp\.ln2\.linear\.weight$",
    r"^fc1\.(weight|bias)$", r"^fc2\.weight$",
]


def small_vit(**kw):
    return dict(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=4, **kw)


FAMILIES = {
    "vit": (lambda: timm.create_model("vit_small_patch16_224", num_classes=10, **small_vit()), 32),
    "vit_qknorm": (lambda: timm.create_model("vit_small_patch16_224", num_classes=10,
                                             **small_vit(qk_norm=True)), 32),
    "deit": (lambda: timm.create_model("deit_tiny_patch16_224", num_classes=10, **small_vit()), 32),
    "deit_qknorm": (lambda: timm.create_model("deit_tiny_patch16_224", num_classes=10,
                                              **small_vit(qk_norm=True)), 32),
    "deit3": (lambda: timm.create_model("deit3_small_patch16_224", num_classes=10, **small_vit()), 32),
    "beit": (lambda: timm.create_model("beit_base_patch16_224", num_classes=10, **small_vit()), 32),
    "cait": (lambda: timm.create_model("cait_xxs24_224", num_classes=10,
                                       **small_vit(depth_token_only=1)), 32),
    "swin": (lambda: timm.create_model("swin_tiny_patch4_window7_224", num_classes=10, img_size=32,
                                       window_size=4, embed_dim=32, depths=(1, 1),
                                       num_heads=(2, 4)), 32),
    "levit": (lambda: timm.create_model("levit_128s", num_classes=10, img_size=64,
                                        embed_dim=(64, 96), key_dim=8, depth=(1, 1),
                                        num_heads=(2, 3)), 64),
    "pit": (lambda: timm.create_model("pit_ti_224", num_classes=10, img_size=64,
                                      depth=(1, 1, 1)), 64),
    "separate_qkv": (lambda: SeparateQKV(), None),
}
# families whose attention cannot be narrowed: (error message substring); their MLPs can
HEAD_DIM_FIXED = {
    "eva02": ((lambda: timm.create_model("eva02_tiny_patch14_224", num_classes=10, img_size=28,
                                         depth=1), 28), "fixed by frozen tensor"),
    "xcit": ((lambda: timm.create_model("xcit_nano_12_p16_224", num_classes=10, img_size=32,
                                        embed_dim=64, depth=1, num_heads=4, cls_attn_layers=1), 32),
             "channel attention"),
}


def build(builder, fused: bool) -> tuple[nn.Module, bool]:
    model = builder().eval()
    has_flag = False
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
            has_flag = True
        if isinstance(module, SeparateQKV):
            module.fused = fused
            has_flag = True
    return model, has_flag


def closed_form(model: nn.Module, patterns: list[str]) -> int:
    """Parameters after halving one dimension of every parameter matching ``patterns``."""
    total = 0
    for name, p in model.named_parameters():
        halved = any(re.search(pat, name) for pat in patterns)
        total += p.numel() // 2 if halved else p.numel()
    return total


def example(side):
    return torch.randn(2, 3, side, side) if side else torch.randn(2, 6, 32)


def forward_backward(gm, side):
    x = example(side)
    x = torch.cat([x, x[:1]])  # a batch size the example input did not have
    out = gm(x)
    out.sum().backward()
    assert out.shape[0] == 3 and torch.isfinite(out).all()
    assert all(p.grad is not None for p in gm.parameters() if p.requires_grad)


CASES = [(name, fused) for name in FAMILIES for fused in (True, False)]


@pytest.mark.parametrize("name,fused", CASES, ids=[f"{n}-{'fused' if f else 'plain'}" for n, f in CASES])
def test_family_reduces_to_closed_form(name, fused):
    builder, side = FAMILIES[name]
    model, has_flag = build(builder, fused)
    if not fused and not has_flag:
        pytest.skip(f"{name} has only one attention implementation")
    gm = fxgrow.trace(model)
    small = example(side)[:1]
    reduced = reduce(gm, {"head_dim": 0.5, "mlp_hidden": 0.5}, small)
    got = sum(p.numel() for p in reduced.parameters())
    assert got == closed_form(model, HALVED_ATTN + HALVED_MLP)
    assert got < sum(p.numel() for p in model.parameters())
    forward_backward(reduced, side)


CASES_FIXED = [(name, fused) for name in HEAD_DIM_FIXED for fused in (True, False)]


@pytest.mark.parametrize("name,fused", CASES_FIXED,
                         ids=[f"{n}-{'fused' if f else 'plain'}" for n, f in CASES_FIXED])
def test_family_with_fixed_head_dim(name, fused):
    (builder, side), message = HEAD_DIM_FIXED[name]
    model, has_flag = build(builder, fused)
    if not fused and not has_flag:
        pytest.skip(f"{name} has only one attention implementation")
    gm = fxgrow.trace(model)
    small = example(side)[:1]
    code = gm.code
    with pytest.raises(fxgrow.ReduceError, match=message) as info:
        reduce(gm, {"head_dim": 0.5}, small)
    assert "head_dim" in str(info.value) and "blocks.0.attn.qkv" in str(info.value)
    assert gm.code == code
    reduced = reduce(gm, {"mlp_hidden": 0.5}, small)
    assert sum(p.numel() for p in reduced.parameters()) == closed_form(model, HALVED_MLP)
    forward_backward(reduced, side)


FLAGGED = [name for name in FAMILIES if name not in ("levit",)]


@pytest.mark.parametrize("name", FLAGGED)
def test_fused_and_plain_attention_reduce_to_the_same_function(name):
    # Same weights, same kept channels: the plain graph's rewritten `q * scale` constant must
    # match what fused attention does by default for the new head dim.
    builder, side = FAMILIES[name]
    model, _ = build(builder, True)
    fused_gm = fxgrow.trace(model)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
        if isinstance(module, SeparateQKV):
            module.fused = False
    plain_gm = fxgrow.trace(model)
    x = example(side)
    spec = {"head_dim": 0.5, "mlp_hidden": 0.5}
    a = reduce(fused_gm, spec, x[:1])
    b = reduce(plain_gm, spec, x[:1])
    assert fxgrow.history(a)[-1]["args"]["indices"] == fxgrow.history(b)[-1]["args"]["indices"]
    torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-5)
    kept = reduce(plain_gm, dict(spec, scale="keep"), x[:1])
    kept_fused = reduce(fused_gm, dict(spec, scale="keep"), x[:1])
    torch.testing.assert_close(kept(x), kept_fused(x), rtol=1e-4, atol=1e-5)
    assert not torch.equal(kept(x), b(x))  # the kept scale is a different function
