import importlib
import math

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.autograd.functional import hessian
from torch.func import functional_call

import fxgrow
from fxgrow.errors import AnalysisError
from fxgrow.passes import analyze, default_targets, grow, splitting_matrices
from fxgrow.passes.analysis.statistics import Reservoir


class Tiny(nn.Module):
    """fc1 -> GELU -> fc2 (no bias) -> mean over tokens -> head. Tokens: (B, N, 4)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(6, 5, bias=False)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.fc2(self.act(self.fc1(x))).mean(1))


def _batches(n=2, b=3, tokens=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, tokens, 4, generator=g, dtype=dtype),
             torch.randint(0, 3, (b,), generator=g)) for _ in range(n)]


def _tiny_gm():
    return fxgrow.trace(Tiny().double())


def _reference_terms(model, batches):
    """Per batch, from a hand-written eager forward: fc1's input x~, fc1's output o1, dL/do1,
    dL/dsigma; fc2's input and dL/do2. Independent of fxgrow."""
    out = []
    for x, y in batches:
        o1 = model.fc1(x)
        a1 = F.gelu(o1)
        o2 = model.fc2(a1)
        loss = F.cross_entropy(model.head(o2.mean(1)), y)
        g1, s1, g2 = torch.autograd.grad(loss, [o1, a1, o2])
        xt1 = torch.cat([x, torch.ones_like(x[..., :1])], -1).reshape(-1, 5)
        out.append(dict(x1=xt1, o1=o1.reshape(-1, 6).detach(), g1=g1.reshape(-1, 6),
                        s1=s1.reshape(-1, 6), x2=a1.reshape(-1, 6).detach(), g2=g2.reshape(-1, 5)))
    return out


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_operator_form_matrices_equal_the_hessian_of_their_definition():
    gm = _tiny_gm()
    batches = _batches()
    S = splitting_matrices(gm, batches, F.cross_entropy)
    assert list(S) == ["fc1", "fc2"]  # head excluded by default
    assert S["fc1"].shape == (6, 5, 5) and S["fc2"].shape == (5, 6, 6)  # fc2 has no bias
    terms = _reference_terms(gm, batches)
    for target, xk, gk in (("fc1", "x1", "g1"), ("fc2", "x2", "g2")):
        for j in range(S[target].shape[0]):
            # f(v) = 1/B sum_b sum_t g_{t,j} GeLU(v . x~_t), g fixed: its Hessian at 0 is the
            # splitting term of a new pseudo-layer GeLU(v . x~) on neuron j.
            def f(v, j=j):
                return sum((t[gk][:, j] * F.gelu(t[xk] @ v)).sum() for t in terms) / len(terms)

            ref = hessian(f, torch.zeros(S[target].shape[1], dtype=torch.float64))
            assert _rel(S[target][j], ref) < 1e-8, (target, j)


def test_activation_form_matrices_equal_the_hessian_of_their_definition():
    gm = _tiny_gm()
    batches = _batches()
    S = splitting_matrices(gm, batches, F.cross_entropy, form="activation")
    assert list(S) == ["fc1"]  # the only linear feeding an elementwise activation
    terms = _reference_terms(gm, batches)
    w = torch.cat([gm.fc1.weight, gm.fc1.bias[:, None]], 1).detach()
    for j in range(6):
        # Wu et al.: E[dL/dsigma * d^2 sigma(theta . x~) / d theta^2], dL/dsigma held fixed.
        def f(v, j=j):
            return sum((t["s1"][:, j] * F.gelu(t["x1"] @ (w[j] + v))).sum()
                       for t in terms) / len(terms)

        ref = hessian(f, torch.zeros(5, dtype=torch.float64))
        assert _rel(S["fc1"][j], ref) < 1e-8, j


