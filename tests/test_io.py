"""fxgrow.save / fxgrow.load: bitwise round trips, integrity checks, atomic writes."""

import copy
import errno
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fxgrow
import fxgrow._fsio as fsio
import fxgrow.io as fio
import fxgrow.models
from fxgrow.errors import CheckpointError, StorageError
from fxgrow.passes import _rebuild, register_replay
from fxgrow.passes import replay as replay_module
from fxgrow.passes import ReduceSpec, reduce
from fxgrow.passes.grow import grow

VIT = {
    "source": "fxgrow",
    "name": "tiny_vit",
    "kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
}
BEIT = {
    "source": "timm",
    "name": "beit_base_patch16_224",
    "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
               "num_classes": 10},
}


def _build(spec):
    return fxgrow.models.build(spec).eval()


def _inputs(seed=1):
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _snapshot(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


def _random_plan(gm, rng, *, nested):
    """A plan over 1-3 random linear targets; with ``nested``, also one linear created by an
    earlier round (so a pseudo-layer grows inside a pseudo-layer)."""
    sites = fxgrow.linear_sites(gm)
    created = [t for t in sites if "_grow" in t]
    originals = [t for t in sites if "_grow" not in t and t != "head"]
    targets = rng.sample(originals, k=rng.randint(1, 3))
    if nested and created:
        targets.append(rng.choice(created))
    plan = {}
    for target in targets:
        out = sites[target][0].out_features
        plan[target] = sorted(rng.sample(range(out), k=rng.randint(1, min(4, out))))
    return plan


def _grown(spec, rounds, mode, seed=0):
    gm = _build(spec)
    rng = random.Random(seed)
    for r in range(rounds):
        gm = grow(gm, _random_plan(gm, rng, nested=r > 0), mode=mode)
    return gm


def _train_grown_weights(gm):
    """Give the new neurons non-trivial weights, as training would: a round trip of freshly
    grown pairs alone could not tell a plus weight from the negated minus weight."""
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if "_grow" in name:
                param.add_(torch.randn_like(param) * 0.1)


def _assert_round_trip(gm, tmp_path, x):
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    code_before = gm.code
    path = fxgrow.save(gm, tmp_path / "model")
    loaded = fxgrow.load(path)
    # Saving changes nothing in the model.
    assert gm.code == code_before
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
    # Same structure, same recipe, same weights bit for bit, same outputs bit for bit.
    assert loaded.code == gm.code
    assert fxgrow.recipe(loaded) == fxgrow.recipe(gm)
    assert loaded.training == gm.training
    saved_state, loaded_state = gm.state_dict(), loaded.state_dict()
    assert list(loaded_state) == list(saved_state)
    for key, value in saved_state.items():
        assert loaded_state[key].dtype == value.dtype, key
        assert torch.equal(loaded_state[key], value), key
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))
    # The loaded model owns its tensors.
    ours = {p.data_ptr() for p in gm.parameters()}
    assert not any(p.data_ptr() in ours for p in loaded.parameters())
    return loaded


def test_round_trip_traced(tmp_path):
    gm = _build(VIT)
    loaded = _assert_round_trip(gm, tmp_path, _inputs())
    assert fxgrow.history(loaded) == []


@pytest.mark.parametrize("mode", ["paper", "fused"])
@pytest.mark.parametrize("rounds", [1, 2, 3])
def test_round_trip_grown(tmp_path, rounds, mode):
    gm = _grown(VIT, rounds, mode, seed=rounds)
    assert len(fxgrow.history(gm)) == rounds
    if rounds > 1:  # the generator did grow a pseudo-layer inside a pseudo-layer
        created = {c for r in fxgrow.history(gm) for c in r["args"]["created"]}
        targets = {t for r in fxgrow.history(gm) for t in r["args"]["plan"]["neurons"]}
        assert created & targets
    _train_grown_weights(gm)
    loaded = _assert_round_trip(gm, tmp_path, _inputs())
    # Gradients after a backward pass are the same too: the loaded graph is the same program.
    for model in (gm, loaded):
        model.zero_grad()
        model(_inputs()).square().sum().backward()
    grads = dict(gm.named_parameters())
    for name, param in loaded.named_parameters():
        assert torch.equal(param.grad, grads[name].grad), name


