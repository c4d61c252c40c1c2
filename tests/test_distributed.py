"""Growth under torch.distributed: 2 processes with gloo on the CPU.

Runs are real multi-process launches: ``torchrun --standalone --nproc_per_node=2`` for the
command line, and processes started by hand with torchrun's environment variables where the
test needs to see what a surviving rank does when its peer dies (torchrun's agent would
kill it first). The worker this file holds (``torchrun ... tests/test_distributed.py scaler
OUT``) uses the Scaler API as a user's DDP loop would: each rank passes its own shard of the
analysis batches.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
MODEL_KWARGS = {"embed_dim": 16, "depth": 2, "num_heads": 2, "img_size": 16}
ARGS = [
    "scale", "--model", "tiny_vit", "--model-kwargs",
    '{"embed_dim": 16, "depth": 2, "num_heads": 2}', "--reduce", "--img-size", "16",
    "--epochs", "4", "--batch-size", "128", "--lr", "2e-3", "--warmup", "2", "--interval", "1",
    "--end-epoch", "3", "--budget", "6", "--layer-threshold", "1", "--analysis-batches", "1",
    "--quiet",
]
TIMEOUT = 60  # the process group's timeout where a peer dies (it is noticed at once)
GLOBAL_BATCH, ANALYSIS_BATCHES, WORLD = 64, 2, 2


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("FXGROW_FAULT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def _torchrun(args):
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={WORLD}", *args]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _single(args):
    return subprocess.Popen([str(BIN / "fxgrow"), *args], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jsonl(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith(("time", "_seconds"))} for r in rows]


def _final_state(run_dir):
    import fxgrow

    latest = (run_dir / "checkpoints" / "LATEST").read_text()
    return fxgrow.load(run_dir / "checkpoints" / latest / "model").state_dict()


def _close(a, b, rtol):
    return abs(a - b) <= rtol * abs(b)


# ------------------------------------------------------------------------ data sharding


@pytest.mark.parametrize("size,world,local", [(1437, 2, 64), (63, 2, 16), (100, 3, 7), (9, 4, 2)])
def test_drop_tail_shards_give_step_k_the_global_batch_k(size, world, local):
    """With tail="drop" and drop_last, step k of the ranks together sees exactly batch k of
    one process with the global batch world * local (the same samples, no padding)."""
    from fxgrow.training.data import loader

    dataset = torch.utils.data.TensorDataset(torch.arange(size))
    single = loader(dataset, world * local, seed=3, drop_last=True)
    ranks = [loader(dataset, local, seed=3, drop_last=True, num_replicas=world, rank=r,
                    tail="drop") for r in range(world)]
    for epoch in (0, 5):
        for dl in (single, *ranks):
            dl.sampler.set_epoch(epoch)
        expected = [set(b[0].tolist()) for b in single]
        steps = [list(dl) for dl in ranks]
        assert len(expected) == size // (world * local)
        assert all(len(s) == len(expected) for s in steps)
        for k, batch in enumerate(expected):
            got = [int(i) for s in steps for i in s[k][0]]
            assert sorted(got) == sorted(batch), (epoch, k)


@pytest.mark.parametrize("size,world", [(10, 3), (7, 2), (2, 4)])
def test_uneven_tail_covers_every_sample_once(size, world):
    from fxgrow.training.data import EpochSampler

    shards = [list(EpochSampler(size, 0, shuffle=False, num_replicas=world, rank=r,
                                tail="uneven")) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(size))
    assert [len(s) for s in shards] == [len(EpochSampler(size, 0, num_replicas=world, rank=r,
                                                         tail="uneven")) for r in range(world)]


# ------------------------------------------------------------------ sharded analysis


@pytest.mark.parametrize("shares", [1, 2, 3, 7, 12])
def test_the_targets_partition_covers_each_once_with_balanced_costs(shares):
    from fxgrow.linears import linear_sites
    from fxgrow.passes.analysis.shards import partition, target_costs

    gm = _model()
    costs = target_costs(gm)
    # out_features x (fan_in + bias): the cost of one Lanczos product per token
    sites = linear_sites(gm)
    assert costs == {t: sites[t][0].out_features * (sites[t][0].in_features + 1) for t in costs}
    split = partition(costs, shares)
    assert len(split) == shares and partition(costs, shares) == split
    assert sorted(t for share in split for t in share) == sorted(costs)
    order = list(costs)
    assert all(share == sorted(share, key=order.index) for share in split)
    loads = [sum(costs[t] for t in share) for share in split]
    assert max(loads) - min(loads) <= max(costs.values())  # greedy on sorted costs


def test_partition_and_merge_refuse_bad_input():
    from fxgrow.errors import AnalysisError
    from fxgrow.passes import analyze
    from fxgrow.passes.analysis.report import merge_reports
    from fxgrow.passes.analysis.shards import partition

    with pytest.raises(AnalysisError, match="positive int"):
        partition({"a": 1}, 0)
    gm, batches = _model(), _global_batches()[:1]
    one = analyze(gm, batches, torch.nn.functional.cross_entropy, progress=False,
                  targets=["blocks.0.attn.qkv"])
    two = analyze(gm, batches, torch.nn.functional.cross_entropy, progress=False,
                  targets=["blocks.0.attn.proj"], tol=1e-3)
    with pytest.raises(AnalysisError, match="settings"):
        merge_reports([one, two], ["blocks.0.attn.qkv", "blocks.0.attn.proj"])
    with pytest.raises(AnalysisError, match="each of"):
        merge_reports([one, one], ["blocks.0.attn.qkv"])
    with pytest.raises(AnalysisError, match="each of"):
        merge_reports([one], ["blocks.0.attn.qkv", "blocks.0.attn.proj"])
    with pytest.raises(AnalysisError, match="no reports"):
        merge_reports([], [])


# ------------------------------------------------------------------ the Scaler API worker


def _global_batches():
    """The first ANALYSIS_BATCHES unshuffled batches of GLOBAL_BATCH digits images."""
    from fxgrow.training import data

    bundle = data.digits(img_size=16)
    x, y = bundle.train.tensors
    spans = [slice(i * GLOBAL_BATCH, (i + 1) * GLOBAL_BATCH) for i in range(ANALYSIS_BATCHES)]
    return [(x[span], y[span]) for span in spans]


def _schedule():
    from fxgrow.training.scaler import ScalingSchedule

    return ScalingSchedule(warmup_epochs=1, interval=1, end_epoch=1, budget_per_round=6,
                           layer_threshold=1, analysis_batches=ANALYSIS_BATCHES)


def _model():
    import fxgrow

    torch.manual_seed(0)
    return fxgrow.models.tiny_vit(**MODEL_KWARGS)


def _worker(out: Path) -> None:
    """One rank of a user's DDP loop: wrap, grow through the Scaler with this rank's shard
    of the analysis batches, rewrap, take one step on this rank's shard of a batch. Every
    target list this rank's analysis calls receive is logged."""
    from safetensors.torch import save_file

    import fxgrow.passes
    import fxgrow.training.distributed as fd
    from fxgrow.training.scaler import Scaler

    analyze, calls = fxgrow.passes.analyze, []

    def logged(*args, **kwargs):
        calls.append(kwargs["targets"])
        return analyze(*args, **kwargs)

    fxgrow.passes.analyze = logged

    torch.set_num_threads(1)
    fd.init_from_env("gloo", timeout=60)
    rank, world = fd.rank_world()
    local = GLOBAL_BATCH // world
    shards = [(x[rank * local:(rank + 1) * local], y[rank * local:(rank + 1) * local])
              for x, y in _global_batches()]
    gm = _model()
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.5)
    net = fd.wrap(gm)
    scaler = Scaler(gm, optimizer, _schedule(), shards, torch.nn.functional.cross_entropy)
    grown = scaler.after_epoch(0)
    net = fd.wrap(grown, previous=net)
    save_file({k: v.detach().contiguous() for k, v in grown.state_dict().items()},
              str(out / f"grown{rank}.safetensors"))
    inputs, labels = shards[0]
    loss = torch.nn.functional.cross_entropy(net(inputs), labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    save_file({k: v.detach().contiguous() for k, v in grown.state_dict().items()},
              str(out / f"stepped{rank}.safetensors"))
    (out / f"record{rank}.json").write_text(json.dumps({"calls": calls,
                                                         "record": scaler.records[0]}))
    _fail_on_rank_1(out, rank)
    if rank == 0:
        scaler.last_report.save(out / "report.safetensors")
        (out / "plan.json").write_text(json.dumps(scaler.records[0]["plan"]))
    fd.shutdown()
    if rank == 0:  # the unsharded analysis of the same batches, in this process
        analyze(_model(), _global_batches(), torch.nn.functional.cross_entropy,
                progress=False, seed=0).save(out / "unsharded.safetensors")


def _fail_on_rank_1(out: Path, rank: int) -> None:
    """A step that fails on rank 1 only, through gather_outcomes; each rank writes what it
    raised."""
    import fxgrow.training.distributed as fd
    from fxgrow.errors import AnalysisError

    def step():
        if rank == 1:
            raise AnalysisError("rank 1 refuses")
        return rank

    try:
        fd.gather_outcomes(step, "the test step")
    except AnalysisError as exc:
        (out / f"outcome{rank}.txt").write_text(f"{type(exc).__name__}: {exc}")


@pytest.fixture(scope="module")
def scaler_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaler")
    proc = _torchrun([str(Path(__file__).resolve()), "scaler", str(out)])
    code, _, err = _finish(proc)
    assert code == 0, err[-3000:]
    return out


def test_analysis_and_plan_equal_a_single_process_on_the_global_batch(scaler_run):
    """The report gathered from the ranks' shares is bitwise the report of one process
    analysing every target on the global batch: in the same process (same threads), and
    here (one thread too, conftest.py). A target's result does not depend on the other
    targets of the call (tests/test_analyze.py), and the gathered batches are bitwise the
    global ones."""
    import fxgrow
    from fxgrow.passes import analyze
    from fxgrow.passes.analysis.splitting import SplittingReport

    gm = _model()
    reference = analyze(gm, _global_batches(), torch.nn.functional.cross_entropy,
                        progress=False, seed=0)
    plan = fxgrow.select(reference, budget=6, layer_threshold=1)
    assert plan.num_neurons > 0
    report = SplittingReport.load(scaler_run / "report.safetensors")
    unsharded = SplittingReport.load(scaler_run / "unsharded.safetensors")
    for other in (reference, unsharded):
        assert report.targets == other.targets
        assert report.tokens == other.tokens and report.nonconverged == other.nonconverged
        assert report.settings == other.settings
        for target in other.targets:
            assert torch.equal(report.eigenvalues[target], other.eigenvalues[target]), target
    assert set(report.tokens.values()) == {GLOBAL_BATCH * ANALYSIS_BATCHES * 17}  # 16 + class
    assert json.loads((scaler_run / "plan.json").read_text()) == plan.to_dict()


def test_each_rank_analysed_a_disjoint_share_of_the_targets(scaler_run):
    from fxgrow.passes import default_targets

    logs = [json.loads((scaler_run / f"record{r}.json").read_text()) for r in range(WORLD)]
    shares = logs[0]["record"]["analysis_shards"]
    assert all(log["record"]["analysis_shards"] == shares for log in logs)
    assert [log["calls"] for log in logs] == [[share] for share in shares]
    targets = default_targets(_model())
    assert sorted(t for share in shares for t in share) == sorted(targets)
    assert all(share for share in shares)
    for key in ("analysis_record_seconds", "analysis_solve_seconds"):
        seconds = logs[0]["record"][key]  # every rank's, gathered
        assert len(seconds) == WORLD and all(s > 0 for s in seconds)


def test_a_failure_on_one_rank_is_raised_on_every_rank(scaler_run):
    for rank in range(WORLD):
        verdict = (scaler_run / f"outcome{rank}.txt").read_text()
        assert verdict == "AnalysisError: rank 1 refuses", (rank, verdict)


def test_grown_parameters_are_bitwise_identical_on_all_ranks(scaler_run):
    from safetensors.torch import load_file

    for stage in ("grown", "stepped"):
        a, b = (load_file(str(scaler_run / f"{stage}{r}.safetensors")) for r in range(WORLD))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), stage