def test_exact_and_fast_eigenvalues_match_the_matrices():
    gm = _tiny_gm()
    batches = _batches()
    S = splitting_matrices(gm, batches, F.cross_entropy)
    exact = analyze(gm, batches, F.cross_entropy, method="exact", progress=False)
    fast = analyze(gm, batches, F.cross_entropy, method="fast", eigenvectors=True, progress=False,
                   tol=1e-7)
    for t, mats in S.items():
        ref = torch.linalg.eigvalsh(mats)[:, 0]
        torch.testing.assert_close(exact.eigenvalues[t], ref, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(fast.eigenvalues[t], ref, rtol=1e-8, atol=1e-12)
        v = fast.eigenvectors[t]
        residual = torch.einsum("jab,jb->ja", mats, v) - ref[:, None] * v
        assert float(residual.norm(dim=1).max()) < 1e-5 * float(mats.abs().max())
        assert fast.tokens[t] == 2 * 3 * 4 and fast.nonconverged[t] == 0
        assert fast.fan_in[t] == {"fc1": 4, "fc2": 6}[t]
    assert fast.bias == {"fc1": True, "fc2": False}


def _operator_with_linear_gelu(grown: fx.GraphModule) -> fx.GraphModule:
    graph = fx.Graph()
    out = graph.graph_copy(grown.graph, {})
    graph.output(out)
    gelus = [n for n in graph.nodes if n.op == "call_function" and n.target is F.gelu]
    assert gelus
    for n in gelus:
        n.target = _gelu_linearised
    return fx.GraphModule(grown, graph)


def _gelu_linearised(a):
    return 0.5 * a  # GeLU(0) + GeLU'(0) a


def _second_derivative(model, names, v, batches):
    eps = torch.zeros((), dtype=torch.float64, requires_grad=True)
    params = dict(model.named_parameters())
    over = {names[0]: params[names[0]] + eps * v[:, :-1]}
    if names[1] is not None:
        over[names[1]] = params[names[1]] + eps * v[:, -1]
    loss = sum(F.cross_entropy(functional_call(model, over, (x,)), y) for x, y in batches)
    loss = loss / len(batches)
    (d1,) = torch.autograd.grad(loss, eps, create_graph=True)
    (d2,) = torch.autograd.grad(d1, eps)
    return float(d2)


@pytest.mark.parametrize("target,neuron", [("fc1", 2), ("fc2", 4), ("head", 1)])
def test_second_order_link_to_the_growth_operator(target, neuron):
    """Perturb the summed weights of a grown pair by eps * v: the loss's second derivative in
    eps with GeLU in the pseudo-layer, minus the same with GeLU linearised, is v^T S_j v
    (the Gauss-Newton parts are equal and cancel)."""
    gm = _tiny_gm()
    batches = _batches()
    S = splitting_matrices(gm, batches, F.cross_entropy, targets=[target])[target][neuron]
    grown = grow(gm, fxgrow.GrowthPlan({target: [neuron]}))
    plus = [n for n, _ in grown.named_modules() if n.endswith("_grow0_plus")]
    assert len(plus) == 1
    module = grown.get_submodule(plus[0])
    names = (f"{plus[0]}.weight", f"{plus[0]}.bias" if module.bias is not None else None)
    v = torch.randn(1, S.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    if names[1] is None:
        v = torch.cat([v, torch.zeros(1, 1, dtype=torch.float64)], 1)
    with_gelu = _second_derivative(grown, names, v, batches)
    linear = _second_derivative(_operator_with_linear_gelu(grown), names, v, batches)
    vs = v[0, : S.shape[0]]
    expected = float(vs @ S @ vs)
    assert abs(with_gelu - linear - expected) <= 1e-6 * abs(expected)
    assert abs(linear) > 1e-3 * abs(expected)  # the Gauss-Newton part is really there


@pytest.fixture(scope="module")
def trained_vit():
    torch.manual_seed(0)
    gm = fxgrow.models.tiny_vit_reduced(img_size=16)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 3, 16, 16, generator=g)
    y = (x[:, 0].mean((1, 2)) > 0).long() + 2 * (x[:, 1].mean((1, 2)) > 0).long()
    opt = torch.optim.AdamW(gm.parameters(), lr=3e-3)
    gm.train()
    for step in range(15):
        idx = torch.arange(16) + 16 * (step % 4)
        opt.zero_grad()
        F.cross_entropy(gm(x[idx]), y[idx]).backward()
        opt.step()
    gm.eval()
    opt.zero_grad(set_to_none=True)
    return gm, [(x[16 * i : 16 * i + 8], y[16 * i : 16 * i + 8]) for i in range(2)]


def test_fast_matches_exact_on_every_layer_of_a_reduced_vit(trained_vit):
    gm, batches = trained_vit
    fast = analyze(gm, batches, F.cross_entropy, method="fast", progress=False)
    exact = analyze(gm, batches, F.cross_entropy, method="exact", progress=False)
    assert fast.targets == exact.targets == default_targets(gm)
    assert len(fast.targets) == 16 and "head" not in fast.targets
    off = []
    for t in fast.targets:
        assert fast.reservoir[t] == fast.tokens[t] == 2 * 8 * 17  # all tokens fit
        rel = (fast.eigenvalues[t] - exact.eigenvalues[t]).abs() / exact.eigenvalues[t].abs()
        assert float(rel.median()) <= 1e-3, t
        # Not only the typical neuron: a solver that stops on a Ritz value in the bulk
        # reports ~0 for clearly negative eigenvalues, an error near 1 for a tenth of them.
        # Eigenvalues below 1e-3 of the layer's largest are held to that absolute level, as
        # lanczos_smallest documents. Over five seeds of this recipe, 41 of 5 x 1408 neurons
        # were off by more than 3% at the default 40 steps (14 at 100): neurons still
        # unconverged at the edge of a dense spectrum, and near-degenerate pairs that
        # converged to lambda_2.
        e = exact.eigenvalues[t]
        floor = 1e-3 * e.abs().max()
        err = (fast.eigenvalues[t] - e).abs() / torch.maximum(e.abs(), floor)
        off.append(err > 3e-2)
    assert float(torch.cat(off).float().mean()) <= 0.01
    plans = [fxgrow.select(r, budget=120, layer_threshold=10) for r in (fast, exact)]
    sets = [{(t, i) for t, idx in p.items() for i in idx} for p in plans]
    assert len(sets[1]) == 120
    assert len(sets[0] & sets[1]) / len(sets[0] | sets[1]) >= 0.95


def test_analyze_leaves_the_callers_module_grads_and_hooks_untouched():
    gm = fxgrow.models.tiny_vit_reduced(img_size=16)
    batches = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))) for _ in range(2)]
    gm.train()
    fc1 = gm.get_submodule("blocks.0.mlp.fc1")
    fc1.weight.grad = torch.ones_like(fc1.weight)
    code, state = gm.code, {k: v.clone() for k, v in gm.state_dict().items()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in gm.named_parameters()}
    modes = {n: m.training for n, m in gm.named_modules()}

    def hooks():
        return {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                for n, m in gm.named_modules()}

    before_hooks = hooks()
    bad = batches + [(batches[0][0] * float("nan"), batches[0][1])]
    for call in (lambda: analyze(gm, batches[:1], F.cross_entropy, progress=False),
                 lambda: analyze(gm, bad, F.cross_entropy, method="exact", progress=False)):
        try:
            call()
        except AnalysisError:
            pass
        assert gm.code == code
        assert all(torch.equal(v, gm.state_dict()[k]) for k, v in state.items())
        for n, p in gm.named_parameters():
            assert (p.grad is None) == (grads[n] is None), n
            if p.grad is not None:
                assert torch.equal(p.grad, grads[n]), n
        assert hooks() == before_hooks
        assert {n: m.training for n, m in gm.named_modules()} == modes


