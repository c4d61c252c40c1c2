"""TripLe's optimizer state ("+m"/"-m") through widen and deepen against references built by
hand, and its serialized schedule (stages, freezing, the CLI, composition with growth)."""

import json

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import fxgrow
from fxgrow.cli import main
from fxgrow.models import build
from fxgrow.passes import deepen, widen
from fxgrow.training.expand import expand_optimizer
from fxgrow.training.triple import TripleScaler, TripleSchedule

DIM, IMG = 32, 16


def _tiny(depth: int = 2) -> fx.GraphModule:
    return build("tiny_vit", embed_dim=DIM, depth=depth, num_heads=2, img_size=IMG,
                 patch_size=8, num_classes=10)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, IMG, IMG, generator=g), torch.randint(0, 10, (8,), generator=g)


def _trained(gm: fx.GraphModule, steps: int = 2) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2

    opt = create_optimizer_v2(gm, "adamw", lr=1e-3, weight_decay=0.05)
    for i in range(steps):
        x, y = _batch(i)
        opt.zero_grad()
        F.cross_entropy(gm(x), y).backward()
        opt.step()
    return opt


def _state(opt, model, name):
    return opt.state[dict(model.named_parameters())[name]]


def _group(opt, model, name):
    param = dict(model.named_parameters())[name]
    return next(i for i, g in enumerate(opt.param_groups) if any(p is param for p in g["params"]))


