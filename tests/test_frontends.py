"""Graphs beyond symbolic tracing: the export frontend, torch.nn attention, HuggingFace
transformers, and saving models fxgrow cannot rebuild by name (docs/tracing.md)."""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxgrow
from fxgrow.errors import CheckpointError, ReduceError
from fxgrow.passes import analyze, grow, reduce
from fxgrow.verify import check_equivalence


def _grown(gm, inputs, labels, loss_fn, reduce_kwargs, budget=6):
    """reduce -> analyze (the given loss) -> select -> grow; checks equivalence exactly."""
    reduced = reduce(gm, example_inputs=inputs, keep="first", **reduce_kwargs)
    report = analyze(reduced, [(inputs, labels)], loss_fn, progress=False, method="exact")
    plan = fxgrow.select(report, budget=budget, layer_threshold=1)
    grown = grow(reduced, plan)
    result = check_equivalence(reduced, grown, inputs,
                               loss_fn=lambda out: loss_fn(out, labels))
    assert result.ok, result.table(only_failures=True, max_rows=10)
    assert result.num_grads_compared == sum(1 for _ in reduced.parameters()) \
        if hasattr(result, "num_grads_compared") else True
    return reduced, plan, grown


def _trains(gm, inputs, labels, loss_fn, steps=3):
    """A few SGD steps lower the loss on one batch and reach every parameter."""
    gm.train(False)
    params = [p for p in gm.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(gm(*inputs), labels)
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert all(p.grad is not None for p in params)
    assert losses[-1] < losses[0]


def _ce(out, labels):
    return F.cross_entropy(out, labels)


def _own_loss(out, _labels):
    return out[0]  # a HuggingFace model given labels returns (loss, logits, ...)


def _same_grads_for_originals(reduced, grown, inputs, loss):
    """Every parameter of ``reduced`` gets bitwise the same gradient in ``grown``."""
    originals = dict(reduced.named_parameters())
    for gm in (reduced, grown):
        gm.zero_grad(set_to_none=True)
    loss(reduced(*inputs)).backward()
    before = {k: p.grad.clone() for k, p in originals.items()}
    for p in originals.values():
        p.grad = None
    loss(grown(*inputs)).backward()
    after = dict(grown.named_parameters())
    assert set(before) <= set(after)
    for k, g in before.items():
        assert torch.equal(after[k].grad, g), k
    grown.zero_grad(set_to_none=True)


def _roundtrip(grown, path, inputs, **load_kwargs):
    fxgrow.save(grown, path)
    loaded = fxgrow.load(path, **load_kwargs)
    a, b = grown.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    out_a, out_b = grown(*inputs), loaded(*inputs)
    for x, y in zip(out_a if isinstance(out_a, tuple) else (out_a,),
                    out_b if isinstance(out_b, tuple) else (out_b,)):
        assert torch.equal(x, y)
    return loaded


# -- timm ViT through both frontends; one plan for both graphs ----------------------------------


def _timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=16, patch_size=8, num_classes=3, embed_dim=32, depth=1,
                             num_heads=2, mlp_ratio=2.0).eval()


@pytest.mark.parametrize("method", ["symbolic", "export"])
def test_timm_vit_pipeline(method, tmp_path):
    model = _timm_vit()
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
    gm = fxgrow.trace(model, x, method=method)
    assert torch.equal(gm(x), model(x))
    reduced, plan, grown = _grown(gm, (x,), y, _ce, {"head_dim": 0.5, "mlp_hidden": 0.5})
    widths = {t: s[0].out_features for t, s in fxgrow.linear_sites(reduced).items()}
    assert widths["blocks.0.attn.qkv"] == 3 * 2 * 8 and widths["blocks.0.mlp.fc1"] == 32
    _same_grads_for_originals(reduced, grown, (x,), lambda out: _ce(out, y))
    _roundtrip(grown, tmp_path / "m", (x,), model=_timm_vit())
    _trains(grown, (x,), y, _ce)


