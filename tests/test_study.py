"""``fxgrow study``: the ablation selection rules, the dense width match, the teacher-student
data, neuron depths, and the quick mode end to end (interrupted, resumed, rerun bitwise)."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

import fxgrow
from fxgrow.errors import PlanError, ScheduleError, StudyError
from fxgrow.passes import grow
from fxgrow.training import data, study
from fxgrow.training.scaler import ScalingSchedule
from fxgrow.verify import count_params


def _report(values, fan_in):
    targets = list(values)
    return fxgrow.SplittingReport(
        eigenvalues={t: torch.tensor(v, dtype=torch.float64) for t, v in values.items()},
        fan_in=fan_in, bias={t: True for t in targets}, tokens={t: 10 for t in targets},
        reservoir={t: 10 for t in targets}, nonconverged={t: 0 for t in targets},
        settings={"form": "operator", "method": "exact"})


REPORT = _report({"a": [-1.0, 2.0, 0.5, -3.0, 1.0, 0.0], "b": [4.0, -2.0, 3.0, 1.0],
                  "a_grow0_plus": [-9.0, -8.0]}, fan_in={"a": 3, "b": 5, "a_grow0_plus": 3})


def test_random_rule_spends_the_budget_on_any_neuron_deterministically():
    cost = {t: REPORT.neuron_cost(t) for t in REPORT.targets}  # 8, 12, 8
    plans = [fxgrow.select(REPORT, budget=50, budget_unit="params", rule="random", seed=s)
             for s in range(6)]
    assert plans[0].to_json() == fxgrow.select(REPORT, budget=50, budget_unit="params",
                                               rule="random", seed=0).to_json()
    assert len({p.to_json() for p in plans}) > 1  # the seed matters
    for plan in plans:
        spent = sum(cost[t] * len(idx) for t, idx in plan.items())
        assert spent <= 50 and 50 - spent < max(cost.values())  # stops at the first misfit
    # eigenvalues and the layer threshold play no part: a budget for everything takes all
    everything = fxgrow.select(REPORT, budget=12, rule="random", seed=3, layer_threshold=99)
    assert {t: list(i) for t, i in everything.items()} == {
        "a": list(range(6)), "b": list(range(4)), "a_grow0_plus": [0, 1]}


def test_uniform_rule_takes_as_many_neurons_in_every_layer_of_the_model():
    # params: one neuron in each of a, b costs 8 + 12 = 20; 45 buys 2 per layer. The pseudo-
    # layer a_grow0_plus is not a layer of the model being grown.
    plan = fxgrow.select(REPORT, budget=45, budget_unit="params", rule="uniform")
    assert {t: list(i) for t, i in plan.items()} == {"a": [0, 3], "b": [1, 3]}
    plan = fxgrow.select(REPORT, budget=7, rule="uniform")  # neurons: 3 per layer
    assert {t: list(i) for t, i in plan.items()} == {"a": [0, 3, 5], "b": [1, 2, 3]}
    assert len(fxgrow.select(REPORT, budget=19, budget_unit="params", rule="uniform")) == 0
    assert {t: len(i) for t, i in fxgrow.select(REPORT, budget=100, rule="uniform").items()} \
        == {"a": 4, "b": 4}  # capped by the narrowest layer


def test_unknown_rule_is_refused():
    with pytest.raises(PlanError, match="rule must be one of"):
        fxgrow.select(REPORT, budget=4, rule="greedy")
    with pytest.raises(ScheduleError, match="rule must be one of"):
        ScalingSchedule(warmup_epochs=1, interval=1, end_epoch=2, budget_per_round=4,
                        rule="greedy")


def test_neuron_depths_follow_nested_growth():
    gm = fxgrow.models.tiny_vit(embed_dim=16, depth=1, num_heads=2, img_size=8)
    once = grow(gm, {"blocks.0.mlp.fc1": [0, 1]})
    twice = grow(once, {"blocks.0.mlp.fc1_grow0_plus": [0], "blocks.0.mlp.fc1": [2, 1]})
    thrice = grow(twice, {"blocks.0.mlp.fc1_grow0_plus_grow0_plus": [0]})
    depths = study.neuron_depths(fxgrow.history(thrice), {"blocks.0.mlp.fc1": 64,
                                                          "blocks.0.attn.qkv": 48})
    # neuron 0: fc1 -> pair (row 0) -> nested pair -> nested again; 1: grown twice side by side
    assert depths["blocks.0.mlp.fc1"][:4] == [3, 1, 1, 0]
    assert sum(depths["blocks.0.mlp.fc1"]) == 5 and set(depths["blocks.0.attn.qkv"]) == {0}


def test_dense_condition_matches_the_parameter_target():
    spec = study.quick_spec()
    spec.conditions = ["dense"]
    dense = study.dense_widths(spec, 10)
    embed, depth = 32, 2
    # built directly with timm's own MLP width: the count the study reports
    built = fxgrow.models.tiny_vit(embed_dim=embed, depth=depth, num_heads=2, img_size=8,
                                   patch_size=4, mlp_ratio=dense["mlp_hidden"] / embed)
    assert dense["head_dim"] == 1.0 and dense["params"] == count_params(built)
    per_unit = depth * (2 * embed + 1)  # one MLP hidden unit: an fc1 row, its bias, an fc2 column
    assert abs(dense["params"] - dense["target"]) <= per_unit / 2


def _teacher():
    torch.manual_seed(5)
    return fxgrow.models.tiny_vit(embed_dim=16, depth=1, num_heads=2, img_size=8, patch_size=4)


def test_teacher_student_draws_fresh_labelled_samples_per_epoch():
    teacher = _teacher()
    bundle = data.teacher_student(teacher, num_classes=10, img_size=8, train_size=96,
                                  val_size=40, seed=3)
    loader = data.loader(bundle.train, 32, seed=0)

    def epoch(e):
        loader.sampler.set_epoch(e)
        return torch.cat([x for x, _ in loader]), torch.cat([y for _, y in loader])

    x0, y0 = epoch(0)
    x1, _ = epoch(1)
    assert x0.shape == (96, 3, 8, 8) and not torch.equal(x0.sort(0).values, x1.sort(0).values)
    again = data.teacher_student(teacher, num_classes=10, img_size=8, train_size=96,
                                 val_size=40, seed=3)
    assert torch.equal(epoch(0)[0], x0)  # a function of (seed, epoch)
    again.train.set_epoch(1)
    assert torch.equal(again.train.inputs.sort(0).values, x1.sort(0).values)
    with torch.no_grad():
        teacher.eval()
        logits = teacher(x0) - bundle.train.offsets
    assert torch.equal(logits.argmax(-1), y0) and len(set(y0.tolist())) > 1
    vx = bundle.val.inputs.clone()
    bundle.val.set_epoch(4)
    assert torch.equal(bundle.val.inputs, vx)  # validation is one fixed draw
    with pytest.raises(fxgrow.DataError, match="logits of shape"):
        data.teacher_student(teacher, num_classes=7, img_size=8)


def test_bad_study_specs_are_refused(tmp_path):
    with pytest.raises(StudyError, match="conditions"):
        study.StudySpec(conditions=["full", "bigger"])
    with pytest.raises(StudyError, match="seeds"):
        study.StudySpec(seeds=[0, 0], conditions=["full"])
    with pytest.raises(StudyError, match="total_param_target"):
        study.StudySpec(conditions=["dense"], schedule={"warmup_epochs": 1, "interval": 1,
                                                        "end_epoch": 2, "budget_per_round": 4})
    with pytest.raises(StudyError, match="needs a schedule"):
        study.StudySpec(conditions=["splitting"])
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(StudyError, match="not a study directory"):
        study.run_study(study.quick_spec(), tmp_path / "x")
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["keep.txt"]


def _cli(*args, fault=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("FXGROW_FAULT", None)
    if fault:
        env["FXGROW_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "fxgrow.cli", "study", *args], env=env,
                          capture_output=True, text=True, timeout=900)


def _without_time(rows):
    return [{k: v for k, v in r.items() if k not in ("time", "analysis_seconds", "grow_seconds")}
            for r in rows]


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_quick_study_resumes_checks_every_round_and_reruns_bitwise(tmp_path):
    root = tmp_path / "quick"
    # killed after the 2nd epoch of the first run, before the growth round that follows it
    killed = _cli("--quick", "--quiet", "--run-dir", str(root), fault="epoch_end:2")
    assert killed.returncode == -9, killed.stderr
    assert len(_jsonl(root / "runs" / "splitting-seed0" / "metrics.jsonl")) == 2
    proc = _cli("--quick", "--run-dir", str(root))
    assert proc.returncode == 0, proc.stderr
    assert "splitting-seed0: resumed" in proc.stderr and "random-seed0: started" in proc.stderr
    assert "| splitting | 1 |" in proc.stdout and "| random | 1 |" in proc.stdout

    report = json.loads((root / "report.json").read_text())
    assert [(r["condition"], r["finished"]) for r in report["runs"]] == [
        ("random", True), ("splitting", True)]
    for name in ("splitting-seed0", "random-seed0"):
        rounds = _jsonl(root / "runs" / name / "growth.jsonl")
        assert len(rounds) == 2 and all(r["grown"] for r in rounds)
        for r in rounds:  # the bitwise loss check of every round, as the run directory records it
            assert r["loss_equal"] and r["equivalent"]
            assert r["loss_before_hex"] == r["loss_after_hex"]
        assert sorted(p.name for p in (root / "runs" / name / "reports").iterdir()) == [
            "round0.safetensors", "round1.safetensors"]
    paired = report["paired"]["random"]
    split, rand = (next(r for r in report["runs"] if r["condition"] == c)
                   for c in ("splitting", "random"))
    assert paired["top1_diff"] == [rand["top1"] - split["top1"]]
    for plot in ("learning_curves", "eigenvalue_trend", "eigenvalues_splitting-seed0",
                 "depth_splitting-seed0", "depth_random-seed0"):
        assert (root / "plots" / f"{plot}.png").stat().st_size > 0
    assert "bitwise equal before and after growth (and passed the equivalence check): 4 of 4" \
        in (root / "report.md").read_text()

    # Rerunning one condition and seed from scratch gives the same metrics bit for bit (the
    # first run was also killed and resumed on the way).
    again = tmp_path / "again"
    assert study.run_one(study.quick_spec(), "splitting", 0, again) == "started"
    first = root / "runs" / "splitting-seed0"
    assert _without_time(_jsonl(again / "metrics.jsonl")) == _without_time(
        _jsonl(first / "metrics.jsonl"))
    assert _without_time(_jsonl(again / "growth.jsonl")) == _without_time(
        _jsonl(first / "growth.jsonl"))

    # A finished study is not retrained, even from a study.json written before variants
    # existed; another spec in its directory is refused.
    saved = json.loads((root / "study.json").read_text())
    del saved["variants"]
    (root / "study.json").write_text(json.dumps(saved))
    before = (first / "metrics.jsonl").stat().st_mtime_ns
    log = []
    study.run_study(study.quick_spec(), root, log=log.append, plots=False)
    assert log == ["splitting-seed0: done", "random-seed0: done"]
    assert (first / "metrics.jsonl").stat().st_mtime_ns == before
    other = study.quick_spec()
    other.seeds = [1]
    with pytest.raises(StudyError, match="holds another study"):
        study.run_study(other, root)


def test_cli_refuses_bad_conditions_before_writing(tmp_path):
    from fxgrow.cli import main

    root = tmp_path / "s"
    assert main(["study", "--conditions", "full,huge", "--run-dir", str(root)]) == 2
    assert main(["study", "--seeds", "0,x", "--conditions", "full", "--run-dir", str(root)]) == 2
    assert main(["study", "--conditions", "dense", "--budget", "8",
                 "--run-dir", str(root)]) == 2
    assert not root.exists()


def _variant_spec(**variants):
    spec = study.quick_spec()
    return study.StudySpec.from_dict({**spec.to_dict(), "variants": variants,
                                      "conditions": ["splitting", *variants]})


@pytest.mark.parametrize("variants, match", [
    ({"v": {"rulez": "random"}}, r"variant 'v': unknown keys \['rulez'\]"),
    ({"a/b": {}}, "variant name 'a/b' must be"),
    ({"..": {}}, r"variant name '\.\.' must be"),
    ({"random": {}}, "variant name 'random' is one of the six"),
    ({"v": []}, "variant 'v' must be an object"),
    ({"v": {"rule": "greedy"}}, "variant 'v': rule must be one of"),
    ({"v": {"head_dim": 0}}, r"variant 'v': head_dim must be a ratio in \(0, 1\]"),
    ({"v": {"mlp_hidden": 2}}, r"variant 'v': mlp_hidden must be a ratio"),
    ({"v": {"mlp_hidden": True}}, r"variant 'v': mlp_hidden must be a ratio"),
    ({"v": {"schedule": {"intervall": 2}}}, "variant 'v': schedule: .*intervall"),
    ({"v": {"schedule": {"interval": 0}}}, "variant 'v': schedule: interval must be at least"),
    ({"v": {"schedule": {"mode": "sum"}}}, "variant 'v': schedule: mode must be one of"),
    ({"v": {"schedule": {"budget_per_round": 8}}}, "variant 'v': schedule: give exactly one"),
    ({"v": {"schedule": {"epochs": 9}}}, "variant 'v': schedule must not set 'epochs'"),
    ({"v": {"schedule": {"rule": "random"}}}, "must not set 'rule'.*give the variant a rule"),
    ({"v": {"schedule": [1]}}, "variant 'v': schedule must be an object"),
])
def test_bad_variants_are_refused(variants, match):
    with pytest.raises(StudyError, match=match):
        _variant_spec(**variants)


def test_cli_refuses_bad_variants_before_writing(tmp_path):
    from fxgrow.cli import main

    root = tmp_path / "s"
    listed = {"conditions": ["splitting", "nope"], "variants": {}}
    with pytest.raises(StudyError, match=r"conditions \['nope'\] are neither"):
        study.StudySpec.from_dict({**study.quick_spec().to_dict(), **listed})
    (tmp_path / "v.json").write_text('{"x": {"schedule": {"interval": -1}}}')
    for variants in ('{"x": {"head_dim": 3}}', str(tmp_path / "v.json"), '{"x": ',
                     str(tmp_path / "missing.json"), "[1]"):
        assert main(["study", "--quick", "--variants", variants, "--run-dir", str(root)]) == 2
    assert main(["study", "--quick", "--full", "--run-dir", str(root)]) == 2
    assert main(["study", "--full", "--data", str(tmp_path), "--run-dir", str(root)]) == 2
    assert not root.exists()


def test_variants_round_trip_and_an_old_spec_loads():
    spec = study.full_spec("teacher")
    assert set(study.FULL_VARIANTS) <= set(spec.conditions)
    again = study.StudySpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.to_dict() == spec.to_dict()
    old = study.quick_spec().to_dict()
    del old["variants"]  # a study.json written before variants existed
    assert study.StudySpec.from_dict(old) == study.quick_spec()
    # the full spec's optional axes: every base below the target it grows to
    target = spec.param_target()
    for name in study.FULL_VARIANTS:
        assert count_params(study.condition_model(spec, name, 0, 10)) < target, name


def test_reduction_variant_base_keeps_the_first_rows_of_the_same_init():
    spec = _variant_spec(attn={"head_dim": 0.25, "mlp_hidden": 1.0})
    embed, depth, heads, head_dim, hidden = 32, 2, 2, 16, 128
    full = study.condition_model(spec, "full", 3, 10)
    reduced = study.condition_model(spec, "attn", 3, 10)
    # head dim 16 -> 4: per block 3 * heads * 12 qkv rows (weight row and bias) and
    # heads * 12 proj columns go; the MLP keeps its width
    removed = depth * (3 * heads * 12 * (embed + 1) + heads * 12 * embed)
    assert count_params(reduced) == count_params(full) - removed
    assert dict(reduced.named_parameters())["blocks.0.mlp.fc1.weight"].shape == (hidden, embed)
    assert dict(reduced.named_parameters())["blocks.0.attn.qkv.weight"].shape == (
        3 * heads * head_dim // 4, embed)
    for name in ("blocks.0.mlp.fc1.weight", "patch_embed.proj.weight"):  # same seed, same draw
        assert torch.equal(dict(reduced.named_parameters())[name],
                           dict(full.named_parameters())[name])


def test_variants_run_as_they_say_and_appear_in_the_report(tmp_path):
    from fxgrow.training.checkpoint import latest

    spec = _variant_spec(fused={"schedule": {"mode": "fused"}},
                         sparse={"rule": "uniform", "schedule": {"interval": 2}})
    spec.conditions = ["fused", "sparse"]
    report = study.run_study(spec, tmp_path / "s", plots=True)
    rounds = {r["condition"]: r["rounds"] for r in report["runs"]}
    assert rounds == {"fused": 2, "sparse": 1}  # rounds after epochs 1, 2 and after 1 only
    names = [n for n, _ in fxgrow.load(latest(tmp_path / "s" / "runs" / "fused-seed0")
                                       / "model").named_modules()]
    assert any(n.endswith("_fused") for n in names)
    assert not any(n.endswith(("_plus", "_minus")) for n in names)
    text = (tmp_path / "s" / "report.md").read_text()
    assert "| fused | 1 |" in text and "| sparse | 1 |" in text
    assert "- `sparse`: splitting with rule uniform, interval 2 (base 1)" in text
    for plot in ("eigenvalues_fused-seed0", "depth_sparse-seed0"):
        assert (tmp_path / "s" / "plots" / f"{plot}.png").stat().st_size > 0


def test_a_run_does_not_depend_on_the_epoch_a_shared_teacher_bundle_was_left_at(tmp_path):
    # A study runs every condition on one bundle; the previous run leaves its per-epoch
    # training draw at its last epoch, which must not leak into the next run's analysis.
    spec = study.quick_spec("teacher")
    shared = study.study_data(spec)
    shared.train.set_epoch(7)
    study.run_one(spec, "splitting", 0, tmp_path / "shared", bundle=shared)
    study.run_one(spec, "splitting", 0, tmp_path / "fresh")
    for log in ("metrics.jsonl", "growth.jsonl"):
        assert _without_time(_jsonl(tmp_path / "shared" / log)) == _without_time(
            _jsonl(tmp_path / "fresh" / log))