def test_the_rewrapped_ddp_averages_the_new_parameters_gradients(scaler_run):
    """One step after growth, on 2 half batches, equals one single-process step on the whole
    batch: the new parameters are in the new wrapper's buckets (otherwise each rank would
    step them with its own half batch's gradient and the ranks would differ too)."""
    from safetensors.torch import load_file

    import fxgrow
    from fxgrow.training.optim import add_grown_params

    gm = _model()
    optimizer = torch.optim.SGD(gm.parameters(), lr=0.5)
    plan = fxgrow.GrowthPlan.from_dict(json.loads((scaler_run / "plan.json").read_text()))
    grown = fxgrow.passes.grow(gm, plan)
    add_grown_params(optimizer, grown)
    inputs, labels = _global_batches()[0]
    torch.nn.functional.cross_entropy(grown(inputs), labels).backward()
    optimizer.step()
    stepped = load_file(str(scaler_run / "stepped0.safetensors"))
    assert set(stepped) - set(gm.state_dict()), "growth added no parameter"
    for name, value in grown.state_dict().items():
        torch.testing.assert_close(stepped[name], value, rtol=1e-5, atol=1e-7, msg=name)


# --------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 2-process run, and the same run in one process, side by side."""
    root = tmp_path_factory.mktemp("runs")
    ddp, single = root / "ddp", root / "single"
    procs = [_torchrun(["-m", "fxgrow.cli", *ARGS, "--run-dir", str(ddp)]),
             _single([*ARGS, "--run-dir", str(single)])]
    for proc in procs:
        code, out, err = _finish(proc)
        assert code == 0, err[-3000:]
    return ddp, single, out