def test_frozen_parameters_and_multiple_inputs_work():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, a, b):
            return self.head(F.gelu(self.fc(a + b)))

    gm = fxgrow.trace(TwoInputs().double())
    for p in gm.parameters():
        p.requires_grad_(False)
    x = torch.randn(5, 4, dtype=torch.float64)
    batches = [((x, x), torch.randint(0, 2, (5,)))]
    report = analyze(gm, batches, F.cross_entropy, method="exact", progress=False)
    assert report.targets == ["fc"] and report.tokens["fc"] == 5
    assert bool(report.eigenvalues["fc"].ne(0).all())


def test_bad_input_errors():
    gm = _tiny_gm()
    batches = _batches()
    with pytest.raises(AnalysisError, match="no batches"):
        analyze(gm, [], F.cross_entropy, progress=False)
    nan = [batches[0], (batches[1][0] * float("inf"), batches[1][1])]
    with pytest.raises(AnalysisError, match="batch 1: the loss is"):
        analyze(gm, nan, F.cross_entropy, progress=False)
    with pytest.raises(AnalysisError, match=r"batch 0: the loss must be a scalar.*\(3,\)"):
        analyze(gm, batches, lambda o, y: F.cross_entropy(o, y, reduction="none"), progress=False)
    with pytest.raises(AnalysisError, match=r"'nope' \(not in the graph\)"):
        analyze(gm, batches, F.cross_entropy, targets=["fc1", "nope"], progress=False)
    with pytest.raises(AnalysisError, match=r"'act' \(not a linear\)"):
        analyze(gm, batches, F.cross_entropy, targets=["act"], progress=False)
    with pytest.raises(AnalysisError, match=r"activation form is undefined.*\['fc2'\]"):
        analyze(gm, batches, F.cross_entropy, targets=["fc2"], form="activation", progress=False)
    with pytest.raises(AnalysisError, match="method"):
        analyze(gm, batches, F.cross_entropy, method="slow", progress=False)
    with pytest.raises(AnalysisError, match="form"):
        analyze(gm, batches, F.cross_entropy, form="hessian", progress=False)
    with pytest.raises(AnalysisError, match="batch 0: expected an"):
        analyze(gm, [batches[0][0]], F.cross_entropy, progress=False)