def test_round_trip_grown_beit_functional_qkv(tmp_path):
    gm = _build(BEIT)
    sites = fxgrow.linear_sites(gm)
    assert sites["blocks.0.attn.qkv.weight"][0].kind == "functional"
    gm = grow(gm, {"blocks.0.attn.qkv.weight": [0, 5, 40], "blocks.1.mlp.fc1": [3]})
    gm = grow(gm, {"blocks.0.attn.qkv.weight": [5], "blocks.0.attn.qkv_grow0_plus": [1]})
    _train_grown_weights(gm)
    _assert_round_trip(gm, tmp_path, _inputs())


@pytest.mark.parametrize("spec", [VIT, BEIT], ids=["vit", "beit"])
def test_round_trip_reduced_then_grown(tmp_path, spec):
    # keep="norm" picks channels from the weights: replay on a fresh base must use the
    # recorded indices, not recompute them from other weights.
    reduced = reduce(_build(spec), ReduceSpec(head_dim=0.5, mlp_hidden=0.5, keep="norm"))
    _assert_round_trip(reduced, tmp_path / "reduced", _inputs())
    gm = reduced
    rng = random.Random(7)
    for r, mode in enumerate(["paper", "fused", "paper"]):
        gm = grow(gm, _random_plan(gm, rng, nested=r > 0), mode=mode)
    _train_grown_weights(gm)
    assert [r["pass"] for r in fxgrow.history(gm)] == ["reduce", "grow", "grow", "grow"]
    _assert_round_trip(gm, tmp_path / "grown", _inputs())


def test_round_trip_keeps_training_flag_and_dtype(tmp_path):
    gm = _grown(VIT, 1, "paper").double().train()
    loaded = _assert_round_trip(gm.eval().train(), tmp_path, _inputs().double())
    assert loaded.training
    assert all(p.dtype == torch.float64 for p in loaded.parameters())


def test_overwrite_replaces_previous_model(tmp_path):
    path = tmp_path / "model"
    fxgrow.save(_build(VIT), path)
    grown = _grown(VIT, 2, "paper")
    fxgrow.save(grown, path)
    assert fxgrow.recipe(fxgrow.load(path)) == fxgrow.recipe(grown)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp dirs left
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o777 & ~umask  # not the temp dir's private 0700


def test_overwrite_without_atomic_exchange(tmp_path, monkeypatch):
    monkeypatch.setattr(fsio, "_exchange", lambda a, b: False)
    path = tmp_path / "model"
    fxgrow.save(_build(VIT), path)
    grown = _grown(VIT, 1, "fused")
    fxgrow.save(grown, path)
    assert fxgrow.recipe(fxgrow.load(path)) == fxgrow.recipe(grown)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_crash_mid_save_keeps_the_previous_model(tmp_path, monkeypatch):
    path = tmp_path / "model"
    fxgrow.save(_build(VIT), path)
    good = _snapshot(path)

    real_write = fsio.atomic_write

    def crash(target, data):
        if Path(target).name == fio.WEIGHTS_FILE:  # the disk fills up half-way through
            Path(target).write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        return real_write(target, data)

    monkeypatch.setattr(fsio, "atomic_write", crash)
    with pytest.raises(StorageError, match="no space left on the device") as info:
        fxgrow.save(_grown(VIT, 1, "paper"), path)
    assert info.value.exit_code == 4
    assert _snapshot(path) == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    fxgrow.load(path)


def test_save_without_base_spec_explains_how(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2,
                              num_classes=10)
    gm = torch.fx.symbolic_trace(model)  # not fxgrow.trace: nothing records its base
    with pytest.raises(CheckpointError, match=r"no base model spec.*fxgrow\.trace.*base="):
        fxgrow.save(gm, tmp_path / "model")
    assert not any(tmp_path.iterdir())
    traced = fxgrow.trace(model)  # a module of the caller's own: saved, loaded with model=
    fxgrow.save(traced, tmp_path / "model")
    with pytest.raises(CheckpointError, match=r"VisionTransformer.*model="):
        fxgrow.load(tmp_path / "model")