def test_ddp_run_gives_the_losses_of_one_process_with_the_same_global_batch(runs):
    ddp, single, stdout = runs
    a, b = _jsonl(ddp / "metrics.jsonl"), _jsonl(single / "metrics.jsonl")
    assert [m["epoch"] for m in a] == [0, 1, 2, 3]
    for x, y in zip(a, b):
        assert _close(x["train_loss"], y["train_loss"], 1e-5), (x, y)
        assert _close(x["val_loss"], y["val_loss"], 1e-5), (x, y)
        assert x["params"] == y["params"] and x["lr"] == y["lr"]
    ga, gb = _jsonl(ddp / "growth.jsonl"), _jsonl(single / "growth.jsonl")
    assert [g["epoch"] for g in ga] == [1, 2]
    assert [g["plan"] for g in ga] == [g["plan"] for g in gb]
    assert all(g["grown"] and g["loss_equal"] and g["equivalent"] for g in ga)
    assert "loss equal: True" in stdout  # rank 0 printed the summary


def test_an_existing_run_directory_is_refused_on_every_rank(runs):
    ddp, _, _ = runs
    before = {p: p.read_bytes() for p in ddp.rglob("*") if p.is_file()}
    code, _, err = _finish(_torchrun(["-m", "fxgrow.cli", *ARGS, "--run-dir", str(ddp)]))
    assert code != 0
    assert err.count("already exists") == WORLD, err[-3000:]  # rank 0's verdict, both ranks
    assert {p: p.read_bytes() for p in ddp.rglob("*") if p.is_file()} == before


