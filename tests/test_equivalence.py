import operator

import pytest
import torch
import torch.fx as fx
from torch import nn

import fxgrow
from fxgrow import EquivalenceError
from fxgrow.passes import grow
from fxgrow.verify import EquivalenceReport, assert_equivalent, check_equivalence


class _MLP(nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 10), nn.Linear(10, 10), nn.Linear(10, 3)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        h = self.drop(torch.nn.functional.gelu(self.fc1(x)))
        h = self.drop(torch.relu(self.fc2(h)))
        return self.fc3(h)


def _with_new_param(gm: fx.GraphModule, target: str, factor: float) -> fx.GraphModule:
    """A copy of ``gm`` whose module ``target`` has weight * factor (the input is untouched)."""
    module = gm.get_submodule(target)
    changed = nn.Linear(module.in_features, module.out_features)
    changed.weight = nn.Parameter(module.weight.detach() * factor)
    changed.bias = module.bias
    root = {n: m for n, m in gm.named_children()}
    root[target] = changed
    holder = nn.Module()
    for name, m in root.items():
        holder.add_module(name, m)
    return fx.GraphModule(holder, gm.graph)


def test_identical_graphs_are_equivalent_and_nothing_is_left_behind():
    model = _MLP()
    gm = fxgrow.trace(model)
    grads_before = {n: p.grad for n, p in gm.named_parameters()}
    existing = torch.ones_like(gm.fc2.weight)
    gm.fc2.weight.grad = existing
    x = torch.randn(4, 6)
    rng = torch.get_rng_state()
    report = check_equivalence(gm, gm, x)
    assert report.ok and report.first_divergence is None and report.max_abs_diff == 0.0
    assert len([r for r in report.rows if r.kind == "value"]) == len(gm.graph.nodes)
    assert {r.name for r in report.rows if r.kind == "grad"} == set(grads_before)
    assert gm.fc2.weight.grad is existing
    assert all(p.grad is None for n, p in gm.named_parameters() if n != "fc2.weight")
    assert torch.equal(torch.get_rng_state(), rng)
    assert gm.training and "EQUIVALENT" in str(report)


def test_divergence_is_located_at_the_first_differing_node():
    gm = fxgrow.trace(_MLP().eval())
    candidate = _with_new_param(gm, "fc2", 1.0 + 2**-10)
    report = check_equivalence(gm, candidate, torch.randn(4, 6))
    assert not report.ok
    # fc1 and everything before are untouched; the first difference is fc2's output
    assert report.first_divergence.name == "fc2" and report.first_divergence.kind == "value"
    ok = {r.name for r in report.rows if r.ok and r.kind == "value"}
    assert {"x", "fc1", "gelu"} <= ok
    assert {"fc2", "relu", "fc3", "output"} <= {r.name for r in report.failures}
    text = report.table(only_failures=True)
    assert "fc2" in text and "DIFF" in text and "NOT EQUIVALENT" in text
    with pytest.raises(EquivalenceError, match="(?s)not equivalent.*fc2"):
        assert_equivalent(gm, candidate, torch.randn(4, 6))
    with pytest.raises(EquivalenceError):
        check_equivalence(gm, candidate, torch.randn(4, 6), raise_on_failure=True)


def test_a_difference_only_in_gradients_is_found():
    gm = fxgrow.trace(_MLP().eval())
    graph = fx.Graph()
    env = {}
    for node in gm.graph.nodes:
        new = graph.node_copy(node, lambda n: env[n])
        env[node] = new
        if node.name == "fc2":  # same value, no gradient: fc2 + (fc2 * 0).detach() - ...
            with graph.inserting_after(new):
                detached = graph.call_method("detach", (new,))
            new.replace_all_uses_with(detached, delete_user_cb=lambda u: u is not detached)
            env[node] = detached
    candidate = fx.GraphModule(gm, graph)
    report = check_equivalence(gm, candidate, torch.randn(4, 6))
    values = [r for r in report.rows if r.kind == "value"]
    assert all(r.ok for r in values)
    assert not report.ok and report.first_divergence.kind == "grad"
    bad = {r.name: r.note for r in report.failures}
    assert set(bad) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert "no gradient in candidate" in bad["fc2.weight"]
    assert check_equivalence(gm, candidate, torch.randn(4, 6), backward=False).ok