def test_save_refuses_to_replace_other_data(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    gm = _build(VIT)
    with pytest.raises(CheckpointError, match="not a saved fxgrow model"):
        fxgrow.save(gm, tmp_path / "notes")
    with pytest.raises(CheckpointError, match="not a directory"):
        fxgrow.save(gm, tmp_path / "file")
    assert (tmp_path / "notes" / "a.txt").read_text() == "mine"
    assert (tmp_path / "file").read_text() == "mine"


def test_shared_tensors_are_written_once_each(tmp_path):
    gm = _build(VIT)
    # Tie two parameters, as weight tying does: safetensors refuses shared storage as is.
    gm.get_submodule("blocks.1.mlp.fc2").weight = gm.get_submodule("blocks.0.mlp.fc2").weight
    fxgrow.save(gm, tmp_path / "model")
    tensors = load_file(tmp_path / "model" / fio.WEIGHTS_FILE)
    assert torch.equal(tensors["blocks.0.mlp.fc2.weight"], tensors["blocks.1.mlp.fc2.weight"])


# ------------------------------------------------------------------------- a pass from outside


def _append_relu(gm):
    """A pass defined outside fxgrow: relu on the output, recorded in the history."""
    graph = copy.deepcopy(gm.graph)
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        relu = graph.call_function(torch.relu, (output.args[0],))
    output.args = (relu,)
    return _rebuild.build_graph_module(gm, graph, record={"pass": "test_relu", "args": {}})


def test_unknown_pass_then_registered_pass(tmp_path, monkeypatch):
    gm = _append_relu(_grown(VIT, 1, "paper"))
    path = fxgrow.save(gm, tmp_path / "model")
    with pytest.raises(CheckpointError, match=r"record 1 names unknown pass 'test_relu'.*grow"):
        fxgrow.load(path)
    monkeypatch.setitem(replay_module._REPLAYERS, "test_relu", None)
    register_replay("test_relu", lambda g, args: _append_relu(g))
    loaded = fxgrow.load(path)
    with torch.no_grad():
        out = loaded(_inputs())
        assert torch.equal(out, gm(_inputs())) and (out >= 0).all()


# ------------------------------------------------------------------------------- corruption


def _rewrite_recipe(path: Path, edit) -> None:
    """Edit recipe.json and re-seal its checksum, as a careful forger would (independent of
    fxgrow's code: sha256 of the canonical JSON of every field but the checksum)."""
    document = json.loads((path / fio.RECIPE_FILE).read_text())
    edit(document)
    body = {k: v for k, v in document.items() if k != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    document["checksum"] = hashlib.sha256(canonical.encode()).hexdigest()
    (path / fio.RECIPE_FILE).write_text(json.dumps(document))


def _reseal_weights(path: Path) -> None:
    """Make the recipe's weights entry describe the weights file as it now is."""
    weights = path / fio.WEIGHTS_FILE
    data = weights.read_bytes()
    tensors = load_file(weights)

    def edit(document):
        document["weights"].update(
            bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            tensors={k: {"shape": list(v.shape), "dtype": str(v.dtype)[6:]}
                     for k, v in tensors.items()},
        )

    _rewrite_recipe(path, edit)


def _truncate(path, other):
    weights = path / fio.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])


def _flip_byte(path, other):
    weights = path / fio.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x40
    weights.write_bytes(bytes(data))


def _edit_json_value(path, other):
    recipe = path / fio.RECIPE_FILE
    document = json.loads(recipe.read_text())
    document["history"][0]["args"]["scale"] = 0.5
    recipe.write_text(json.dumps(document))


def _break_json(path, other):
    recipe = path / fio.RECIPE_FILE
    recipe.write_text(recipe.read_text()[:-20])


def _delete_key(path, other):
    weights = path / fio.WEIGHTS_FILE
    tensors = load_file(weights)
    del tensors["blocks.0.mlp.fc1.bias"]
    save_file(tensors, weights)


def _delete_key_resealed(path, other):
    _delete_key(path, other)
    _reseal_weights(path)


def _other_models_recipe(path, other):
    (path / fio.RECIPE_FILE).write_bytes((other / fio.RECIPE_FILE).read_bytes())


def _other_history_resealed(path, other):
    _rewrite_recipe(path, lambda d: d.update(history=[]))


def _other_base_resealed(path, other):
    _rewrite_recipe(path, lambda d: d["base"]["kwargs"].update(num_classes=7))


