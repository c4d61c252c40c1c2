"""The bad-input suite: every bad input is refused with a named fxgrow error (exit code 2 on
the command line, 4 for the disk) and leaves the caller's objects and files as they were.

Tiny models are built once per module; most cases take milliseconds. The count of distinct
inputs is asserted at the end (``test_the_suite_counts_at_least_300_bad_inputs``).
"""

import copy
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fxgrow
import fxgrow.io as fio
import fxgrow.models
from fxgrow import GrowthPlan, errors
from fxgrow.cli import main
from fxgrow.passes import ReduceSpec, analyze, reduce
from fxgrow.training import checkpoint
from fxgrow.training.scaler import ScalingSchedule
from fxgrow.training.trainer import TrainConfig

KWARGS = {"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2, "img_size": 16}
SPEC = {"source": "fxgrow", "name": "tiny_vit", "kwargs": KWARGS}
CASES: dict[str, int] = {}  # test name -> distinct inputs it checks


def _count(group: str, n: int = 1) -> None:
    CASES[group] = CASES.get(group, 0) + n


def _digest(path: Path) -> dict[str, str]:
    if path.is_file():
        return {"": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _state(gm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in gm.state_dict().items()}


def _same_state(gm, before) -> bool:
    after = gm.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.fixture(scope="module")
def model():
    return fxgrow.models.build(SPEC).eval()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "model"
    fxgrow.save(model, path)
    return path


@pytest.fixture(scope="module")
def report(model):
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.arange(4) % 10
    return analyze(model, [(x, y)], F.cross_entropy, progress=False)


# --------------------------------------------------------------------------- growth plans

BAD_NEURONS = [
    ([1, 2], "mapping"), ("blocks", "mapping"), (42, "mapping"), (3.5, "mapping"),
    ({"": [0]}, "non-empty string"), ({1: [0]}, "non-empty string"), ({None: [0]}, "non-empty"),
    ({"a": 3}, "sequence of integers"), ({"a": "0,1"}, "sequence of integers"),
    ({"a": b"\x00"}, "sequence of integers"), ({"a": None}, "sequence of integers"),
    ({"a": []}, "no neuron indices"), ({"a": ()}, "no neuron indices"),
    ({"a": [1.0]}, "not an integer"), ({"a": [1.5]}, "not an integer"),
    ({"a": [float("nan")]}, "not an integer"), ({"a": [float("inf")]}, "not an integer"),
    ({"a": [True]}, "not an integer"), ({"a": ["1"]}, "not an integer"),
    ({"a": [None]}, "not an integer"), ({"a": [[1]]}, "not an integer"),
    ({"a": [-1]}, "negative"), ({"a": [0, -5]}, "negative"), ({"a": [2, 2]}, "more than once"),
    ({"a": [0, 1, 0]}, "more than once"), ({"a": [torch.tensor(1.0)]}, "not an integer"),
    ({"a": [torch.tensor(True)]}, "not an integer"), ({"a": [1 + 2j]}, "not an integer"),
    ({"a": torch.tensor([1, 1])}, "more than once"), ({"a": torch.tensor([-2])}, "negative"),
]


@pytest.mark.parametrize("neurons, message", BAD_NEURONS)
def test_growth_plan_neurons(neurons, message):
    _count("plan neurons")
    given_ = copy.deepcopy(neurons) if not isinstance(neurons, dict) or not any(
        isinstance(v, torch.Tensor) for v in neurons.values()) else neurons
    with pytest.raises(errors.PlanError, match=message):
        GrowthPlan(neurons)
    if not isinstance(neurons, dict) or not any(isinstance(v, torch.Tensor)
                                                 for v in neurons.values()):
        assert neurons == given_


BAD_WIDTHS = [
    ({"b": 4}, "does not grow"), ({"a": 0}, "positive integer"), ({"a": -1}, "positive integer"),
    ({"a": 2.0}, "positive integer"), ({"a": "8"}, "positive integer"),
    ({"a": None}, "positive integer"), ({"a": True}, "positive integer"),
    ({"a": [8]}, "positive integer"), ({"a": float("nan")}, "positive integer"),
    ({"a": 3}, "out of range"), ({"a": 1}, "out of range"), (["a"], "mapping"),
    ("a", "mapping"), (7, "mapping"),
]


@pytest.mark.parametrize("widths, message", BAD_WIDTHS)
def test_growth_plan_out_features(widths, message):
    _count("plan out_features")
    with pytest.raises(errors.PlanError, match=message):
        GrowthPlan({"a": [0, 3]}, out_features=widths)


BAD_PLAN_JSON = [
    "", "{", "[]", "null", "3", '"plan"', "{}", '{"format": "x"}',
    '{"format": "fxgrow.GrowthPlan"}', '{"format": "fxgrow.GrowthPlan", "version": 2}',
    '{"format": "fxgrow.GrowthPlan", "version": "1", "neurons": {}}',
    '{"format": "fxgrow.GrowthPlan", "version": 1, "neurons": {"a": [0]}, "extra": 1}',
    '{"format": "fxgrow.GrowthPlan", "version": 1, "neurons": []}',
    '{"format": "fxgrow.GrowthPlan", "version": 1, "neurons": {"a": [-1]}}',
    '{"format": "fxgrow.GrowthPlan", "version": 1, "neurons": {"a": ["x"]}}',
    '{"format": "fxgrow.GrowthPlan", "version": 1, "neurons": {"a": [0.5]}}',
    '{"format": "fxgrow.GrowthPlan", "version": 1, "neurons": {"a": [0]}, "out_features": 3}',
    '{"format": "fxgrow.GrowthPlan", "version": 1, "neurons": {"a": [4]}, '
    '"out_features": {"a": 4}}',
    '{"format": "fxgrow.GrowthPlan", "version": 1, "neurons": {"a": [0, 0]}}',
    '{"format": "fxgrow.GrowthPlan", "version": 1, "neurons": {"a": NaN}}',
    '{"format": "fxgrow.GrowthPlan", "version": 1, "neurons": {"a": [Infinity]}}',
    "\ufeff{}", "{'format': 'fxgrow.GrowthPlan'}",
]


@pytest.mark.parametrize("text", BAD_PLAN_JSON)
def test_growth_plan_from_json(text):
    _count("plan json")
    with pytest.raises(errors.PlanError):
        GrowthPlan.from_json(text)


def test_growth_plan_from_json_rejects_non_text():
    for value in (None, 3, [], b"\xff\xfe"):
        _count("plan json")
        with pytest.raises(errors.PlanError):
            GrowthPlan.from_json(value)


def _targets(model):
    return list(fxgrow.linear_sites(model))


@pytest.mark.parametrize("plan, message", [
    ({"nope": [0]}, "unknown target"), ({"blocks.0.attn.qkv.bias": [0]}, "not a linear"),
    ({"blocks.0.mlp": [0]}, "not a linear"), ({"blocks.0.norm1": [0]}, "not a linear"),
    ({"pos_embed": [0]}, "not a linear"), ({"head": [10]}, "out of range"),
    ({"blocks.0.mlp.fc1": [64]}, "out of range"), ({"blocks.0.mlp.fc1": [10**9]}, "out of range"),
    ({"blocks.0.mlp.fc": [0]}, "did you mean"), ({"Blocks.0.mlp.fc1": [0]}, "unknown target"),
    ({}, "empty"),
])
def test_growth_plan_against_a_graph(model, plan, message):
    _count("plan validate")
    before = _state(model)
    with pytest.raises(errors.PlanError, match=message):
        fxgrow.passes.grow(model, GrowthPlan(plan))
    assert _same_state(model, before)


def test_a_plan_made_for_another_graph(model):
    _count("plan validate", 2)
    width = fxgrow.linear_sites(model)["blocks.0.mlp.fc1"][0].out_features
    with pytest.raises(errors.PlanError, match="made for another graph"):
        GrowthPlan({"blocks.0.mlp.fc1": [0]}, out_features={"blocks.0.mlp.fc1": width + 1}
                   ).validate(model)
    with pytest.raises(errors.PlanError, match="GraphModule"):
        GrowthPlan({"a": [0]}).validate(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("kwargs, message", [
    ({"scale": float("nan")}, "scale"),
    ({"scale": float("inf")}, "scale"), ({"scale": "0.2"}, "scale"), ({"mode": "both"}, "mode"),
    ({"mode": None}, "mode"),
])
def test_grow_options(model, kwargs, message):
    _count("grow options")
    before = _state(model)
    with pytest.raises(errors.FxgrowError, match=message):
        fxgrow.passes.grow(model, GrowthPlan({"blocks.0.mlp.fc1": [0]}), **kwargs)
    assert _same_state(model, before)


# ------------------------------------------------------------------------------ selection

@pytest.mark.parametrize("kwargs, message", [
    ({"budget": -1}, "budget"), ({"budget": 1.5}, "budget"), ({"budget": "4"}, "budget"),
    ({"budget": None}, "budget"), ({"budget": True}, "budget"),
    ({"budget": float("nan")}, "budget"), ({"budget": float("inf")}, "budget"),
    ({"budget": 4, "layer_threshold": -1}, "layer_threshold"),
    ({"budget": 4, "layer_threshold": 0.5}, "layer_threshold"),
    ({"budget": 4, "budget_unit": "flops"}, "budget_unit"),
    ({"budget": 4, "budget_unit": None}, "budget_unit"),
    ({"budget": 4, "targets": ["x"]}, "not in the report"),
    ({"budget": 4, "targets": "x"}, "not in the report"),
    ({"budget": 4, "per_target_limit": -2}, "per_target_limit"),
    ({"budget": 4, "per_target_limit": 1.5}, "per_target_limit"),
    ({"budget": 4, "per_target_limit": {"x": 1}}, "per_target_limit names"),
    ({"budget": 4, "per_target_limit": {"head": -1}}, "per_target_limit"),
])
def test_select(report, kwargs, message):
    _count("select")
    with pytest.raises(errors.PlanError, match=message):
        fxgrow.select(report, **kwargs)


# ------------------------------------------------------------------------------ reduction

@pytest.mark.parametrize("spec, message", [
    ({"head_dim": 0}, "positive"), ({"head_dim": -0.5}, "positive"), ({"head_dim": 0.0}, "positive"),
    ({"head_dim": float("nan")}, "finite"), ({"head_dim": float("inf")}, "finite"),
    ({"mlp_hidden": float("-inf")}, "finite"), ({"head_dim": "0.5"}, "float ratio"),
    ({"head_dim": True}, "float ratio"), ({"mlp_hidden": [0.5]}, "float ratio"),
    ({"mlp_hidden": 1e-9}, "width 0|does not divide"), ({"head_dim": 1e-9}, "width 0|does not divide"),
    ({"mlp_hidden": 0.3}, "does not divide"), ({"mlp_hidden": 2.0}, "widen"),
    ({"mlp_hidden": 10**6}, "exceeds"), ({"widths": [("blocks.0.mlp.fc1", 8)]}, "widths must map"),
    ({"widths": "fc1=8"}, "widths must map"), ({"widths": {"blocks.0.mlp.fc1": 0}}, "positive int"),
    ({"widths": {"blocks.0.mlp.fc1": 8.0}}, "positive int"),
    ({"widths": {"blocks.0.mlp.fc1": "8"}}, "positive int"), ({"widths": {3: 8}}, "not a string"),
    ({"keep": "random"}, "keep"), ({"scale": "double"}, "scale"),
    ({"indices": [0, 1]}, "indices must map"), ({"indices": "0,1"}, "indices must map"),
    ({"indices": {"blocks.0.mlp.fc1": "01"}}, "non-empty list"),
    ({"indices": {"blocks.0.mlp.fc1": []}}, "non-empty list"),
    ({"indices": {"blocks.0.mlp.fc1": [-1]}}, "non-empty list"),
    ({"indices": {"blocks.0.mlp.fc1": [0.5]}}, "non-empty list"),
    ({"indices": {"blocks.0.mlp.fc1": [0]}, "head_dim": 0.5}, "excludes"),
    ({"bogus": 1}, "unknown reduce spec keys"),
])
def test_reduce_spec(model, spec, message):
    _count("reduce spec")
    before = _state(model)
    with pytest.raises(errors.ReduceError, match=message):
        reduce(model, spec)
    assert _same_state(model, before)


def test_reduce_spec_of_the_wrong_kind(model):
    for spec in ([0.5], "half", 0.5):
        _count("reduce spec")
        with pytest.raises(errors.ReduceError):
            reduce(model, spec)


# -------------------------------------------------------------------- schedule and config

GOOD_SCHEDULE = {"warmup_epochs": 1, "interval": 1, "end_epoch": 2, "budget_per_round": 4}


@pytest.mark.parametrize("change, message", [
    ({"warmup_epochs": -1}, "warmup"), ({"warmup_epochs": "1"}, "integer"),
    ({"warmup_epochs": 1.0}, "integer"), ({"warmup_epochs": None}, "integer"),
    ({"interval": 0}, "interval"), ({"interval": -3}, "interval"), ({"interval": "2"}, "integer"),
    ({"interval": True}, "integer"), ({"end_epoch": "2"}, "integer"),
    ({"end_epoch": 2.5}, "integer"), ({"analysis_batches": 0}, "analysis_batches"),
    ({"analysis_batches": "4"}, "integer"), ({"layer_threshold": -1}, "layer_threshold"),
    ({"layer_threshold": "60"}, "integer"), ({"budget_per_round": 0}, "positive"),
    ({"budget_per_round": -4}, "positive"), ({"budget_per_round": "4"}, "integer"),
    ({"budget_per_round": 4.0}, "integer"), ({"budget_per_round": None}, "exactly one"),
    ({"total_param_target": 100}, "exactly one"),
    ({"budget_per_round": None, "total_param_target": 0}, "positive"),
    ({"budget_per_round": None, "total_param_target": "1e6"}, "integer"),
    ({"budget_unit": "flops"}, "budget_unit"), ({"method": "slow"}, "method"),
    ({"form": "hessian"}, "form"), ({"mode": "both"}, "mode"), ({"init_state": "copy"}, "init_state"),
    ({"scale": 0.0}, "scale"), ({"scale": -1.0}, "scale"), ({"scale": float("nan")}, "scale"),
    ({"scale": float("inf")}, "scale"), ({"scale": "0.2"}, "scale"), ({"reservoir": 0}, "reservoir"),
    ({"reservoir": "10"}, "integer"), ({"epochs": 0}, "epochs"), ({"epochs": "3"}, "integer"),
    ({"epochs": 1}, "after the last epoch"), ({"warmup_epochs": 5}, "never grows"),
    ({"targets": "blocks.0.mlp.fc1"}, "targets"), ({"targets": []}, "targets"),
    ({"targets": [3]}, "targets"), ({"targets": [""]}, "targets"),
])
def test_scaling_schedule(change, message):
    _count("schedule")
    with pytest.raises(errors.ScheduleError, match=message):
        ScalingSchedule(**{**GOOD_SCHEDULE, **change})


def test_scaling_schedule_from_dict_with_unknown_fields():
    _count("schedule")
    with pytest.raises(errors.ScheduleError, match="unknown schedule fields"):
        ScalingSchedule.from_dict({**GOOD_SCHEDULE, "budget": 4})


@pytest.mark.parametrize("change, message", [
    ({"epochs": 0}, "epochs"), ({"epochs": "10"}, "integer"), ({"epochs": 2.0}, "integer"),
    ({"batch_size": 0}, "batch sizes"), ({"batch_size": -8}, "batch sizes"),
    ({"batch_size": "64"}, "integer"), ({"eval_batch_size": 0}, "batch sizes"),
    ({"lr": 0.0}, "lr"), ({"lr": -1e-3}, "lr"), ({"lr": float("nan")}, "finite"),
    ({"lr": float("inf")}, "finite"), ({"lr": "1e-3"}, "finite"),
    ({"min_lr": float("nan")}, "finite"), ({"min_lr": -1.0}, "non-negative"),
    ({"min_lr": 1.0}, "above lr"), ({"weight_decay": -0.1}, "non-negative"),
    ({"weight_decay": float("inf")}, "finite"), ({"warmup_epochs": float("nan")}, "finite"),
    ({"warmup_epochs": -1.0}, "warmup"), ({"label_smoothing": 1.0}, "label_smoothing"),
    ({"label_smoothing": -0.1}, "label_smoothing"), ({"label_smoothing": float("nan")}, "finite"),
    ({"clip_grad": 0.0}, "clip_grad"), ({"clip_grad": float("inf")}, "finite"),
    ({"clip_grad": -1.0}, "clip_grad"), ({"optimizer": "bogus"}, "unknown optimizer"),
    ({"optimizer": ""}, "unknown optimizer"), ({"optimizer": None}, "unknown optimizer"),
    ({"seed": -1}, "seed"), ({"seed": "0"}, "integer"),
])
def test_train_config(change, message):
    _count("train config")
    with pytest.raises(errors.ScheduleError, match=message):
        TrainConfig(**change)


# -------------------------------------------------------------------------- saved models

def _sealed(document):
    document["checksum"] = fio._checksum(document)
    return document


RECIPE_EDITS = [
    ("weights file missing", lambda d: d["weights"].pop("file")),
    ("weights bytes missing", lambda d: d["weights"].pop("bytes")),
    ("weights sha missing", lambda d: d["weights"].pop("sha256")),
    ("weights tensors missing", lambda d: d["weights"].pop("tensors")),
    ("weights not an object", lambda d: d.update(weights=[1])),
    ("weights a string", lambda d: d.update(weights="model.safetensors")),
    ("file a number", lambda d: d["weights"].update(file=3)),
    ("file null", lambda d: d["weights"].update(file=None)),
    ("file empty", lambda d: d["weights"].update(file="")),
    ("file dot", lambda d: d["weights"].update(file=".")),
    ("file traversal", lambda d: d["weights"].update(file="../model.safetensors")),
    ("file absolute", lambda d: d["weights"].update(file="/etc/passwd")),
    ("file nested", lambda d: d["weights"].update(file="a/b")),
    ("file backslash", lambda d: d["weights"].update(file="..\\x")),
    ("file other name", lambda d: d["weights"].update(file="other.safetensors")),
    ("bytes string", lambda d: d["weights"].update(bytes="100")),
    ("bytes negative", lambda d: d["weights"].update(bytes=-1)),
    ("bytes float", lambda d: d["weights"].update(bytes=1.5)),
    ("bytes wrong", lambda d: d["weights"].update(bytes=d["weights"]["bytes"] + 1)),
    ("sha short", lambda d: d["weights"].update(sha256="abc")),
    ("sha number", lambda d: d["weights"].update(sha256=12)),
    ("sha wrong", lambda d: d["weights"].update(sha256="0" * 64)),
    ("tensors list", lambda d: d["weights"].update(tensors=[])),
    ("tensor spec string", lambda d: d["weights"]["tensors"].update({"head.bias": "float32"})),
    ("tensor shape string", lambda d: d["weights"]["tensors"]["head.bias"].update(shape="10")),
    ("tensor shape negative", lambda d: d["weights"]["tensors"]["head.bias"].update(shape=[-10])),
    ("tensor shape wrong", lambda d: d["weights"]["tensors"]["head.bias"].update(shape=[11])),
    ("tensor dtype wrong", lambda d: d["weights"]["tensors"]["head.bias"].update(dtype="int8")),
    ("tensor dtype number", lambda d: d["weights"]["tensors"]["head.bias"].update(dtype=4)),
    ("tensor key missing", lambda d: d["weights"]["tensors"].pop("head.bias")),
    ("tensor key extra", lambda d: d["weights"]["tensors"].update(
        {"extra": {"shape": [1], "dtype": "float32"}})),
    ("history an object", lambda d: d.update(history={"pass": "grow"})),
    ("history a string", lambda d: d.update(history="grow")),
    ("history of numbers", lambda d: d.update(history=[1, 2])),
    ("history unknown pass", lambda d: d.update(history=[{"pass": "fold", "args": {}}])),
    ("history pass without args", lambda d: d.update(history=[{"pass": "grow"}])),
    ("base a list", lambda d: d.update(base=["tiny_vit"])),
    ("base unknown model", lambda d: d.update(base={"source": "fxgrow", "name": "nope",
                                                     "kwargs": {}})),
    ("base unknown source", lambda d: d.update(base={"source": "hub", "name": "x", "kwargs": {}})),
    ("base bad kwargs", lambda d: d["base"]["kwargs"].update(embed_dim=-1)),
    ("base other width", lambda d: d["base"]["kwargs"].update(embed_dim=32)),
    ("training a string", lambda d: d.update(training="yes")),
    ("format other", lambda d: d.update(format="other")),
    ("format version", lambda d: d.update(format_version=2)),
    ("no base", lambda d: d.pop("base")),
    ("no history", lambda d: d.pop("history")),
]


@pytest.mark.parametrize("name, edit", RECIPE_EDITS, ids=[n for n, _ in RECIPE_EDITS])
def test_corrupted_recipes(saved, tmp_path, name, edit):
    _count("recipe")
    copy_ = tmp_path / "m"
    copy_.mkdir()
    for f in saved.iterdir():
        (copy_ / f.name).write_bytes(f.read_bytes())
    document = json.loads((copy_ / fio.RECIPE_FILE).read_text())
    edit(document)
    (copy_ / fio.RECIPE_FILE).write_text(json.dumps(_sealed(document)))
    before = _digest(copy_)
    with pytest.raises(errors.CheckpointError):
        fxgrow.load(copy_)
    assert _digest(copy_) == before


RAW_RECIPES = [b"", b"{", b"\xff\xfe\x00", b"[]", b"null", b'"x"', b"{}", b'{"format": 1}',
               b'{"format": "fxgrow-model", "format_version": 1}']


@pytest.mark.parametrize("text", RAW_RECIPES)
def test_unreadable_recipes(saved, tmp_path, text):
    _count("recipe")
    copy_ = tmp_path / "m"
    copy_.mkdir()
    (copy_ / fio.WEIGHTS_FILE).write_bytes((saved / fio.WEIGHTS_FILE).read_bytes())
    (copy_ / fio.RECIPE_FILE).write_bytes(text)
    before = _digest(copy_)
    with pytest.raises(errors.CheckpointError):
        fxgrow.load(copy_)
    assert _digest(copy_) == before


@pytest.mark.parametrize("damage", ["truncate", "append", "flip", "empty", "remove", "garbage"])
def test_damaged_weights(saved, tmp_path, damage):
    _count("weights")
    copy_ = tmp_path / "m"
    copy_.mkdir()
    for f in saved.iterdir():
        (copy_ / f.name).write_bytes(f.read_bytes())
    w = copy_ / fio.WEIGHTS_FILE
    data = w.read_bytes()
    {"truncate": lambda: w.write_bytes(data[:-7]), "append": lambda: w.write_bytes(data + b"x"),
     "flip": lambda: w.write_bytes(data[:-1] + bytes([data[-1] ^ 1])),
     "empty": lambda: w.write_bytes(b""), "remove": w.unlink,
     "garbage": lambda: w.write_bytes(b"\x00" * len(data))}[damage]()
    before = _digest(copy_)
    with pytest.raises(errors.CheckpointError):
        fxgrow.load(copy_)
    assert _digest(copy_) == before


def test_load_paths(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "missing", tmp_path / "file", tmp_path / "empty"):
        _count("load path")
        with pytest.raises(errors.CheckpointError):
            fxgrow.load(path)


def test_save_refusals(model, tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes").write_text("x")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "recipe.json").write_text("{}")
    (tmp_path / "link").symlink_to(tmp_path / "other")
    before = _digest(tmp_path)
    for path, error in ((tmp_path / "file", errors.CheckpointError),
                        (tmp_path / "other", errors.CheckpointError),
                        (tmp_path / "fake", errors.CheckpointError),
                        (tmp_path / "link", errors.CheckpointError),
                        (tmp_path / "file" / "sub", errors.StorageError)):
        _count("save path")
        with pytest.raises(error):
            fxgrow.save(model, path)
    for obj in (torch.nn.Linear(2, 2), None, "model"):
        _count("save path")
        with pytest.raises(errors.CheckpointError):
            fxgrow.save(obj, tmp_path / "new")
    assert _digest(tmp_path) == before


# -------------------------------------------------------------------- run directories

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished two-epoch run (no growth), through the trainer."""
    from fxgrow.training import data as data_mod
    from fxgrow.training.trainer import fit

    root = tmp_path_factory.mktemp("run") / "run"
    bundle = data_mod.load("digits", 16, seed=0)
    gm = fxgrow.models.build(SPEC)
    fit(gm, bundle, TrainConfig(epochs=1, batch_size=256), str(root), quiet=True)
    return root


def _config(run):
    return json.loads((run / "config.json").read_text())


LATEST_VALUES = ["", "x", "ckpt-", "ckpt-abc", "ckpt-1", "ckpt-0000001", "../ckpt-000000",
                 "ckpt-000000/..", "/tmp", "ckpt-999999", "\xff", "ckpt-000000\nckpt-000001"]


@pytest.mark.parametrize("value", LATEST_VALUES)
def test_bad_latest_pointer(run_dir, tmp_path, value):
    import shutil

    _count("run dir")
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "checkpoints" / "LATEST").write_bytes(value.encode("utf-8", "surrogateescape")
                                                 if value != "\xff" else b"\xff")
    before = _digest(run)
    with pytest.raises(errors.CheckpointError):
        checkpoint.load(run, _config(run))
    assert _digest(run) == before


STATE_EDITS = ["epoch", "stage", "optimizer", "optimizer_groups", "scheduler", "rng", "metrics",
               "scaler"]


@pytest.mark.parametrize("key", STATE_EDITS)
def test_state_missing_a_key(run_dir, tmp_path, key):
    import shutil

    _count("run dir")
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    ckpt = checkpoint.latest(run)
    state = torch.load(ckpt / "state.pt", weights_only=True)
    state.pop(key)
    torch.save(state, ckpt / "state.pt")
    before = _digest(run)
    with pytest.raises(errors.CheckpointError, match=key):
        checkpoint.load(run, _config(run))
    assert _digest(run) == before


@pytest.mark.parametrize("meta", [b"", b"[]", b"{}", b'{"format": 1}', b"\xff",
                                  b'{"format": 1, "config": []}', b'{"format": 2, "config": {}}'])
def test_bad_meta_json(run_dir, tmp_path, meta):
    import shutil

    _count("run dir")
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (checkpoint.latest(run) / "meta.json").write_bytes(meta)
    before = _digest(run)
    with pytest.raises(errors.CheckpointError):
        checkpoint.load(run, _config(run))
    assert _digest(run) == before


# ----------------------------------------------------------------------- command line

SMALL = ["--model-kwargs", json.dumps({k: v for k, v in KWARGS.items()}), "--img-size", "16",
         "--quiet"]
SCHEDULE = ["--epochs", "3", "--warmup", "1", "--interval", "1", "--end-epoch", "2",
            "--budget", "4", "--layer-threshold", "1", "--analysis-batches", "1"]

BAD_TRAIN_FLAGS = [
    ["--epochs", "0"], ["--epochs", "-1"], ["--epochs", "x"], ["--epochs", "1.5"],
    ["--batch-size", "0"], ["--batch-size", "-4"], ["--lr", "0"], ["--lr", "-1"],
    ["--lr", "nan"], ["--lr", "inf"], ["--lr", "x"], ["--min-lr", "nan"], ["--min-lr", "-1"],
    ["--min-lr", "1"], ["--min-lr", "inf"], ["--weight-decay", "-0.1"],
    ["--weight-decay", "nan"], ["--lr-warmup", "nan"], ["--lr-warmup", "-1"],
    ["--lr-warmup", "inf"], ["--optimizer", "bogus"], ["--optimizer", ""],
    ["--label-smoothing", "1"], ["--label-smoothing", "-0.1"], ["--label-smoothing", "nan"],
    ["--clip-grad", "0"], ["--clip-grad", "-1"], ["--clip-grad", "nan"], ["--clip-grad", "inf"],
    ["--seed", "-1"], ["--seed", "x"], ["--img-size", "0"], ["--img-size", "-16"],
    ["--img-size", "x"], ["--warmup", "-1"], ["--interval", "0"], ["--interval", "-2"],
    ["--end-epoch", "-1"], ["--end-epoch", "9"], ["--budget", "0"], ["--budget", "-3"],
    ["--budget", "1.5"], ["--param-target", "0"], ["--param-target", "100", "--budget", "4"],
    ["--budget-unit", "flops"], ["--layer-threshold", "-1"], ["--targets", ""],
    ["--targets", "a,,b"], ["--targets", "nope"], ["--targets", "blocks.0.mlp.fc1,nope"],
    ["--analysis-batches", "0"], ["--method", "slow"], ["--reservoir", "0"],
    ["--reservoir", "-5"], ["--growth-scale", "0"], ["--growth-scale", "-0.2"],
    ["--growth-scale", "inf"], ["--growth-scale", "nan"], ["--growth-mode", "x"],
    ["--init-state", "copy"], ["--head-dim", "0"], ["--head-dim", "nan"], ["--head-dim", "inf"],
    ["--head-dim", "1.5"], ["--mlp-hidden", "-0.5"], ["--mlp-hidden", "1e-9"],
    ["--model-kwargs", "{"], ["--model-kwargs", "[]"], ["--model-kwargs", "3"],
    ["--model-kwargs", '{"num_heads": 3}'], ["--model-kwargs", '{"bogus_kwarg": 1}'],
    ["--model", "no_such_net"], ["--model", ""], ["--data", "/no/such/data"],
    ["--dist-timeout", "0"], ["--dist-timeout", "nan"], ["--backend", "mpi"],
    ["--no-such-flag"], ["--warmup", "5"],
]


@pytest.mark.parametrize("command", ["scale", "compare"])
@pytest.mark.parametrize("extra", BAD_TRAIN_FLAGS, ids=[" ".join(e) for e in BAD_TRAIN_FLAGS])
def test_training_flags(tmp_path, capsys, command, extra):
    _count("cli train flags")
    run = tmp_path / "run"
    if command == "scale" and extra[0] in ("--head-dim", "--mlp-hidden"):
        extra = ["--reduce", *extra]  # scale reduces only when asked
    argv = [command, *SMALL, *SCHEDULE, *extra, "--run-dir", str(run)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err
    assert not run.exists() and list(tmp_path.iterdir()) == []


def test_training_without_a_run_directory(tmp_path, capsys):
    for argv in (["scale", *SMALL, *SCHEDULE], ["scale", *SMALL, "--epochs", "3"],
                 ["scale", "--resume", str(tmp_path / "none")],
                 ["compare", "--resume", str(tmp_path)]):
        _count("cli train flags")
        assert main(argv) == 2
    assert list(tmp_path.iterdir()) == []


def test_resume_of_edited_run_directories(run_dir, tmp_path, capsys):
    import shutil

    edits = {
        "not json": b"{", "a list": b"[]", "not utf-8": b"\xff",
        "no cli record": json.dumps({"extra": {}}).encode(),
    }
    for name, text in edits.items():
        _count("cli resume")
        run = tmp_path / name.replace(" ", "_")
        shutil.copytree(run_dir, run)
        (run / "config.json").write_bytes(text)
        before = _digest(run)
        assert main(["scale", "--resume", str(run)]) == 2, name
        assert _digest(run) == before, name


@pytest.fixture(scope="module")
def plan_file(saved, tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    path.write_text(GrowthPlan({"blocks.0.mlp.fc1": [0, 1]}).to_json())
    return path


def _surgery_cases(saved, plan, tmp):
    m, out = str(saved), str(tmp / "out")
    (tmp / "exists").mkdir(exist_ok=True)
    (tmp / "afile").write_text("x")
    (tmp / "bad_plan.json").write_bytes(b"\xff\xfe")
    (tmp / "json_plan.json").write_text("{")
    (tmp / "empty_plan.json").write_text(GrowthPlan().to_json())
    (tmp / "unknown_plan.json").write_text(GrowthPlan({"nope": [0]}).to_json())
    (tmp / "range_plan.json").write_text(GrowthPlan({"head": [99]}).to_json())
    ex, af = str(tmp / "exists"), str(tmp / "afile")
    return [
        ["analyze", m, "--out", ex], ["analyze", m, "--out", af],
        ["analyze", m, "--out", out, "--plan-out", str(tmp / "p.json")],
        ["analyze", m, "--out", out, "--plan-out", af, "--budget", "4"],
        ["analyze", m, "--out", out, "--plan-out", out, "--budget", "4"],
        ["analyze", m, "--out", out, "--batches", "0"], ["analyze", m, "--out", out, "--batches", "-1"],
        ["analyze", m, "--out", out, "--batch-size", "0"],
        ["analyze", m, "--out", out, "--img-size", "0"],
        ["analyze", m, "--out", out, "--plan-out", str(tmp / "q.json"), "--budget", "0"],
        ["analyze", m, "--out", out, "--layer-threshold", "-1"],
        ["analyze", m, "--out", out, "--method", "slow"],
        ["analyze", str(tmp / "missing"), "--out", out],
        ["analyze", af, "--out", out], ["analyze", m, "--out", out, "--data", str(tmp / "nodata")],
        ["analyze", m], ["grow", m, "--plan", str(plan)],
        ["grow", m, "--plan", str(plan), "--out", ex],
        ["grow", m, "--plan", str(tmp / "missing.json"), "--out", out],
        ["grow", m, "--plan", str(tmp / "bad_plan.json"), "--out", out],
        ["grow", m, "--plan", str(tmp / "json_plan.json"), "--out", out],
        ["grow", m, "--plan", str(tmp / "empty_plan.json"), "--out", out],
        ["grow", m, "--plan", str(tmp / "unknown_plan.json"), "--out", out],
        ["grow", m, "--plan", str(tmp / "range_plan.json"), "--out", out],
        ["grow", m, "--plan", ex, "--out", out],
        ["grow", m, "--plan", str(plan), "--out", out, "--scale", "0"],
        ["grow", m, "--plan", str(plan), "--out", out, "--scale", "nan"],
        ["grow", m, "--plan", str(plan), "--out", out, "--scale", "inf"],
        ["grow", m, "--plan", str(plan), "--out", out, "--mode", "x"],
        ["grow", str(tmp / "missing"), "--plan", str(plan), "--out", out],
        ["reduce", "--load", m, "--model", "tiny_vit", "--out", out],
        ["reduce", "--load", m, "--model-kwargs", "{}", "--out", out],
        ["reduce", "--out", ex], ["reduce", "--head-dim", "0", "--out", out],
        ["reduce", "--mlp-hidden", "nan", "--out", out], ["reduce", "--mlp-hidden", "1e-9", "--out", out],
        ["reduce", "--model", "nope", "--out", out], ["reduce", "--model-kwargs", "{", "--out", out],
        ["reduce", "--load", str(tmp / "missing"), "--out", out],
        ["reduce"], ["inspect", str(tmp / "missing")], ["inspect", af],
        ["inspect", m, "--img-size", "0"], ["inspect", m, "--img-size", "15"],
        ["verify", m, str(tmp / "missing")], ["verify", m, m, "--batch", "0"],
        ["verify", m, m, "--seed", "-1"], ["verify", m, m, "--img-size", "-2"], ["verify", m],
        ["nope"], [], ["grow"], ["--version-nope"],
    ]


def test_surgery_commands(saved, plan_file, tmp_path, capsys):
    before = _digest(saved)
    cases = _surgery_cases(saved, plan_file, tmp_path)
    listing = sorted(p.name for p in tmp_path.iterdir())
    for argv in cases:
        _count("cli surgery")
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2, (argv, code, err[-500:])
        assert "Traceback" not in err, argv
        assert sorted(p.name for p in tmp_path.iterdir()) == listing, argv
    assert _digest(saved) == before


# ------------------------------------------------------------------- inspection, FLOPs

@pytest.mark.parametrize("inputs", [
    torch.randn(1, 3, 15, 15), torch.randn(3, 16, 16), torch.randn(1, 4, 16, 16),
    torch.randn(1, 3, 16, 16, 1), "image", None, (torch.randn(1, 3, 16, 16), torch.randn(1)),
])
def test_summary_on_inputs_of_the_wrong_shape(model, inputs):
    from fxgrow.inspection import summary

    _count("inspection")
    before = _state(model)
    with pytest.raises(errors.FxgrowError):
        summary(model, inputs)
    assert _same_state(model, before)


@pytest.mark.parametrize("inputs", [torch.randn(1, 3, 15, 15), "x", (), None, [1, 2]])
def test_count_flops_on_bad_inputs(model, inputs):
    from fxgrow.verify import count_flops

    _count("flops")
    with pytest.raises(errors.FxgrowError):
        count_flops(model, inputs)


@pytest.mark.parametrize("obj", [None, "model", 3, torch.randn(2), [torch.nn.Linear(2, 2)]])
def test_trace_of_non_modules(obj):
    _count("trace")
    with pytest.raises(errors.TraceError):
        fxgrow.trace(obj)


# ------------------------------------------------------------------------ hypothesis

@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.text(max_size=4), st.one_of(
    st.integers(max_value=-1).map(lambda i: [i]), st.floats().map(lambda f: [f]),
    st.text(max_size=3), st.just([])), min_size=1, max_size=3))
def test_hypothesis_bad_plans_are_plan_errors(neurons):
    with pytest.raises(errors.PlanError):
        GrowthPlan(neurons)


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True).filter(
    lambda f: not (0 < f <= 1) or math.isnan(f)), st.integers(max_value=0)))
def test_hypothesis_bad_reduce_ratios_are_reduce_errors(model, value):
    with pytest.raises(errors.ReduceError):
        reduce(model, {"mlp_hidden": value})


def test_the_suite_counts_at_least_300_bad_inputs():
    total = sum(CASES.values())
    print(f"bad-input suite: {total} distinct inputs (+80 hypothesis examples): {CASES}")
    if len(CASES) < 20:
        pytest.skip("run the whole module to count its cases")
    assert total >= 300, CASES