def test_report_save_load_round_trip_and_determinism(tmp_path):
    gm = _tiny_gm()
    batches = _batches(n=3, tokens=6)
    kwargs = dict(reservoir_tokens=20, eigenvectors=True, progress=False, seed=7)
    one = analyze(gm, batches, F.cross_entropy, **kwargs)
    two = analyze(gm, batches, F.cross_entropy, **kwargs)
    assert one.reservoir["fc1"] == 20 and one.tokens["fc1"] == 54
    path = tmp_path / "report"
    one.save(path)
    back = fxgrow.SplittingReport.load(path)
    for other in (two, back):
        assert other.targets == one.targets
        for t in one.targets:
            assert torch.equal(other.eigenvalues[t], one.eigenvalues[t])
            assert torch.equal(other.eigenvectors[t], one.eigenvectors[t])
        assert (other.tokens, other.reservoir, other.fan_in, other.bias, other.settings) == \
            (one.tokens, one.reservoir, one.fan_in, one.bias, one.settings)
    plans = [fxgrow.select(r, budget=4, layer_threshold=1) for r in (one, two, back)]
    assert plans[0] == plans[1] == plans[2] and plans[0].num_neurons == 4
    other_seed = analyze(gm, batches, F.cross_entropy, **{**kwargs, "seed": 8})
    assert not torch.equal(other_seed.eigenvalues["fc1"], one.eigenvalues["fc1"])
    (tmp_path / "junk").write_bytes(b"not a report")
    with pytest.raises(AnalysisError, match="cannot read"):
        fxgrow.SplittingReport.load(tmp_path / "junk")


def test_reservoir_is_a_uniform_sample_of_the_stream():
    counts = np.zeros(100)
    runs = 1500
    for seed in range(runs):
        r = Reservoir(count=1, size=10, device=torch.device("cpu"), seed=(seed, 0))
        for start in range(0, 100, 20):  # 5 batches of 20 tokens, ids as the data
            ids = torch.arange(start, start + 20, dtype=torch.float64)[:, None]
            r.add(ids, ids)
        kept = r.data(1)[0][:, 0].long().numpy()
        assert len(set(kept)) == 10 and r.tokens == 100
        counts[kept] += 1
    freq = counts / runs  # each token kept with probability 10/100
    sd = math.sqrt(0.1 * 0.9 / runs)
    assert np.abs(freq - 0.1).max() < 5 * sd
    assert abs(freq[:20].mean() - freq[80:].mean()) < 3 * sd  # no bias to early or late batches


def test_reservoir_keeps_a_stream_that_fits_without_copying():
    r = Reservoir(count=3, size=50, device=torch.device("cpu"), seed=(0, 0))
    x, h = torch.randn(20, 4), torch.randn(20, 3)
    r.add(x, h)
    kept_x, kept_h = r.data(4)
    assert kept_x.data_ptr() == x.data_ptr() and kept_h.data_ptr() == h.data_ptr()
    more_x, more_h = torch.randn(30, 4), torch.randn(30, 3)
    r.add(more_x, more_h)  # exactly full: still every token, in stream order
    assert torch.equal(r.data(4)[0], torch.cat([x, more_x]))
    assert torch.equal(r.data(4)[1], torch.cat([h, more_h]))
    r.add(torch.randn(5, 4), torch.randn(5, 3))  # now a sample of 50 out of 55
    assert r.data(4)[0].shape == (50, 4) and r.tokens == 55 and r.filled == 50


