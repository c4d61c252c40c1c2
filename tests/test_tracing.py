import pytest
import timm
import torch
from torch import nn

import fxgrow
from fxgrow.errors import TraceError

FAMILIES = [
    "deit_small_patch16_224",
    "levit_128s",
    "convit_tiny",
    "mvitv2_tiny",
    "maxvit_tiny_tf_224",
    "beit_base_patch16_224",
    "eva02_tiny_patch14_224",
    "swin_tiny_patch4_window7_224",
    "xcit_nano_12_p16_224",
    "cait_xxs24_224",
    "pit_ti_224",
]


def _small(name: str) -> nn.Module:
    kwargs = {"depth": 2} if name.startswith(("deit", "beit", "eva02", "cait", "xcit")) else {}
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_traced_output_equals_eager_and_model_is_untouched(name):
    model = _small(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attrs_before = {n: set(m.__dict__) for n, m in model.named_modules()}
    x = torch.randn(2, 3, 224, 224)
    gm = fxgrow.trace(model)
    again = fxgrow.trace(model)  # LeViT caches a traced value on a second eval-mode trace
    with torch.no_grad():
        eager = model(x)
        assert torch.equal(gm(x), eager)
        assert torch.equal(again(x), eager)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert attrs_before == {n: set(m.__dict__) for n, m in model.named_modules()}


def test_traced_module_shares_parameters_with_the_model():
    model = _small("deit_small_patch16_224")
    gm = fxgrow.trace(model)
    assert gm.get_submodule("blocks.0.mlp.fc1").weight is model.blocks[0].mlp.fc1.weight


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), _Branchy())

    def forward(self, x):
        return self.inner(x)


class _Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x
        return -x


def test_untraceable_model_names_module_and_construct():
    with pytest.raises(TraceError) as info:
        fxgrow.trace(_DataDependent())
    message = str(info.value)
    assert "'inner.1'" in message and "_Branchy" in message
    assert "control flow" in message and "leaf_modules" in message


def test_leaf_module_makes_it_traceable():
    model = _DataDependent()
    gm = fxgrow.trace(model, leaf_modules=[_Branchy])
    x = torch.randn(3, 4)
    assert torch.equal(gm(x), model(x))


def test_non_module_is_rejected():
    with pytest.raises(TraceError, match="expects an nn.Module"):
        fxgrow.trace(lambda x: x)


class _BakesAMask(nn.Module):
    """Like timm's Hiera: an optional argument whose None is baked into the graph by tracing
    with it concrete, so the traced graph computes another function."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x, scale=None):
        out = self.proj(x)
        return out if scale is None else out * scale


def test_trace_compares_the_graph_with_the_eager_model():
    model = _BakesAMask()
    x = torch.randn(2, 4)
    # traced as it is, `scale is None` is decided on a proxy: the graph fails when called
    with pytest.raises(TraceError, match="fails where the eager model runs"):
        fxgrow.trace(model, example_inputs=x)
    gm = fxgrow.trace(model, concrete_args={"scale": None}, example_inputs=x)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    with pytest.raises(TraceError, match="eager _BakesAMask fails"):
        fxgrow.trace(model, concrete_args={"scale": None}, example_inputs=torch.randn(2, 5))


def test_concrete_args_and_base_are_kept_in_the_spec(tmp_path):
    spec = {"source": "timm", "name": "vit_tiny_patch16_224",
            "kwargs": {"img_size": 16, "patch_size": 8, "depth": 1, "num_classes": 3}}
    model = timm.create_model(spec["name"], pretrained=False, **spec["kwargs"])
    concrete = {"attn_mask": None, "is_causal": False}
    gm = fxgrow.trace(model, base=spec, concrete_args=concrete)
    assert concrete.items() <= fxgrow.recipe(gm)["base"]["trace"]["concrete_args"].items()
    fxgrow.save(gm, tmp_path / "m")
    loaded = fxgrow.load(tmp_path / "m")
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), gm.eval()(x))
    plain = fxgrow.trace(model)
    rebased = fxgrow.trace(plain, base=spec)
    assert fxgrow.recipe(rebased)["base"] == spec and fxgrow.recipe(plain)["base"] != spec
    assert rebased is not plain and dict(rebased.named_parameters()).keys() == \
        dict(plain.named_parameters()).keys()
