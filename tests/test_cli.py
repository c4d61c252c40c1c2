"""The ``fxgrow`` command line, end to end in subprocesses as a user runs it; the matrix of bad
inputs in-process through the same ``main``."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from fxgrow.cli import main

FXGROW = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "fxgrow")
SMALL = ["--model", "tiny_vit", "--model-kwargs", '{"embed_dim": 16, "depth": 1, "num_heads": 2}',
         "--img-size", "16", "--batch-size", "128", "--quiet"]
SCHEDULE = ["--epochs", "3", "--warmup", "1", "--interval", "1", "--end-epoch", "2",
            "--budget", "4", "--layer-threshold", "1", "--analysis-batches", "1"]


def _run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("FXGROW_FAULT", None)
    return subprocess.run([FXGROW, *args], env=env, capture_output=True, text=True, timeout=600)


def test_help_lists_commands_and_examples():
    proc = _run("--help")
    assert proc.returncode == 0
    for word in ("scale", "compare", "inspect", "reduce", "analyze", "grow", "verify",
                 "demo-reduce", "examples:", "--resume"):
        assert word in proc.stdout, word


def test_unknown_model_exits_2_and_writes_nothing(tmp_path):
    run = tmp_path / "run"
    proc = _run("scale", "--model", "no_such_net", *SCHEDULE, "--run-dir", str(run))
    assert proc.returncode == 2
    assert "unknown model 'no_such_net'" in proc.stderr
    assert not run.exists()


@pytest.mark.parametrize("extra, message", [
    (["--interval", "0"], "--interval must be an integer >= 1, got 0"),
    (["--budget", "-3"], "--budget must be an integer >= 1, got -3"),
    (["--end-epoch", "7"], "after the last epoch"),
    (["--data", "{missing}"], "does not exist"),
    (["--data", "{empty}"], "no class sub-directories"),
    (["--model-kwargs", "{{depth"], "not JSON"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, capsys, extra, message):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir(parents=True)
    extra = [e.format(missing=tmp_path / "missing", empty=tmp_path / "empty") for e in extra]
    run = tmp_path / "run"
    assert main(["scale", *SMALL, *SCHEDULE, *extra, "--run-dir", str(run)]) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()


def test_existing_run_dir_is_refused_and_kept(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("precious\n")
    assert main(["scale", *SMALL, *SCHEDULE, "--run-dir", str(run)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in run.iterdir()] == ["metrics.jsonl"]
    assert (run / "metrics.jsonl").read_text() == "precious\n"
    assert main(["scale", "--resume", str(tmp_path / "nothing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_compare_prints_the_paper_table(tmp_path):
    run = tmp_path / "cmp"
    proc = _run("compare", *SMALL, *SCHEDULE, "--run-dir", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["model", "base params", "final params", "base MFLOPs", "final MFLOPs",
                      "top-1", "top-5", "rounds"]
    full, grown = ([c.strip() for c in row.strip("|").split("|")] for row in lines[2:4])
    assert full[1] == full[2] and full[7] == "0"
    assert int(grown[1].replace(",", "")) < int(full[1].replace(",", ""))  # reduced base
    assert int(grown[2].replace(",", "")) > int(grown[1].replace(",", ""))  # it grew
    assert grown[7] == "2"
    growth = [json.loads(x) for x in (run / "grown" / "growth.jsonl").read_text().splitlines()]
    assert all(r["loss_equal"] for r in growth)
    assert int(grown[2].replace(",", "")) == growth[-1]["params_after"]
    assert (run / "compare.md").read_text().strip() == "\n".join(lines)


def test_surgery_commands_on_saved_models(tmp_path, capsys):
    # reduce and verify through the console script; the steps between through the same main
    # in-process (each subprocess costs an interpreter start with torch).
    reduced, grown, report = tmp_path / "reduced", tmp_path / "grown", tmp_path / "report"
    plan = tmp_path / "plan.json"
    kwargs = '{"embed_dim": 16, "depth": 1, "num_heads": 2, "img_size": 16}'
    proc = _run("reduce", "--model", "tiny_vit", "--model-kwargs", kwargs, "--out", str(reduced))
    assert proc.returncode == 0, proc.stderr
    assert "reduced:" in proc.stdout
    assert main(["analyze", str(reduced), "--batches", "1", "--out", str(report), "--plan-out",
                 str(plan), "--budget", "5", "--layer-threshold", "1", "--quiet"]) == 0
    assert sum(len(v) for v in json.loads(plan.read_text())["neurons"].values()) == 5
    assert main(["grow", str(reduced), "--plan", str(plan), "--out", str(grown)]) == 0
    assert "function preserved" in capsys.readouterr().out
    assert main(["inspect", str(grown)]) == 0
    assert "_grow0_plus" in capsys.readouterr().out
    assert main(["grow", str(reduced), "--plan", str(plan), "--out", str(grown)]) == 2
    assert "already exists" in capsys.readouterr().err
    proc = _run("verify", str(reduced), str(grown))
    assert proc.returncode == 0 and "equivalent" in proc.stdout, proc.stderr
    other = tmp_path / "other"
    torch.manual_seed(1)
    assert main(["reduce", "--model", "tiny_vit", "--model-kwargs", kwargs, "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(["verify", str(reduced), str(other)]) == 1
    assert "NOT equivalent" in capsys.readouterr().out
