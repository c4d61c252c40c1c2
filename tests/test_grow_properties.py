"""Properties of growth over random small transformers, plans, modes, scales and rounds
(nested growth included): the grown graph lints, is node-by-node and gradient-exact against
its base, and adds exactly the closed-form number of parameters. Save/load round trips of
grown graphs are property-tested in tests/test_io_properties.py."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fxgrow
import fxgrow.models
from fxgrow import GrowthPlan
from fxgrow.passes import grow, grow_lineage
from fxgrow.verify import check_equivalence

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, act: type[nn.Module], bias: bool,
                 split_qkv: bool):
        super().__init__()
        self.heads, self.split_qkv = heads, split_qkv
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        if split_qkv:
            self.q, self.k, self.v = (nn.Linear(dim, dim, bias=bias) for _ in range(3))
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.act = nn.Linear(dim, hidden, bias=bias), act()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.norm1(x)
        if self.split_qkv:
            q, k, v = self.q(h), self.k(h), self.v(h)
        else:
            q, k, v = self.qkv(h).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))
        attn = (q @ k.transpose(-2, -1) * (c // self.heads) ** -0.5).softmax(dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class _Transformer(nn.Module):
    """Blocks over token inputs, mean pooling and a head; ``tied`` applies block 0 twice
    (a shared module: its linears have two call sites)."""

    def __init__(self, dim, heads, hidden, depth, act, bias, split_qkv, tied, classes):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(dim, heads, hidden, act, bias, split_qkv)
                                    for _ in range(depth))
        self.tied = tied
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.tied:
            x = self.blocks[0](x)
        return self.head(x.mean(dim=1))


@st.composite
def _plans(draw, gm):
    """1 to 3 rounds of (plan, mode); later rounds may pick the new linears of earlier ones,
    so the plans are drawn while growing."""
    rounds = draw(st.integers(1, 3))
    scale = draw(st.sampled_from([0.2, 0.5, -1.0, 1e-3, 3.0]))
    steps = []
    grown = gm
    for _ in range(rounds):
        sites = fxgrow.linear_sites(grown)
        targets = draw(st.lists(st.sampled_from(sorted(sites)), min_size=1, max_size=4,
                                unique=True))
        plan = {}
        for t in targets:
            width = sites[t][0].out_features
            plan[t] = draw(st.lists(st.integers(0, width - 1), min_size=1,
                                    max_size=min(width, 5), unique=True))
        mode = draw(st.sampled_from(["paper", "fused"]))
        steps.append((GrowthPlan(plan), mode))
        grown = grow(grown, plan, scale=scale, mode=mode)
    return steps, scale


def _check(gm: torch.fx.GraphModule, steps, scale, x: torch.Tensor) -> None:
    grown = gm
    expected_delta = 0
    for plan, mode in steps:
        expected_delta += plan.num_params(grown, mode=mode)
        grown = grow(grown, plan, scale=scale, mode=mode)
    grown.graph.lint()
    report = check_equivalence(gm, grown, x)
    assert report.ok, report.table(only_failures=True)
    base_params = {n for n, _ in gm.named_parameters()}
    assert {r.name for r in report.rows if r.kind == "grad"} == base_params
    delta = sum(p.numel() for p in grown.parameters()) - sum(p.numel() for p in gm.parameters())
    assert delta == expected_delta
    assert set(grow_lineage(grown)) == {n for n, _ in grown.named_parameters()} - base_params


@st.composite
def _vit_cases(draw):
    heads = draw(st.integers(1, 3))
    spec = {
        "source": "timm",
        "name": "vit_tiny_patch16_224",
        "kwargs": {
            "img_size": 8,
            "patch_size": 4,
            "embed_dim": heads * draw(st.sampled_from([2, 4, 8])),
            "depth": draw(st.integers(1, 2)),
            "num_heads": heads,
            "mlp_ratio": draw(st.sampled_from([0.5, 1.0, 2.0, 4.0])),
            "qkv_bias": draw(st.booleans()),
            "qk_norm": draw(st.booleans()),
            "num_classes": draw(st.integers(1, 4)),
        },
        "fused_attn": draw(st.booleans()),
    }
    torch.manual_seed(draw(st.integers(0, 2**16)))
    gm = fxgrow.models.build(spec).eval()
    steps, scale = draw(_plans(gm))
    return gm, steps, scale, torch.randn(draw(st.integers(1, 2)), 3, 8, 8)


@settings(max_examples=110, **SETTINGS)
@given(_vit_cases())
def test_timm_vit_growth_is_exact(case):
    _check(*case)


@st.composite
def _hand_cases(draw):
    heads = draw(st.integers(1, 3))
    dim = heads * draw(st.sampled_from([1, 2, 4]))
    model = _Transformer(
        dim=dim,
        heads=heads,
        hidden=draw(st.integers(1, 12)),
        depth=draw(st.integers(1, 2)),
        act=draw(st.sampled_from([nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh])),
        bias=draw(st.booleans()),
        split_qkv=draw(st.booleans()),
        tied=draw(st.booleans()),
        classes=draw(st.integers(1, 4)),
    )
    torch.manual_seed(draw(st.integers(0, 2**16)))
    for p in model.parameters():  # LayerNorm starts at 1/0; make every parameter matter
        nn.init.normal_(p, std=0.5)
    gm = fxgrow.trace(model)
    steps, scale = draw(_plans(gm))
    x = torch.randn(draw(st.integers(1, 3)), draw(st.integers(1, 5)), dim)
    return gm, steps, scale, x


@settings(max_examples=110, **SETTINGS)
@given(_hand_cases())
def test_hand_written_transformer_growth_is_exact(case):
    _check(*case)
