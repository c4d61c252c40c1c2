"""A scaling run killed at random points and resumed ends bitwise equal to an uninterrupted one.

Runs go through the console script in subprocesses, killed with SIGKILL at fault-injection
hooks (fxgrow.training.checkpoint.fault_point): right after a growth, in the middle of writing a
checkpoint, in the middle of an epoch, and between an epoch's checkpoint and its growth.
"""

import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

import fxgrow

FXGROW = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "fxgrow")
STEPS_PER_EPOCH = 1437 // 128  # digits' training split at batch 128, last batch dropped
ARGS = [
    "scale", "--model", "tiny_vit", "--model-kwargs",
    '{"embed_dim": 16, "depth": 2, "num_heads": 2}', "--reduce", "--img-size", "16",
    "--epochs", "5", "--batch-size", "128", "--lr", "3e-3", "--warmup", "2", "--interval", "2",
    "--end-epoch", "4", "--budget", "6", "--layer-threshold", "1", "--analysis-batches", "1",
    "--quiet",
]


def _run(args, fault=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("FXGROW_FAULT", None)
    if fault:
        env["FXGROW_FAULT"] = fault
    return subprocess.run([FXGROW, *args], env=env, capture_output=True, text=True, timeout=600)


def _jsonl(path, drop_suffix=("time", "_seconds")):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith(drop_suffix)} for r in rows]


def _final_state(run_dir):
    latest = (run_dir / "checkpoints" / "LATEST").read_text()
    return fxgrow.load(run_dir / "checkpoints" / latest / "model").state_dict()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "straight"
    proc = _run([*ARGS, "--run-dir", str(run_dir)])
    assert proc.returncode == 0, proc.stderr
    return run_dir, proc


def test_uninterrupted_run_writes_the_run_directory(uninterrupted):
    run_dir, proc = uninterrupted
    metrics = _jsonl(run_dir / "metrics.jsonl")
    growth = _jsonl(run_dir / "growth.jsonl")
    assert [m["epoch"] for m in metrics] == [0, 1, 2, 3, 4]
    assert [g["epoch"] for g in growth] == [1, 3]
    for record in growth:  # function preserved at every growth, recorded
        assert record["grown"] and record["loss_equal"] and record["equivalent"]
        assert record["loss_before_hex"] == record["loss_after_hex"]
        assert record["params_after"] > record["params_before"]
        assert record["flops_after"] > record["flops_before"]
    assert metrics[2]["params"] == growth[0]["params_after"]
    assert metrics[4]["params"] == growth[1]["params_after"]
    for name in ("metrics.png", "eigenvalues_round0.png", "eigenvalues_round1.png"):
        assert (run_dir / "plots" / name).stat().st_size > 1000, name
    assert "top-1" in proc.stdout and "loss equal: True" in proc.stdout


def test_killed_and_resumed_run_matches_the_uninterrupted_one(uninterrupted, tmp_path):
    straight, _ = uninterrupted
    run_dir = tmp_path / "killed"
    step = random.Random(0).randrange(1, STEPS_PER_EPOCH)
    # Each fault's count is per process: checkpoint_write:2 is the second checkpoint the
    # resumed process writes (epoch 3's, after epoch 2's), step:N the N-th step it takes.
    faults = ["after_growth:1", "checkpoint_write:2", f"step:{step}", "epoch_end:1", None]
    for index, fault in enumerate(faults):
        args = [*ARGS, "--run-dir", str(run_dir)] if index == 0 else ["scale", "--resume",
                                                                       str(run_dir)]
        proc = _run(args, fault)
        expected = 0 if fault is None else -9
        assert proc.returncode == expected, (fault, proc.stderr[-2000:])
    assert _jsonl(run_dir / "metrics.jsonl") == _jsonl(straight / "metrics.jsonl")
    assert _jsonl(run_dir / "growth.jsonl") == _jsonl(straight / "growth.jsonl")
    a, b = _final_state(straight), _final_state(run_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_of_a_run_with_another_model_is_refused(uninterrupted, tmp_path):
    straight, _ = uninterrupted
    other = tmp_path / "other"
    shutil.copytree(straight, other)
    config = json.loads((other / "config.json").read_text())
    config["extra"]["cli"]["model_kwargs"] = '{"embed_dim": 16, "depth": 3, "num_heads": 2}'
    (other / "config.json").write_text(json.dumps(config))
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    proc = _run(["scale", "--resume", str(other)])
    assert proc.returncode == 2, proc.stderr
    assert "another configuration" in proc.stderr and "depth" in proc.stderr
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before


def test_killed_before_its_first_checkpoint_and_before_its_last_logs(uninterrupted, tmp_path):
    straight, _ = uninterrupted
    run_dir = tmp_path / "early"
    proc = _run([*ARGS, "--run-dir", str(run_dir)], "step:3")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (run_dir / "config.json").is_file()
    assert not (run_dir / "checkpoints" / "LATEST").exists()
    # Resumable although no checkpoint exists: it starts afresh from the stored config. Killed
    # again right after its last checkpoint (epochs 0, 1, round, 2, 3, round, 4 = the 7th),
    # before that epoch's metrics line was written.
    proc = _run(["scale", "--resume", str(run_dir)], "checkpoint_saved:7")
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert len(_jsonl(run_dir / "metrics.jsonl")) == 4
    proc = _run(["scale", "--resume", str(run_dir)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _jsonl(run_dir / "metrics.jsonl") == _jsonl(straight / "metrics.jsonl")
    assert _jsonl(run_dir / "growth.jsonl") == _jsonl(straight / "growth.jsonl")
    a, b = _final_state(straight), _final_state(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_writer_is_refused_while_the_first_one_runs(uninterrupted, tmp_path, capsys):
    from fxgrow.cli import main

    straight, _ = uninterrupted
    run_dir = tmp_path / "busy"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("FXGROW_FAULT", None)
    first = subprocess.Popen([FXGROW, *ARGS, "--run-dir", str(run_dir)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = run_dir / ".lock"
    deadline = time.monotonic() + 300
    while first.poll() is None and time.monotonic() < deadline:
        if lock.is_file() and lock.read_text().strip() == str(first.pid):
            break
        time.sleep(0.02)
    assert first.poll() is None, "the first writer ended before the second one started"
    for argv in (["scale", "--resume", str(run_dir)], [*ARGS[:-1], "--run-dir", str(run_dir)]):
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"in use by another fxgrow process (pid {first.pid})" in err
    assert "already exists" in err
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-2000:]
    # the first writer was not disturbed: the same run as an uninterrupted one
    assert _jsonl(run_dir / "metrics.jsonl") == _jsonl(straight / "metrics.jsonl")
    a, b = _final_state(straight), _final_state(run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
