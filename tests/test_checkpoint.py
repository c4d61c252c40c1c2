"""Run checkpoints: complete state round trip, atomic writes, refusal of foreign checkpoints."""

import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fxgrow
import fxgrow.models
from fxgrow.training import checkpoint
from fxgrow.errors import CheckpointError
from fxgrow.training.optim import add_grown_params, group_param_names
from fxgrow.passes import grow
from fxgrow.training.rundir import RunDir
from fxgrow.training.trainer import TrainConfig, make_optimizer, make_scheduler


KWARGS = {"num_classes": 4, "img_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2}
CONFIG = {"base": fxgrow.recipe(fxgrow.models.build("tiny_vit", **KWARGS))["base"], "run": "a"}


def _trained_grown():
    gm = fxgrow.models.build("tiny_vit", **KWARGS)
    cfg = TrainConfig(epochs=2, lr=1e-2)
    optimizer = make_optimizer(gm, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch=3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)

    def step(model):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step()

    step(gm)
    gm = grow(gm, {"blocks.0.mlp.fc1": [0, 3], "blocks.0.attn.qkv": [5]})
    add_grown_params(optimizer, gm)
    step(gm)
    return gm, optimizer, scheduler


def _save(run_dir, gm, optimizer, scheduler, epoch=0, config=CONFIG):
    return checkpoint.save(run_dir, model=gm, optimizer=optimizer, scheduler=scheduler,
                           scaler=None, epoch=epoch, stage="epoch",
                           metrics=[{"epoch": epoch, "top1": 50.0}], config=config)


def test_round_trip_restores_model_optimizer_scheduler_and_rng(tmp_path):
    gm, optimizer, scheduler = _trained_grown()
    torch.manual_seed(5)
    np.random.seed(6)
    random.seed(7)
    _save(tmp_path, gm, optimizer, scheduler)
    expected_rng = (torch.rand(3), np.random.rand(3), random.random())

    torch.manual_seed(99)
    ckpt = checkpoint.load(tmp_path, CONFIG)
    assert ckpt.epoch == 0 and ckpt.stage == "epoch" and ckpt.state["metrics"][0]["top1"] == 50
    saved = gm.state_dict()
    loaded = ckpt.model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    fresh = make_optimizer(ckpt.model, TrainConfig(epochs=2, lr=1e-2))
    # the scheduler is created first: creating one resets the groups' lr to its step 0
    sched = make_scheduler(fresh, TrainConfig(epochs=2, lr=1e-2), steps_per_epoch=3)
    ckpt.restore_optimizer(fresh)
    sched.load_state_dict(ckpt.state["scheduler"])
    assert group_param_names(fresh, ckpt.model) == group_param_names(optimizer, gm)
    names = {id(p): n for n, p in gm.named_parameters()}
    loaded_params = dict(ckpt.model.named_parameters())
    for param, state in optimizer.state.items():
        other = fresh.state[loaded_params[names[id(param)]]]
        assert state.keys() == other.keys()
        assert all(torch.equal(state[k], other[k]) for k in state)
    for a, b in zip(optimizer.param_groups, fresh.param_groups):
        assert {k: v for k, v in a.items() if k != "params"} == {
            k: v for k, v in b.items() if k != "params"}
    assert sched.state_dict() == scheduler.state_dict()
    checkpoint.restore_rng(ckpt.state["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected_rng[0]) and np.array_equal(got[1], expected_rng[1])
    assert got[2] == expected_rng[2]


def test_keeps_the_newest_checkpoints_only(tmp_path):
    gm, optimizer, scheduler = _trained_grown()
    for epoch in range(4):
        _save(tmp_path, gm, optimizer, scheduler, epoch=epoch)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["ckpt-000002", "ckpt-000003"]
    assert checkpoint.load(tmp_path, CONFIG).epoch == 3


SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_checkpoint import _trained_grown, _save
    gm, optimizer, scheduler = _trained_grown()
    for epoch in range(3):
        _save({run!r}, gm, optimizer, scheduler, epoch=epoch)
        print("saved", epoch, flush=True)
""")


def test_kill_in_the_middle_of_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    script = SCRIPT.format(tests=os.path.dirname(__file__), run=str(tmp_path))
    env = dict(os.environ, FXGROW_FAULT="checkpoint_write:2", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert proc.stdout.split() == ["saved", "0"]
    ckdir = tmp_path / "checkpoints"
    assert (ckdir / "LATEST").read_text() == "ckpt-000000"
    assert any(p.name.startswith(".tmp-ckpt-000001") for p in ckdir.iterdir())
    ckpt = checkpoint.load(tmp_path, CONFIG)
    assert ckpt.epoch == 0
    assert not any(p.name.startswith(".tmp-") for p in ckdir.iterdir())


def test_a_checkpoint_that_never_became_latest_is_replaced(tmp_path):
    # Killed after renaming ckpt-000001 into place but before LATEST moved to it.
    gm, optimizer, scheduler = _trained_grown()
    _save(tmp_path, gm, optimizer, scheduler, epoch=0)
    stale = tmp_path / "checkpoints" / "ckpt-000001"
    stale.mkdir()
    (stale / "meta.json").write_text("{}")
    assert checkpoint.load(tmp_path, CONFIG).epoch == 0
    _save(tmp_path, gm, optimizer, scheduler, epoch=1)
    assert checkpoint.load(tmp_path, CONFIG).epoch == 1


def test_foreign_missing_and_corrupt_checkpoints_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        checkpoint.load(tmp_path, CONFIG)
    gm, optimizer, scheduler = _trained_grown()
    path = _save(tmp_path, gm, optimizer, scheduler)
    with pytest.raises(CheckpointError, match="(?s)another run configuration.*run: .a. .checkpoint. != .b."):
        checkpoint.load(tmp_path, {**CONFIG, "run": "b"})
    other_base = fxgrow.recipe(fxgrow.models.build("tiny_vit", **{**KWARGS, "depth": 2}))["base"]
    meta = json.loads((path / "meta.json").read_text())
    meta["config"]["base"] = other_base
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="model built from"):
        checkpoint.load(tmp_path, {**CONFIG, "base": other_base})
    state = path / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="state.pt is unreadable"):
        checkpoint.load(tmp_path, meta["config"])


def test_existing_run_directory_is_refused_and_left_intact(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        RunDir(run)
    assert [p.name for p in run.iterdir()] == ["notes.txt"]
    with pytest.raises(CheckpointError, match="not a run directory"):
        RunDir(tmp_path / "nothing", resume=True)