def test_plan_from_symbolic_graph_grows_the_same_neurons_in_the_exported_one():
    model = _timm_vit()
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 0])
    symbolic = fxgrow.trace(model, method="symbolic")
    exported = fxgrow.trace(model, x, method="export")
    assert list(fxgrow.linear_sites(symbolic)) == list(fxgrow.linear_sites(exported))
    report = analyze(symbolic, [((x,), y)], _ce, progress=False, method="exact")
    plan = fxgrow.select(report, budget=8, layer_threshold=1)
    from fxgrow.passes import grow_lineage

    a, b = grow(symbolic, plan), grow(exported, plan)
    assert grow_lineage(a) == grow_lineage(b)
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(b(x), exported(x))
    # the exported graph's own analysis ranks the same neurons
    report_b = analyze(exported, [((x,), y)], _ce, progress=False, method="exact")
    assert fxgrow.select(report_b, budget=8, layer_threshold=1).to_dict() == plan.to_dict()


# -- torch.nn and torchvision attention ------------------------------------------------------


def _encoder(norm_first):
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True,
                                       norm_first=norm_first)
    return nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_transformer_encoder_exposes_its_attention(norm_first, tmp_path):
    torch.manual_seed(1)
    model = _encoder(norm_first)
    x, y = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    gm = fxgrow.trace(model, x)  # symbolic tracing keeps the layers opaque: export is chosen
    assert fxgrow.recipe(gm)["base"]["trace"]["method"] == "export"
    sites = fxgrow.linear_sites(gm)
    assert list(sites)[:4] == ["layers.0.self_attn.in_proj_weight",
                               "layers.0.self_attn.out_proj.weight",
                               "layers.0.linear1", "layers.0.linear2"]
    assert gm(torch.randn(3, 7, 16)).shape == (3, 7, 16)  # batch and tokens stay dynamic
    mse = lambda out, target: F.mse_loss(out, target)  # noqa: E731
    reduced, plan, grown = _grown(gm, (x,), y, mse, {"head_dim": 0.5, "mlp_hidden": 0.5})
    widths = {t: s[0].out_features for t, s in fxgrow.linear_sites(reduced).items()}
    assert widths["layers.0.self_attn.in_proj_weight"] == 3 * 2 * 4
    assert widths["layers.0.linear1"] == 16
    _same_grads_for_originals(reduced, grown, (x,), lambda out: mse(out, y))
    _roundtrip(grown, tmp_path / "m", (x,), model=_encoder(norm_first))


@pytest.mark.parametrize("method", ["symbolic", "export"])
def test_torchvision_vit_pipeline(method, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1,
                                                 num_heads=2, hidden_dim=16, mlp_dim=32,
                                                 num_classes=3).eval()
    nn.init.normal_(model.heads.head.weight, std=0.2)  # zero at init: no gradient would flow
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([2, 1])
    gm = fxgrow.trace(model, x, method=method)
    torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    reduced, plan, grown = _grown(gm, (x,), y, _ce, {"head_dim": 0.5, "mlp_hidden": 0.5})
    stem = "encoder.layers.encoder_layer_0"
    widths = {t: s[0].out_features for t, s in fxgrow.linear_sites(reduced).items()}
    assert widths[f"{stem}.self_attention.in_proj_weight"] == 3 * 2 * 4
    assert widths[f"{stem}.mlp.0"] == 16
    _same_grads_for_originals(reduced, grown, (x,), lambda out: _ce(out, y))
    fresh = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1,
                                                 num_heads=2, hidden_dim=16, mlp_dim=32,
                                                 num_classes=3)
    _roundtrip(grown, tmp_path / "m", (x,), model=fresh)
    _trains(grown, (x,), y, _ce)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_symbolic_trace_spells_out_multihead_attention(batch_first, need_weights):
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=need_weights)

    model = Wrapper().eval()
    gm = fxgrow.trace(model, method="symbolic")
    assert list(fxgrow.linear_sites(gm)) == ["attn.in_proj_weight", "attn.out_proj.weight"]
    assert gm.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    (out, weights), (ref, ref_weights) = gm(x), model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    if need_weights:
        torch.testing.assert_close(weights, ref_weights, rtol=1e-5, atol=1e-6)
    else:
        assert weights is None and ref_weights is None


