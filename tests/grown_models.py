"""Small grown models shared by the pack and fold tests: random multi-round nested plans whose
new weights are then randomised, so every pseudo-layer contributes to the output."""

from __future__ import annotations

import random

import timm
import torch
import torch.fx as fx

import fxgrow
from fxgrow.passes import grow

_VIT = dict(img_size=16, patch_size=8, embed_dim=24, num_heads=2, depth=2)
FAMILIES = {
    "deit_small_patch16_224": _VIT,
    "beit_base_patch16_224": _VIT,  # F.linear with a computed cat(q_bias, k_bias, v_bias)
    "cait_xxs24_224": _VIT,
    "swin_tiny_patch4_window7_224": dict(img_size=56, patch_size=4, window_size=7,
                                         depths=(1, 1), embed_dim=16, num_heads=(1, 2)),
}


def family(name: str, dtype: torch.dtype = torch.float64) -> tuple[fx.GraphModule, torch.Tensor]:
    kwargs = FAMILIES[name]
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"], dtype=dtype)
    return fxgrow.trace(model.to(dtype)), x


def grow_randomly(gm: fx.GraphModule, seed: object, rounds: int = 3) -> fx.GraphModule:
    """``rounds`` rounds over random linears (the classifier head included); after the first,
    half the picks are new linears of earlier rounds (nesting), modes drawn at random."""
    rng = random.Random(str(seed))
    for r in range(rounds):
        sites = fxgrow.linear_sites(gm)
        grown = sorted(t for t in sites if "_grow" in t)
        pool = sorted(sites) if r == 0 or not grown else rng.sample(sorted(sites), 3) + grown
        plan = {}
        for target in rng.sample(pool, min(len(pool), 4 + 2 * r)):
            width = sites[target][0].out_features
            plan[target] = rng.sample(range(width), rng.randint(1, min(3, width)))
        gm = grow(gm, plan, mode="paper" if r == 0 else rng.choice(["paper", "fused"]))
    randomise_grown(gm, rng.randrange(1 << 30))
    return gm


def randomise_grown(gm: fx.GraphModule, seed: int) -> None:
    """Give every grown parameter random values in place (a model in mid-training)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if "_grow" in name:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.3)


def grads(gm: fx.GraphModule, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The output and the gradient of a fixed function of it for every named parameter."""
    named = dict(gm.named_parameters())
    out = gm(x)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    values = torch.autograd.grad((out * weights).sum() + out.square().sum(), list(named.values()),
                                 allow_unused=True)
    return out.detach(), {n: g for n, g in zip(named, values) if g is not None}


def relative(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """max |a - b| over the largest |b| (or over ``scale``)."""
    a, b = a.detach(), b.detach()
    denominator = (b.abs().max() if scale is None else scale).clamp_min(1e-30)
    return float((a - b).abs().max() / denominator)


def saved_and_loaded(rewrite, tmp_path) -> tuple[fx.GraphModule, fx.GraphModule, torch.Tensor]:
    """A tiny grown ViT passed through ``rewrite`` (pack or fold), and the same saved with
    ``fxgrow.save`` and loaded back, both in eval mode, with an input."""
    gm = fxgrow.models.tiny_vit(num_classes=3, img_size=16, patch_size=8, embed_dim=16,
                                depth=1, num_heads=2)
    model = rewrite(grow_randomly(gm, rewrite.__name__, rounds=2))
    fxgrow.save(model, tmp_path / "m")
    loaded = fxgrow.load(tmp_path / "m")
    assert loaded.code == model.code
    return model.eval(), loaded.eval(), torch.randn(2, 3, 16, 16)
