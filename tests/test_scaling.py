"""The scaling schedule and the Scaler driver inside a plain training loop."""

import pytest
import torch
import torch.nn.functional as F

import fxgrow
import fxgrow.models
from fxgrow.errors import ScheduleError
from fxgrow.training.scaler import Scaler, ScalingSchedule
from fxgrow.verify import count_params


KWARGS = {"num_classes": 4, "img_size": 8, "embed_dim": 16, "depth": 2, "num_heads": 2}


def test_paper_schedule_rounds():
    schedule = ScalingSchedule(warmup_epochs=50, interval=30, end_epoch=300, epochs=300,
                               budget_per_round=100)
    assert schedule.growth_epochs() == [50, 80, 110, 140, 170, 200, 230, 260, 290]
    assert schedule.is_growth_epoch(49) and not schedule.is_growth_epoch(50)
    assert ScalingSchedule.from_dict(schedule.to_dict()) == schedule


@pytest.mark.parametrize("kwargs, message", [
    ({"interval": 0}, "interval must be at least 1"),
    ({"budget_per_round": -5}, "budget_per_round must be positive"),
    ({"end_epoch": 12, "epochs": 10}, "after the last epoch"),
    ({"warmup_epochs": 10, "end_epoch": 8}, "never grows"),
    ({"total_param_target": 1000}, "exactly one of"),
    ({"budget_per_round": None}, "exactly one of"),
    ({"method": "slow"}, "method must be one of"),
    ({"interval": 2.5}, "interval must be an integer"),
])
def test_invalid_schedules(kwargs, message):
    args = dict(warmup_epochs=2, interval=2, end_epoch=6, epochs=10, budget_per_round=8)
    args.update(kwargs)
    with pytest.raises(ScheduleError, match=message):
        ScalingSchedule(**args)


def _data(n_batches=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g))
            for _ in range(n_batches)]


def _loop(schedule, epochs=5):
    torch.manual_seed(0)
    gm = fxgrow.models.build("tiny_vit", **KWARGS)
    optimizer = torch.optim.AdamW(gm.parameters(), lr=1e-2)
    batches = _data()
    scaler = Scaler(gm, optimizer, schedule, batches[:2], F.cross_entropy)
    models = []
    for epoch in range(epochs):
        for x, y in batches:
            optimizer.zero_grad()
            F.cross_entropy(gm(x), y).backward()
            optimizer.step()
        gm = scaler.after_epoch(epoch)
        models.append(gm)
    return scaler, optimizer, models


@pytest.mark.parametrize("mode, init_state", [("paper", "fresh"), ("fused", "parent")])
def test_scaler_grows_on_schedule_preserving_the_loss(mode, init_state):
    schedule = ScalingSchedule(warmup_epochs=2, interval=2, end_epoch=4, epochs=5,
                               budget_per_round=6, layer_threshold=1, analysis_batches=2,
                               mode=mode, init_state=init_state)
    scaler, optimizer, models = _loop(schedule)
    assert [r["epoch"] for r in scaler.records] == [1, 3] == scaler.rounds_done
    assert models[1] is not models[0]
    assert models[2] is models[1] and models[3] is not models[2]
    for record in scaler.records:
        assert record["grown"] and record["loss_equal"] and record["equivalent"]
        assert record["loss_before_hex"] == record["loss_after_hex"]
        assert sum(record["plan_size"].values()) == 6
        assert record["params_after"] > record["params_before"]
        assert all(s["neurons"] > 0 for s in record["eigenvalues"].values())
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in models[-1].parameters()} == held
    assert scaler.records[1]["params_before"] == scaler.records[0]["params_after"]
    assert count_params(models[-1]) == scaler.records[-1]["params_after"]
    # idempotent per epoch: a resumed loop may call it again
    assert scaler.after_epoch(3) is models[-1] and len(scaler.records) == 2
    state = scaler.state_dict()
    other = Scaler(models[-1], optimizer, schedule, [], F.cross_entropy)
    other.load_state_dict(state)
    assert other.rounds_done == [1, 3] and other.records == scaler.records
    changed = ScalingSchedule(**{**schedule.to_dict(), "interval": 1})
    with pytest.raises(ScheduleError, match="another schedule"):
        Scaler(models[-1], optimizer, changed, [], F.cross_entropy).load_state_dict(state)


@pytest.mark.parametrize("mode", ["paper", "fused"])
def test_total_param_target_is_spread_over_the_rounds(mode):
    torch.manual_seed(0)
    start = count_params(fxgrow.models.build("tiny_vit", **KWARGS))
    target = start + 1200
    schedule = ScalingSchedule(warmup_epochs=1, interval=1, end_epoch=3, epochs=4,
                               total_param_target=target, layer_threshold=1,
                               analysis_batches=2, mode=mode)
    scaler, _, models = _loop(schedule, epochs=4)
    budgets = [r["budget"] for r in scaler.records]
    assert budgets[0] == (target - start) // 3
    for r in scaler.records:
        spent = r["params_after"] - r["params_before"]
        assert 0 <= spent <= r["budget"]
    assert count_params(models[-1]) <= target
    # fan-in of the largest target is 64 (fc2 of tiny_vit, dim 16 x 4): one pair costs 130
    assert target - count_params(models[-1]) < 3 * 130