# -- a module of the user's own --------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(att)
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x.mean(1))


@pytest.mark.parametrize("method", ["symbolic", "export"])
def test_user_module_saves_and_loads_with_the_model_given(method, tmp_path):
    model = _Block()
    x, y = torch.randn(2, 4, 16), torch.tensor([0, 1])
    gm = fxgrow.trace(model, x, method=method)
    reduced, plan, grown = _grown(gm, (x,), y, _ce, {"mlp_hidden": 0.5}, budget=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _roundtrip(grown, tmp_path / "m", (x,), model=_Block())
    fresh = _Block()
    fresh.fc1 = nn.Linear(16, 8)  # another architecture: the weights cannot fit
    with pytest.raises(CheckpointError, match="do not match|shape mismatch|failed"):
        fxgrow.load(tmp_path / "m", model=fresh)
    with pytest.raises(CheckpointError, match="_Block.*model="):
        fxgrow.load(tmp_path / "m")
    with pytest.raises(CheckpointError, match="_Block.*Linear"):
        fxgrow.load(tmp_path / "m", model=nn.Linear(2, 2))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- HuggingFace transformers 5 (the fxgrow[hf] extra) -----------------------------------------


def _tensor(*shape, dtype="int64"):
    return {"shape": list(shape), "dtype": dtype}


_HF = {
    "bert": (
        "BertForSequenceClassification",
        dict(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
             intermediate_size=64, max_position_embeddings=16, num_labels=3),
        {"input_ids": _tensor(2, 5), "labels": _tensor(2)},
        lambda: (torch.randint(0, 50, (2, 5)), torch.tensor([0, 2])),
        {"head_dim": 0.5, "mlp_hidden": 0.5},
        "bert.encoder.layer.0.intermediate.dense",
    ),
    "vit": (
        "ViTForImageClassification",
        dict(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
             num_attention_heads=2, intermediate_size=64, num_labels=3),
        {"pixel_values": _tensor(2, 3, 16, 16, dtype="float32"), "labels": _tensor(2)},
        lambda: (torch.randn(2, 3, 16, 16), torch.tensor([1, 2])),
        {"head_dim": 0.5, "mlp_hidden": 0.5},
        "vit.layers.0.mlp.fc1",
    ),
    "llama": (  # grouped-query attention (4 heads, 2 kv heads), SwiGLU, RoPE
        "LlamaForCausalLM",
        dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
             use_cache=False),
        {"input_ids": _tensor(2, 6), "labels": _tensor(2, 6)},
        lambda: (torch.randint(0, 64, (2, 6)), torch.randint(0, 64, (2, 6))),
        {"mlp_hidden": 0.5},
        "model.layers.0.mlp.gate_proj",
    ),
}


@functools.cache
def _hf_graph(name):
    """One export per model for the module (an export takes seconds). The pipeline test
    trains it last; the refusal test reads only its structure."""
    cls, config, inputs_spec, *_ = _HF[name]
    torch.manual_seed(0)
    return fxgrow.models.build({"source": "hf", "class": cls, "config": config,
                                "inputs": inputs_spec})