def _unknown_pass(path, other):
    _rewrite_recipe(path, lambda d: d["history"].append({"pass": "frobnicate", "args": {}}))


def _bad_plan(path, other):
    def edit(document):
        document["history"][0]["args"]["plan"]["neurons"] = {"blocks.9.mlp.fc1": [0]}

    _rewrite_recipe(path, edit)


def _renamed_growth_resealed(path, other):
    def edit(document):
        created = document["history"][0]["args"]["created"]
        name = sorted(created)[0]
        created[name.replace("_grow0_", "_grow5_")] = created.pop(name)

    _rewrite_recipe(path, edit)


def _unknown_version(path, other):
    _rewrite_recipe(path, lambda d: d.update(format_version=99))


def _garbage_header_resealed(path, other):
    weights = path / fio.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[8:40] = b"{" * 32
    weights.write_bytes(bytes(data))
    _rewrite_recipe(path, lambda d: d["weights"].update(sha256=hashlib.sha256(data).hexdigest()))


def _missing_weights(path, other):
    (path / fio.WEIGHTS_FILE).unlink()


def _missing_recipe(path, other):
    (path / fio.RECIPE_FILE).unlink()


CORRUPTIONS = {
    "truncated weights": (_truncate, r"model\.safetensors: truncated: \d+ bytes"),
    "flipped byte": (_flip_byte, r"sha256 mismatch.*modified or belong to another model"),
    "edited recipe": (_edit_json_value, r"checksum mismatch: the recipe was edited"),
    "broken json": (_break_json, r"recipe\.json: invalid JSON at line \d+ column \d+"),
    "deleted key": (_delete_key, r"model\.safetensors: (truncated|sha256 mismatch)"),
    "deleted key, resealed": (
        _delete_key_resealed, r"weights do not match the rebuilt model: missing keys "
                              r"\['blocks\.0\.mlp\.fc1\.bias'\]"),
    "recipe of another model": (_other_models_recipe, r"sha256 mismatch|truncated|extra bytes"),
    "history of another model, resealed": (
        _other_history_resealed, r"unexpected keys \[.*_grow0_"),
    "base of another model, resealed": (
        _other_base_resealed, r"shape mismatch for 'head\.(weight|bias)'"),
    "unknown pass": (_unknown_pass, r"record 1 names unknown pass 'frobnicate'"),
    "plan for another graph": (_bad_plan, r"replaying history record 0 \(pass 'grow'\) failed: "
                                          r"PlanError.*blocks\.9\.mlp\.fc1"),
    "growth record naming other modules, resealed": (
        _renamed_growth_resealed, r"replayed growth created \[.*\], the record says .*_grow5_"),
    "unknown format version": (_unknown_version, r"unknown format version 99"),
    "garbage safetensors header": (_garbage_header_resealed,
                                   r"not a readable safetensors file"),
    "missing weights": (_missing_weights, r"missing file model\.safetensors"),
    "missing recipe": (_missing_recipe, r"missing file recipe\.json"),
}


@pytest.fixture(scope="module")
def saved_pair(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("saved")
    grown = _grown(VIT, 1, "paper")
    fxgrow.save(grown, root / "grown")
    fxgrow.save(_build(VIT), root / "base")
    return root / "grown", root / "base"


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corruption_raises_checkpoint_error(case, saved_pair, tmp_path):
    source, other = saved_pair
    path = tmp_path / "model"
    shutil.copytree(source, path)
    corrupt, message = CORRUPTIONS[case]
    corrupt(path, other)
    damaged = _snapshot(path)
    with pytest.raises(CheckpointError, match=message):
        fxgrow.load(path)
    assert _snapshot(path) == damaged  # load only reads


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        fxgrow.load(tmp_path / "nothing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="expected a directory"):
        fxgrow.load(tmp_path / "file")


def test_read_recipe_needs_no_weights(saved_pair):
    source, _ = saved_pair
    document = fio.read_recipe(source)
    assert document["base"] == fxgrow.recipe(_build(VIT))["base"]
    assert document["base"]["name"] == "tiny_vit" and document["base"]["kwargs"]["depth"] == 2
    assert [r["pass"] for r in document["history"]] == ["grow"]
    assert os.path.getsize(source / fio.WEIGHTS_FILE) == document["weights"]["bytes"]