def _launch_by_hand(run_dir, fault=None, dist_timeout=TIMEOUT):
    """Start the 2 ranks by hand (env://, as torchrun would) so that a surviving rank is not
    killed by torchrun's agent: what it does on its own is what is tested. Returns
    [(process, stderr file)]; stderr goes to files (a full pipe would block a rank)."""
    port = str(_free_port())
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    ranks = []
    for rank in range(WORLD):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **({"FXGROW_FAULT": fault}
                                                                   if fault else {}))
        err = run_dir.parent / f"{run_dir.name}.rank{rank}.err"
        with open(err, "w") as handle:
            proc = subprocess.Popen(
                [str(BIN / "fxgrow"), *ARGS, "--run-dir", str(run_dir),
                 "--dist-timeout", str(dist_timeout)],
                env=env, stdout=subprocess.DEVNULL, stderr=handle)
        ranks.append((proc, err))
    return ranks


def _wait(ranks):
    """[(returncode, stderr text)] of each rank."""
    return [(proc.wait(timeout=300), err.read_text()) for proc, err in ranks]


def _intact_latest(run_dir, epoch=None, stage=None):
    """The checkpoint LATEST names loads completely (and is the expected one, if given)."""
    from fxgrow.training import checkpoint

    config = json.loads((run_dir / "config.json").read_text())
    ckpt = checkpoint.load(run_dir, config)
    assert ckpt.path == checkpoint.latest(run_dir)
    if epoch is not None:
        assert (ckpt.epoch, ckpt.stage) == (epoch, stage)
    assert ckpt.state["optimizer"]["state"], "optimizer state missing"
    return ckpt