def test_plus_m_widen_st_matches_a_hand_built_reference():
    gm = _tiny()
    opt = _trained(gm)
    wide = widen(gm, 2 * DIM, "st")
    new = expand_optimizer(opt, gm, wide)
    for key in ("exp_avg", "exp_avg_sq"):
        qkv = _state(opt, gm, "blocks.0.attn.qkv.weight")[key]
        parts = [qkv[p * DIM:(p + 1) * DIM] for p in range(3)]  # q, k, v
        expected = torch.cat([torch.block_diag(m, m) for m in parts])
        assert torch.equal(_state(new, wide, "blocks.0.attn.qkv.weight")[key], expected)
        fc2 = _state(opt, gm, "blocks.1.mlp.fc2.weight")[key]
        assert torch.equal(_state(new, wide, "blocks.1.mlp.fc2.weight")[key],
                           torch.block_diag(fc2, fc2))
        head = _state(opt, gm, "head.weight")[key]
        assert torch.equal(_state(new, wide, "head.weight")[key], torch.cat([head, head], 1) / 2)
        norm = _state(opt, gm, "blocks.0.norm1.weight")[key]
        assert torch.equal(_state(new, wide, "blocks.0.norm1.weight")[key], torch.cat([norm, norm]))
        pos = _state(opt, gm, "pos_embed")[key]
        assert torch.equal(_state(new, wide, "pos_embed")[key], torch.cat([pos, pos], -1))
    assert torch.equal(_state(new, wide, "head.weight")["step"], _state(opt, gm, "head.weight")["step"])
    # the unchanged head bias keeps its state object; groups follow the sources
    assert _state(new, wide, "head.bias") is _state(opt, gm, "head.bias")
    for name in ("blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "cls_token"):
        assert _group(new, wide, name) == _group(opt, gm, name)
    assert sum(len(g["params"]) for g in new.param_groups) == len(list(wide.parameters()))
    assert new.param_groups[0]["weight_decay"] == opt.param_groups[0]["weight_decay"]
    x, y = _batch(5)
    new.zero_grad()
    F.cross_entropy(wide(x), y).backward()
    new.step()  # the expanded state has the shapes AdamW needs


def test_plus_m_b2b_divides_reader_state_by_the_copy_count():
    gm = _tiny()
    opt = _trained(gm)
    wide = widen(gm, DIM + 16, "b2b", seed=4)
    new = expand_optimizer(opt, gm, wide)
    src = fxgrow.passes.expansion_map(wide)["cls_token"].index[2]
    counts = torch.bincount(src, minlength=DIM).double()
    m = _state(opt, gm, "head.weight")["exp_avg"]
    expected = m[:, src] / counts[src].to(m.dtype)
    torch.testing.assert_close(_state(new, wide, "head.weight")["exp_avg"], expected,
                               rtol=1e-6, atol=0)


def test_plus_m_deepen_copies_and_identity_blocks_start_fresh():
    gm = _tiny()
    opt = _trained(gm)
    deep = deepen(gm, 4, "stck")
    new = expand_optimizer(opt, gm, deep)
    for key in ("exp_avg", "exp_avg_sq", "step"):
        copied = _state(new, deep, "blocks.3.mlp.fc1.weight")[key]
        source = _state(opt, gm, "blocks.1.mlp.fc1.weight")[key]
        assert torch.equal(copied, source) and copied is not source
    ident = deepen(gm, 4, "st_stck")
    new = expand_optimizer(opt, gm, ident)
    params = dict(ident.named_parameters())
    assert params["blocks.2.attn.proj.weight"] not in new.state  # zeroed: fresh
    assert torch.equal(_state(new, ident, "blocks.2.attn.qkv.weight")["exp_avg"],
                       _state(opt, gm, "blocks.0.attn.qkv.weight")["exp_avg"])
    assert _group(new, ident, "blocks.2.norm1.bias") == _group(opt, gm, "blocks.0.norm1.bias")
    fresh = expand_optimizer(opt, gm, deep, carry_state=False)  # "-m"
    assert len(fresh.state) == 0


def _step(model, opt, scaler, seed):
    x, y = _batch(seed)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    scaler.after_step()


def test_schedule_with_depth_expansion_freezes_the_old_blocks_in_stage_two():
    gm = _tiny()
    opt = _trained(gm)
    scaler = TripleScaler(TripleSchedule(width=2 * DIM, depth=4, stage1_epochs=1,
                                         stage2_epochs=1))
    model, opt = scaler.start(gm, opt)
    assert len(opt.state) > 0  # "+m" carried the small model's state through widen
    _step(model, opt, scaler, 1)
    model, opt, changed = scaler.after_epoch(0, model, opt)
    assert changed and len(fxgrow.passes.residual.blocks(model)) == 4
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(model, opt, scaler, 2)
    after = dict(model.named_parameters())
    for name in ("blocks.0.attn.qkv.weight", "blocks.1.norm2.bias", "pos_embed",
                 "patch_embed.proj.weight", "cls_token"):
        assert torch.equal(after[name], before[name]), name
    for name in ("blocks.2.attn.qkv.weight", "blocks.3.mlp.fc2.weight", "head.weight"):
        assert not torch.equal(after[name], before[name]), name
    model, opt, changed = scaler.after_epoch(1, model, opt)
    assert not changed
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(model, opt, scaler, 3)
    assert not torch.equal(dict(model.named_parameters())["blocks.0.attn.qkv.weight"],
                           before["blocks.0.attn.qkv.weight"])
    assert [r["stage"] for r in scaler.records] == [0, 1, 2, 3]


def test_schedule_without_depth_trains_the_zero_entries_first():
    gm = _tiny(depth=2)
    scaler = TripleScaler(TripleSchedule(width=2 * DIM, stage1_epochs=1, stage2_epochs=1))
    model, _ = scaler.start(gm)
    from timm.optim import create_optimizer_v2

    opt = create_optimizer_v2(model, "adamw", lr=1e-2, weight_decay=0.05)
    name = "blocks.1.attn.qkv.weight"  # a top block: only its off-diagonal zeros train
    before = dict(model.named_parameters())[name].detach().clone()
    _step(model, opt, scaler, 1)
    after = dict(model.named_parameters())[name]
    copies = torch.zeros_like(before, dtype=torch.bool)
    for p in range(3):
        copies[p * 2 * DIM:(p + 1) * 2 * DIM] = torch.block_diag(
            torch.ones(DIM, DIM), torch.ones(DIM, DIM)).bool()
    assert torch.equal(after[copies], before[copies])
    assert not torch.equal(after[~copies], before[~copies])
    model, opt, _ = scaler.after_epoch(0, model, opt)  # stage II: the bottom's zeros, all top
    bottom = dict(model.named_parameters())["blocks.0.mlp.fc1.weight"].detach().clone()
    _step(model, opt, scaler, 2)
    new_bottom = dict(model.named_parameters())["blocks.0.mlp.fc1.weight"]
    mask = torch.block_diag(torch.ones(4 * DIM, DIM), torch.ones(4 * DIM, DIM)).bool()
    assert torch.equal(new_bottom[mask], bottom[mask])
    assert not torch.equal(new_bottom[~mask], bottom[~mask])


def test_cli_scale_runs_the_triple_schedule_with_growth(tmp_path):
    run = tmp_path / "run"
    small = ["--model", "tiny_vit", "--model-kwargs",
             '{"embed_dim": 16, "depth": 1, "num_heads": 2}', "--img-size", "16",
             "--batch-size", "128", "--quiet"]
    code = main(["scale", *small, "--epochs", "3", "--triple-width", "32", "--triple-depth",
                 "2", "--triple-stage1", "1", "--triple-stage2", "1", "--warmup", "2",
                 "--interval", "1", "--end-epoch", "2", "--budget", "4", "--layer-threshold",
                 "1", "--analysis-batches", "1", "--run-dir", str(run)])
    assert code == 0
    config = json.loads((run / "config.json").read_text())
    assert config["triple"]["width"] == 32 and config["triple"]["carry_state"] is True
    passes = [r["pass"] for r in config["start_history"]]
    assert passes == ["widen"]
    from fxgrow.training.checkpoint import latest

    final = fxgrow.io.read_recipe(latest(run) / "model")
    # a run may widen, deepen and grow neurons: all three passes are in the final recipe,
    # then the packing the scaler trains with (docs/packing.md)
    assert [r["pass"] for r in final["history"]] == ["widen", "deepen", "grow", "pack"]
    growth = [json.loads(line) for line in (run / "growth.jsonl").read_text().splitlines()]
    assert growth and growth[-1]["loss_equal"]


def test_cli_refuses_a_width_the_model_cannot_take(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["scale", "--model", "tiny_vit", "--model-kwargs",
                 '{"embed_dim": 16, "depth": 1, "num_heads": 2}', "--img-size", "16",
                 "--epochs", "3", "--triple-width", "20", "--quiet", "--run-dir", str(run)])
    assert code == 2
    assert "head dim" in capsys.readouterr().err
    assert not run.exists()
    with pytest.raises(fxgrow.ScheduleError, match="width, a depth"):
        TripleSchedule()
    with pytest.raises(fxgrow.ScheduleError, match="stage1_epochs"):
        TripleSchedule(depth=4, stage1_epochs=0)
    assert main(["scale", "--model", "tiny_vit", "--epochs", "2", "--triple-depth", "8",
                 "--quiet", "--run-dir", str(run)]) == 2
    assert "stage III" in capsys.readouterr().err and not run.exists()