def test_exact_on_cpu_float32_and_float64_tolerant_for_bfloat16():
    x = torch.randn(4, 6)
    for dtype, exact in ((torch.float32, True), (torch.float64, True), (torch.bfloat16, False)):
        gm = fxgrow.trace(_MLP().eval().to(dtype))
        candidate = _with_new_param(gm, "fc2", 1.0 + 2**-20)
        report = check_equivalence(gm, candidate, x.to(dtype))
        assert report.ok != exact, dtype
        assert check_equivalence(gm, candidate, x.to(dtype), atol=1e-3, rtol=1e-3).ok
    gm = fxgrow.trace(_MLP().eval().bfloat16())
    candidate = _with_new_param(gm, "fc2", 1.5)
    assert not check_equivalence(gm, candidate, x.bfloat16()).ok


def test_training_mode_dropout_uses_the_same_masks():
    model = _MLP(p=0.5).train()
    gm = fxgrow.trace(model)
    x = torch.randn(8, 6)
    assert not torch.equal(gm(x), gm(x))  # dropout is really active
    grown = grow(gm, {"fc1": [0, 3], "fc2": [9]})
    rng = torch.get_rng_state()
    report = check_equivalence(gm, grown, x)
    assert report.ok, report.table(only_failures=True)
    assert gm.training and grown.training
    assert torch.equal(torch.get_rng_state(), rng)


def test_unmatched_nodes_are_listed_not_compared():
    gm = fxgrow.trace(_MLP().eval())
    grown = grow(gm, {"fc2": [1]})
    report = check_equivalence(gm, grown, torch.randn(2, 6))
    assert report.ok and not report.unmatched_reference
    new_nodes = {n.name for n in grown.graph.nodes} - {n.name for n in gm.graph.nodes}
    assert set(report.unmatched_candidate) == new_nodes
    # the same name with another target is not a match
    graph = fx.Graph()
    env = {}
    for node in gm.graph.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node.name == "relu":
            env[node].target = torch.nn.functional.relu
    other = fx.GraphModule(gm, graph)
    report = check_equivalence(gm, other, torch.randn(2, 6))
    assert report.ok and report.unmatched_reference == ["relu"]
    assert "relu" in report.unmatched_candidate


def test_loss_fn_and_tuple_outputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, y):
            return self.fc(x), (self.fc(y) * 2, 3)

    gm = fxgrow.trace(Two())
    grown = grow(gm, {"fc": [2]})
    report = check_equivalence(gm, grown, (torch.randn(2, 4), torch.randn(2, 4)),
                               loss_fn=lambda out: out[1][0].pow(2).sum())
    assert report.ok
    grad_rows = {r.name: r for r in report.rows if r.kind == "grad"}
    assert set(grad_rows) == {"fc.weight", "fc.bias"}


def test_bad_arguments_and_failing_candidate():
    gm = fxgrow.trace(_MLP())
    with pytest.raises(EquivalenceError, match="reference.*GraphModule"):
        check_equivalence(_MLP(), gm, torch.randn(2, 6))
    graph = fx.Graph()
    env = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            broken = graph.call_function(operator.matmul, (env[node.args[0]], env[node.args[0]]))
            graph.output(broken)
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    candidate = fx.GraphModule(gm, graph)
    with pytest.raises(EquivalenceError, match="candidate graph failed at node 'matmul'"):
        check_equivalence(gm, candidate, torch.randn(2, 6))


def test_report_is_a_dataclass_with_printable_table():
    gm = fxgrow.trace(_MLP().eval())
    report = check_equivalence(gm, gm, torch.randn(2, 6))
    assert isinstance(report, EquivalenceReport)
    table = report.table()
    assert table.splitlines()[0].split() == ["kind", "name", "op", "shape", "max|diff|", "status"]
    assert "fc1.weight" in table and "2x10" in table