def test_a_round_with_no_eligible_layer_grows_nothing():
    schedule = ScalingSchedule(warmup_epochs=1, interval=1, end_epoch=1, epochs=2,
                               budget_per_round=6, layer_threshold=10_000, analysis_batches=1)
    scaler, optimizer, models = _loop(schedule, epochs=2)
    assert models[1] is models[0]
    (record,) = scaler.records
    assert record["grown"] is False and record["plan_size"] == {}
    assert record["params_after"] == record["params_before"] == count_params(models[0])


def test_each_round_is_the_papers_rule_applied_by_hand():
    """Against independent references: an analysis, selection and growth of a snapshot of the
    model, done here; the closed-form parameter count 2k(d + 1); outputs compared bitwise;
    the optimizer's existing state untouched."""
    import copy

    from fxgrow import GrowthPlan, select
    from fxgrow.passes import analyze, grow

    schedule = ScalingSchedule(warmup_epochs=2, interval=2, end_epoch=4, epochs=5,
                               budget_per_round=6, layer_threshold=1, analysis_batches=2)
    torch.manual_seed(0)
    gm = fxgrow.models.build("tiny_vit", **KWARGS)
    optimizer = torch.optim.AdamW(gm.parameters(), lr=1e-2)
    batches = _data()
    # The exact form throughout, so that a snapshot's own analysis and growth are the
    # bitwise reference (packed training is checked against it in tests/test_pack.py).
    scaler = Scaler(gm, optimizer, schedule, batches[:2], F.cross_entropy, pack=False)
    probe = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    rounds = 0
    for epoch in range(5):
        for x, y in batches:
            optimizer.zero_grad()
            F.cross_entropy(gm(x), y).backward()
            optimizer.step()
        snapshot = copy.deepcopy(gm).eval()
        state = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()}
                 for p in gm.parameters()}
        new = scaler.after_epoch(epoch)
        if new is gm:
            continue
        rounds += 1
        record = scaler.records[-1]
        report = analyze(snapshot, batches[:2], F.cross_entropy, method="fast", seed=0,
                         progress=False)
        plan = select(report, budget=6, layer_threshold=1)
        assert plan.num_neurons == 6
        assert GrowthPlan.from_dict(record["plan"]) == plan
        sites = fxgrow.linear_sites(snapshot)
        added = sum(2 * len(idx) * (sites[t][0].in_features + int(sites[t][0].has_bias(snapshot)))
                    for t, idx in plan.items())
        before = sum(p.numel() for p in snapshot.parameters())
        assert sum(p.numel() for p in new.parameters()) == before + added
        assert (record["params_before"], record["params_after"]) == (before, before + added)
        reference = grow(snapshot, plan)
        new.eval()
        with torch.no_grad():
            assert torch.equal(new(probe), reference(probe))
            assert torch.equal(new(probe), snapshot(probe))  # function preserved, bit for bit
            x, y = batches[0]
            loss = F.cross_entropy(snapshot(x), y)
        assert float(loss).hex() == record["loss_before_hex"] == record["loss_after_hex"]
        new.train()
        for p in gm.parameters():  # the existing parameters keep their optimizer state
            assert all(torch.equal(optimizer.state[p][k], v) for k, v in state[id(p)].items())
        created = {n for n, _ in new.named_parameters()} - {n for n, _ in gm.named_parameters()}
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        assert created and all(id(new.get_parameter(n)) in held for n in created)
        gm = new
    assert rounds == 2


def test_a_zero_initialised_head_says_why_nothing_grows():
    # torchvision's ViT and timm's Hiera zero their classifier head: no loss gradient reaches
    # the blocks, every splitting eigenvalue is exactly 0 (0 * x is exactly 0 on any CPU).
    from fxgrow import select, why_nothing_selected
    from fxgrow.passes import analyze

    torch.manual_seed(0)
    gm = fxgrow.models.build("tiny_vit", **KWARGS)
    with torch.no_grad():
        gm.get_submodule("head").weight.zero_()
        gm.get_submodule("head").bias.zero_()
    batches = _data(1)
    report = analyze(gm, batches, F.cross_entropy, progress=False)
    assert all(not v.any() for v in report.eigenvalues.values())
    assert select(report, budget=4, layer_threshold=1).num_neurons == 0
    assert "exactly 0" in why_nothing_selected(report, layer_threshold=1)
    assert "exactly 0" in report.summary()
    schedule = ScalingSchedule(warmup_epochs=1, interval=1, end_epoch=1, epochs=2,
                               budget_per_round=4, layer_threshold=1, analysis_batches=1)
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.0)
    scaler = Scaler(gm, optimizer, schedule, batches, F.cross_entropy)
    assert scaler.after_epoch(0) is gm
    (record,) = scaler.records
    assert record["grown"] is False and "zero-initialised classifier head" in record["why_not_grown"]
