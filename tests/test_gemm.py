import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxgrow
from fxgrow.passes.analysis import gemm as _gemm
from fxgrow.passes.analysis.gemm import gemm_nt, linear
from fxgrow.passes.analysis.recording import recording_copy
from fxgrow.passes.analysis.splitting import splitting_matrices
from fxgrow.passes.analysis.targets import resolve_targets


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "matmul"])
def test_gemm_nt_is_a_float32_product_for_every_weight_layout(monkeypatch, onednn):
    if not onednn:
        monkeypatch.setattr(_gemm, "_ONEDNN_LINEAR", None)
    g = torch.Generator().manual_seed(7)
    a = torch.randn(300, 40, generator=g)
    wide = torch.randn(25, 6, 41, generator=g)
    bias = torch.randn(25, generator=g)
    weights = {
        "row-major": torch.randn(25, 40, generator=g),
        "column-major": torch.randn(40, 25, generator=g).T,
        "slice of a wider buffer": wide[:, 2, :40],  # oneDNN's slow case: copied first
    }
    for layout, b in weights.items():
        reference = a.double() @ b.double().T + bias.double()
        out = gemm_nt(a, b, bias)
        assert out.dtype == torch.float32 and out.shape == (300, 25), layout
        torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5, msg=layout)
        torch.testing.assert_close(gemm_nt(a, b), a @ b.T, rtol=1e-5, atol=1e-5, msg=layout)
    # Other dtypes are torch.matmul itself.
    a64, b64 = a.double(), weights["row-major"].double()
    assert torch.equal(gemm_nt(a64, b64), a64 @ b64.T)


@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_matches_f_linear_and_gives_the_input_gradient_only(with_bias):
    g = torch.Generator().manual_seed(9)
    weight = torch.randn(7, 5, generator=g, requires_grad=True)
    bias = torch.randn(7, generator=g, requires_grad=True) if with_bias else None
    base = torch.randn(4, 5, 3, generator=g)
    x = base.transpose(1, 2).requires_grad_()  # (4, 3, 5), not contiguous
    upstream = torch.randn(4, 3, 7, generator=g)
    out = linear(x, weight, bias)
    (grad_x,) = torch.autograd.grad(out, x, upstream)
    reference = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    (ref_grad,) = torch.autograd.grad(reference, x, upstream.double())
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_x.double(), ref_grad.double(), rtol=1e-5, atol=1e-5)
    assert out.grad_fn is not None and weight.grad is None
    # The parameters are outside the graph: asking for their gradient is an error.
    with pytest.raises(RuntimeError):
        torch.autograd.grad(linear(x, weight, bias).sum(), weight)


def test_recording_through_onednn_gives_the_matrices_of_plain_linears(monkeypatch):
    # The analysis's recording copy runs its linears through oneDNN; the statistics must be
    # those of the model's own F.linear, to float32 rounding.
    torch.manual_seed(0)
    gm = fxgrow.models.tiny_vit_reduced(img_size=16)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 16, 16, generator=g), torch.tensor([0, 1, 2, 3]))]
    rec, _ = recording_copy(gm, resolve_targets(gm, None, "operator"), "operator")
    calls = [n for n in rec.graph.nodes if n.op in ("call_function", "call_module")]
    assert any(n.target is linear for n in calls)
    assert not any(
        isinstance(rec.get_submodule(n.target), nn.Linear) for n in calls if n.op == "call_module"
    )
    routed = splitting_matrices(gm, batches, F.cross_entropy)
    monkeypatch.setattr(_gemm, "_ONEDNN_LINEAR", None)
    plain = splitting_matrices(gm, batches, F.cross_entropy)
    assert routed.keys() == plain.keys()
    for t in plain:
        scale = plain[t].abs().amax()
        torch.testing.assert_close(routed[t], plain[t], rtol=0, atol=1e-5 * float(scale), msg=t)