def test_summary_and_plot(tmp_path):
    gm = _tiny_gm()
    report = analyze(gm, _batches(), F.cross_entropy, progress=False)
    text = report.summary()
    assert "fc1" in text and "fc2" in text and "form=operator" in text
    fig = report.plot(["fc1", "fc2"], path=tmp_path / "fig.png")
    assert len(fig.axes) == 2 and (tmp_path / "fig.png").stat().st_size > 0
    negative = int((report.eigenvalues["fc1"] < 0).sum())
    assert len(fig.axes[0].patches) == negative
    with pytest.raises(AnalysisError, match="not in the report"):
        report.plot(["head"])


def test_fast_solves_group_equal_sizes_in_bounded_runs(monkeypatch):
    module = importlib.import_module("fxgrow.passes.analysis.solve")
    monkeypatch.setattr(module, "_GROUP_ROWS", 1000)
    f32, f64 = torch.float32, torch.float64
    spec = [("a", 385, 576, f32), ("b", 193, 384, f32), ("c", 385, 400, f32),
            ("d", 385, 300, f32), ("e", 385, 1200, f32), ("f", 385, 10, f64)]
    problems = [
        module.Problem(t, torch.zeros(3, d - 1, dtype=dt), torch.zeros(3, n), 1.0, True, 0)
        for t, d, n, dt in spec
    ]
    groups = [[p.target for p in g] for g in module._groups(problems)]
    # Equal sizes and dtypes share a run, in order, up to the bound; "e" alone exceeds it.
    assert groups == [["a", "c"], ["b"], ["d"], ["e"], ["f"]]


def test_a_linear_feeding_an_in_place_activation_is_analysed():
    # The recording copy's linear must not hand a view made inside an autograd.Function to
    # nn.ReLU(inplace=True) (torchvision's Swin V2 cpb_mlp has this pattern).
    import torch.nn as nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))
    gm = fxgrow.trace(model)
    x, y = torch.randn(2, 5, 6), torch.randint(0, 3, (2, 5))

    def loss(out, labels):
        return F.cross_entropy(out.reshape(-1, 3), labels.reshape(-1))

    # reference: the same weights with an out-of-place ReLU
    plain = fxgrow.trace(nn.Sequential(model[0], nn.ReLU(), model[2]))
    for method in ("fast", "exact"):
        report = analyze(gm, [(x, y)], loss, method=method, progress=False)
        reference = analyze(plain, [(x, y)], loss, method=method, progress=False)
        assert "0" in report.eigenvalues and report.eigenvalues["0"].shape == (8,)
        assert report.eigenvalues.keys() == reference.eigenvalues.keys()
        for target, values in reference.eigenvalues.items():
            torch.testing.assert_close(report.eigenvalues[target], values)


@pytest.mark.parametrize("options", [{}, {"reservoir_tokens": 50}, {"eigenvectors": True}])
def test_a_targets_result_does_not_depend_on_the_other_targets_of_the_call(options):
    """Sharded analysis under DDP (docs/distributed.md) solves each rank's share of the
    targets alone: a target's result must be the same, bit for bit, whether it is analysed
    alone or with targets before it and of its size (one stacked Lanczos run)."""
    torch.manual_seed(0)
    gm = fxgrow.models.tiny_vit(num_classes=10, img_size=16, embed_dim=32, depth=2,
                                num_heads=2)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 10, (6,), generator=g))]
    run = dict(progress=False, **options)
    together = analyze(gm, batches, F.cross_entropy, **run)
    # blocks.1.mlp.fc1 is stacked with blocks.0.mlp.fc1 and comes after five targets.
    for target in ("blocks.1.mlp.fc1", "blocks.0.attn.qkv"):
        alone = analyze(gm, batches, F.cross_entropy, targets=[target], **run)
        assert torch.equal(alone.eigenvalues[target], together.eigenvalues[target]), target
        assert alone.nonconverged[target] == together.nonconverged[target]
        assert alone.reservoir[target] == together.reservoir[target]
        if options.get("eigenvectors"):
            assert torch.equal(alone.eigenvectors[target], together.eigenvectors[target])