@pytest.mark.parametrize("name", list(_HF))
def test_huggingface_pipeline(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    cls, config, inputs_spec, make, reduce_kwargs, mlp = _HF[name]
    gm = _hf_graph(name)
    inputs = make()
    # the graph computes what the eager model computes with the same weights
    model = getattr(transformers, cls)(getattr(transformers, cls).config_class(**config)).eval()
    model.load_state_dict(gm.state_dict(), strict=False)
    eager = model(**dict(zip(inputs_spec, inputs)))
    assert torch.equal(gm(*inputs)[0], eager.loss)
    reduced, plan, grown = _grown(gm, inputs, None, _own_loss, reduce_kwargs)
    # an independent reference for the MLP: the model built narrower, given the kept rows
    assert fxgrow.linear_sites(reduced)[mlp][0].out_features == config["intermediate_size"] // 2
    if "head_dim" not in reduce_kwargs:
        narrow = getattr(transformers, cls)(getattr(transformers, cls).config_class(
            **{**config, "intermediate_size": config["intermediate_size"] // 2})).eval()
        narrow.load_state_dict(reduced.state_dict(), strict=False)
        torch.testing.assert_close(narrow(**dict(zip(inputs_spec, inputs))).logits,
                                   reduced(*inputs)[1], rtol=1e-5, atol=1e-6)
    _same_grads_for_originals(reduced, grown, inputs, lambda out: out[0])
    _roundtrip(grown, tmp_path / "m", inputs)
    _trains(grown, inputs, None, _own_loss)


def test_llama_head_dim_is_refused_by_its_rotary_table():
    pytest.importorskip("transformers")
    make = _HF["llama"][3]
    gm = _hf_graph("llama")
    groups = {g.producers[0]: g for g in fxgrow.passes.width_groups(gm, make())}
    q = groups["model.layers.0.self_attn.q_proj"]
    assert not q.reducible and "rotary_emb.inv_freq" in q.reason and "RoPE" in q.reason
    with pytest.raises(ReduceError, match="inv_freq.*RoPE"):
        reduce(gm, example_inputs=make(), widths={"model.layers.0.self_attn.q_proj": 16})


def test_gpt2_conv1d_is_a_linear_with_a_transposed_weight():
    transformers = pytest.importorskip("transformers")
    config = dict(vocab_size=40, n_positions=16, n_embd=32, n_layer=1, n_head=2, use_cache=False,
                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()
    ids = torch.randint(0, 40, (2, 5))
    gm = fxgrow.trace(model, {"input_ids": ids, "labels": ids}, method="export")
    sites = fxgrow.linear_sites(gm)
    fc = sites["transformer.h.0.mlp.c_fc"][0]
    assert fc.weight_transposed and fc.weight.shape == (128, 32)  # Conv1D stores (in, out)
    assert torch.equal(fc.weight, model.transformer.h[0].mlp.c_fc.weight.t())
    grown = grow(gm, {"transformer.h.0.mlp.c_fc": [3, 7], "transformer.h.0.attn.c_attn": [1]})
    assert torch.equal(grown(ids, ids)[0], gm(ids, ids)[0])
    # the MLP narrowed: the same as GPT-2 built with n_inner 64 and the kept (first) rows
    reduced = reduce(gm, example_inputs=(ids, ids), mlp_hidden=0.5, keep="first")
    narrow = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config, n_inner=64)).eval()
    narrow.load_state_dict(reduced.state_dict(), strict=False)
    torch.testing.assert_close(narrow(input_ids=ids).logits, reduced(ids, ids)[1],
                               rtol=1e-5, atol=1e-6)


def test_flops_of_an_exported_graph_match_the_symbolic_graph():
    from fxgrow.verify import count_flops

    model = _timm_vit()
    x = torch.randn(2, 3, 16, 16)
    symbolic = fxgrow.trace(model, method="symbolic")
    exported = fxgrow.trace(model, x, method="export")
    assert count_flops(exported, x).total == count_flops(symbolic, x).total
    plan = {"blocks.0.mlp.fc1": [0, 3, 5]}
    grown = count_flops(grow(exported, plan), x).total - count_flops(exported, x).total
    tokens = 2 * (1 + (16 // 8) ** 2)
    assert grown == 2 * 3 * 32 * tokens  # a pair of neurons per index: 2 k d per token


class _EinsumAttention(nn.Module):
    """Attention written with einsum (as timm's MaxViT and SAM write it)."""

    def __init__(self, dim=16, heads=2, head_dim=8):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        logits = torch.einsum("bhid,bhjd->bhij", q * self.head_dim ** -0.5, k)
        out = torch.einsum("bhij,bhjd->bhid", logits.softmax(-1), v)
        return x + self.proj(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


@pytest.mark.parametrize("method", ["symbolic", "export"])
def test_einsum_attention_head_dim_narrows_like_a_narrower_model(method):
    model = _EinsumAttention().eval()
    x = torch.randn(2, 5, 16)
    gm = fxgrow.trace(model, x, method=method)
    reduced = reduce(gm, example_inputs=x, head_dim=0.5, keep="first")
    narrow = _EinsumAttention(head_dim=4).eval()
    narrow.load_state_dict(reduced.state_dict())
    torch.testing.assert_close(reduced(x), narrow(x), rtol=1e-5, atol=1e-6)


def test_beit_cat_bias_linear_is_the_same_target_and_reduction_in_both_graphs():
    import timm

    model = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, embed_dim=32, depth=1, num_heads=2,
                              num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    symbolic = fxgrow.trace(model, method="symbolic")
    exported = fxgrow.trace(model, x, method="export")
    assert "blocks.0.attn.qkv.weight" in fxgrow.linear_sites(exported)  # F.linear: weight path
    assert list(fxgrow.linear_sites(symbolic)) == list(fxgrow.linear_sites(exported))
    a = reduce(symbolic, example_inputs=x, head_dim=0.5, mlp_hidden=0.5)
    b = reduce(exported, example_inputs=x, head_dim=0.5, mlp_hidden=0.5)
    assert fxgrow.history(a)[-1]["args"] == fxgrow.history(b)[-1]["args"]
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-6)
    grown = grow(b, {"blocks.0.attn.qkv.weight": [1, 20]})
    assert torch.equal(grown(x), b(x))


def test_cross_attention_linears_on_blocks_of_the_packed_projection():
    class CrossAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x, memory):
            return self.head(self.attn(x, memory, memory, need_weights=False)[0])

    model = CrossAttention().eval()
    x, memory = torch.randn(2, 4, 16), torch.randn(2, 6, 16)
    gm = fxgrow.trace(model, (x, memory), method="export")
    sites = fxgrow.linear_sites(gm)
    q, kv = sites["attn.in_proj_weight_rows0_16"][0], sites["attn.in_proj_weight_rows16_48"][0]
    packed = model.attn.in_proj_weight
    assert torch.equal(q.weight, packed[:16]) and torch.equal(kv.weight, packed[16:])
    assert torch.equal(kv.bias(gm), model.attn.in_proj_bias[16:])
    grown = grow(gm, {q.target: [0, 5], kv.target: [3, 17, 30]})
    result = check_equivalence(gm, grown, (x, memory))
    assert result.ok and sum(r.kind == "grad" for r in result.rows) == len(list(gm.parameters()))
    with pytest.raises(ReduceError, match="rows 0:16 of parameter 'attn.in_proj_weight'"):
        reduce(gm, example_inputs=(x, memory), head_dim=0.5)


def test_trace_refuses_what_it_cannot_record():
    from fxgrow.errors import TraceError

    model = _Block()
    with pytest.raises(TraceError, match="method must be one of"):
        fxgrow.trace(model, method="jit")
    with pytest.raises(TraceError, match="needs example_inputs"):
        fxgrow.trace(model, method="export")
    with pytest.raises(TraceError, match="example input 0 is a str, not a tensor"):
        fxgrow.trace(model, ("text",), method="export")
    with pytest.raises(TraceError, match="do not fit _Block.forward"):
        fxgrow.trace(model, {"y": torch.zeros(2, 4, 16)}, method="export")
