import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxgrow
from fxgrow.passes.analysis import gemm as _gemm
from fxgrow.passes.analysis.gemm import GemmPath, gemm_nt, gemm_path, linear, probe_gemm
from fxgrow.passes.analysis.recording import recording_copy
from fxgrow.passes.analysis.splitting import splitting_matrices
from fxgrow.passes.analysis.targets import resolve_targets


def _force(monkeypatch, kernel):
    """Make the analysis's GEMMs take ``kernel`` in this test, whatever this CPU's probe chose
    (oneDNN only where it is float32-accurate here)."""
    op = None
    if kernel == "onednn":
        path = probe_gemm(_gemm.onednn_op())
        if path.onednn_error is None or "not float32-accurate" in path.reason:
            pytest.skip(f"no float32 oneDNN GEMM on this CPU: {path.describe()}")
        op = _gemm.onednn_op()
    forced = GemmPath(kernel, "forced by the test", 0.0, None, None)
    monkeypatch.setattr(_gemm, "_choice", lambda: (forced, op))


@pytest.mark.parametrize("kernel", ["onednn", "matmul"])
def test_gemm_nt_is_a_float32_product_for_every_weight_layout(monkeypatch, kernel):
    _force(monkeypatch, kernel)
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
    _force(monkeypatch, "onednn")
    routed = splitting_matrices(gm, batches, F.cross_entropy)
    _force(monkeypatch, "matmul")
    plain = splitting_matrices(gm, batches, F.cross_entropy)
    assert routed.keys() == plain.keys()
    for t in plain:
        scale = plain[t].abs().amax()
        torch.testing.assert_close(routed[t], plain[t], rtol=0, atol=1e-5 * float(scale), msg=t)


def _bf16_linear(a, b, bias, *_):
    """A kernel with oneDNN's signature that rounds its inputs to bf16, as oneDNN's bf16 math
    mode does on CPUs with bf16 units."""
    out = (a.bfloat16() @ b.bfloat16().T).float()
    return out if bias is None else out + bias


def _slow_linear(a, b, bias, *_):
    out = torch.stack([a @ b[i] for i in range(b.shape[0])], 1)  # exact enough, and slow
    return out if bias is None else out + bias


def _failing_linear(*_):
    raise RuntimeError("no kernel for this CPU")


def test_the_probe_takes_onednn_only_where_it_is_float32_and_faster():
    inexact = probe_gemm(_bf16_linear)
    assert inexact.kernel == "matmul" and "not float32-accurate" in inexact.reason
    assert inexact.onednn_error > 100 * inexact.matmul_error and inexact.speedup is None
    slow = probe_gemm(_slow_linear)
    assert slow.kernel == "matmul" and slow.speedup < _gemm._FASTER
    assert slow.onednn_error < 10 * slow.matmul_error + 1e-6
    for op in (None, _failing_linear):
        assert probe_gemm(op).kernel == "matmul" and probe_gemm(op).onednn_error is None
    # Whatever this CPU chose, the choice keeps the rules it was made by.
    chosen = gemm_path()
    assert chosen.kernel in ("onednn", "matmul") and chosen.kernel in chosen.describe()
    if chosen.kernel == "onednn":
        assert chosen.speedup >= _gemm._FASTER and chosen.onednn_error < 1e-5


def test_the_matmul_path_gives_matmul_results_exactly(monkeypatch):
    _force(monkeypatch, "matmul")
    g = torch.Generator().manual_seed(3)
    a, b, bias = torch.randn(50, 20, generator=g), torch.randn(30, 20, generator=g), \
        torch.randn(30, generator=g)
    assert not _gemm.onednn_applies(a)
    assert torch.equal(gemm_nt(a, b, bias), a @ b.T + bias)
    assert torch.equal(gemm_nt(a, b.T.contiguous().T), a @ b.T)
    x = torch.randn(4, 5, 20, generator=g)
    assert torch.equal(linear(x, b, bias), F.linear(x, b, bias))