def test_a_rank_killed_mid_epoch_makes_the_other_exit_with_an_error(tmp_path):
    run_dir = tmp_path / "killed"
    steps = 1437 // 128  # training steps per epoch
    procs = _launch_by_hand(run_dir, f"step:{steps + 4}@1")  # rank 1 dies in epoch 2
    (code0, err0), (code1, _) = _wait(procs)
    assert code1 == -9
    assert code0 == 3, err0[-2000:]
    assert "rank 0/2: distributed training failed: another rank failed" in err0
    assert "Traceback" not in err0
    _intact_latest(run_dir, 0, "epoch")


def test_a_hung_rank_makes_the_other_exit_within_the_timeout(tmp_path):
    run_dir = tmp_path / "hung"
    timeout = 8
    (rank0, err0_path), (rank1, _) = _launch_by_hand(run_dir, dist_timeout=timeout)
    try:
        latest = run_dir / "checkpoints" / "LATEST"
        deadline = time.monotonic() + 240
        while not latest.exists() and rank0.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert latest.exists(), err0_path.read_text()[-2000:]
        rank1.send_signal(signal.SIGSTOP)  # alive, but never answers again
        stopped = time.monotonic()
        code0 = rank0.wait(timeout=timeout + 60)
        waited = time.monotonic() - stopped
        err0 = err0_path.read_text()
    finally:
        rank1.kill()
        rank1.wait()
    assert code0 == 3, err0[-2000:]
    assert "did not answer within" in err0 and "Timed out" in err0
    assert waited < timeout + 30  # the timeout, plus the rest of the epoch at most
    _intact_latest(run_dir)  # which one depends on when the stop landed


def test_a_rank_dying_while_rank_0_writes_keeps_the_last_checkpoint_and_resumes(runs, tmp_path):
    ddp, _, _ = runs
    run_dir = tmp_path / "faulty"
    # Rank 0 is killed while writing its third checkpoint (the one after the growth that
    # follows epoch 2); rank 1, waiting for it, must exit with an error.
    procs = _launch_by_hand(run_dir, "checkpoint_write:3@0")
    (code0, err0), (code1, err1) = _wait(procs)
    assert code0 == -9, err0[-2000:]
    assert code1 == 3, err1[-2000:]
    assert "rank 1/2" in err1 and "another rank failed" in err1
    assert "Traceback" not in err1
    # The half-written checkpoint never became LATEST: epoch 2's checkpoint is complete.
    assert list((run_dir / "checkpoints").glob(".tmp-*")), "the fault hit no checkpoint write"
    ckpt = _intact_latest(run_dir, 1, "epoch")
    metrics = _jsonl(ddp / "metrics.jsonl")
    assert sum(p.numel() for p in ckpt.model.parameters()) == metrics[1]["params"]
    # Each rank's own random stream (seeded seed + rank) is in the checkpoint.
    streams = [state["torch"] for state in ckpt.state["rng_ranks"]]
    assert len(streams) == WORLD and not torch.equal(streams[0], streams[1])
    assert torch.equal(streams[0], ckpt.state["rng"]["torch"])

    # Resumed in one process: the losses of the uninterrupted 2-process run, to 1e-5.
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    proc_single = _single(["scale", "--resume", str(copy)])
    # Resumed with 2 processes: bitwise the uninterrupted 2-process run.
    code, _, err = _finish(_torchrun(["-m", "fxgrow.cli", "scale", "--resume", str(run_dir)]))
    assert code == 0, err[-3000:]
    assert _jsonl(run_dir / "metrics.jsonl") == _jsonl(ddp / "metrics.jsonl")
    assert _jsonl(run_dir / "growth.jsonl") == _jsonl(ddp / "growth.jsonl")
    a, b = _final_state(ddp), _final_state(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    code, _, err = _finish(proc_single)
    assert code == 0, err[-3000:]
    for x, y in zip(_jsonl(copy / "metrics.jsonl"), _jsonl(ddp / "metrics.jsonl")):
        assert _close(x["train_loss"], y["train_loss"], 1e-5), (x, y)


if __name__ == "__main__":
    if sys.argv[1] == "scaler":
        _worker(Path(sys.argv[2]))

