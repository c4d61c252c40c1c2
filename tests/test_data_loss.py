"""Defects that lost or exposed data, each pinned by a test that failed before its fix."""

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fxgrow
import fxgrow.io as fio
import fxgrow.models
from fxgrow.errors import CheckpointError, StorageError

VIT = {"source": "fxgrow", "name": "tiny_vit",
       "kwargs": {"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2}}


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def model():
    return fxgrow.models.build(VIT).eval()


@pytest.fixture
def saved(model, tmp_path):
    path = tmp_path / "model"
    fxgrow.save(model, path)
    return path


def _rewrite_recipe(path: Path, edit) -> None:
    """Edit a recipe and re-seal its (unkeyed) checksum, as anyone can."""
    recipe = path / fio.RECIPE_FILE
    document = json.loads(recipe.read_text())
    edit(document)
    document["checksum"] = fio._checksum(document)
    recipe.write_text(json.dumps(document))


def test_save_into_a_directory_that_merely_holds_a_recipe_json_keeps_everything(model, tmp_path):
    user = tmp_path / "work"
    (user / "eval").mkdir(parents=True)
    (user / "recipe.json").write_text('{"my": "own recipe"}')
    (user / "notes.txt").write_text("precious")
    (user / "eval" / "scores.csv").write_text("1,2,3")
    before = _tree(user)
    with pytest.raises(CheckpointError, match="not a saved fxgrow model"):
        fxgrow.save(model, user)
    assert _tree(user) == before


def test_save_over_a_model_next_to_user_files_is_refused(model, saved):
    (saved / "notes.txt").write_text("precious")
    before = _tree(saved)
    with pytest.raises(CheckpointError, match="notes.txt"):
        fxgrow.save(model, saved)
    assert _tree(saved) == before


@pytest.mark.parametrize("name", ["../outside.safetensors", "{tmp}/outside.safetensors",
                                  "sub/model.safetensors", "..", "recipe.json"])
def test_weights_file_is_confined_to_the_model_directory(saved, tmp_path, name):
    # A file outside the directory that is a valid model's weights: it must not be read.
    name = name.format(tmp=tmp_path)
    outside = Path(name) if name.startswith("/") else saved / name
    if name.startswith(("..", "/")) and name != "..":
        outside.write_bytes((saved / fio.WEIGHTS_FILE).read_bytes())
    _rewrite_recipe(saved, lambda d: d["weights"].update(file=name))
    with pytest.raises(CheckpointError, match="not a plain file name inside the model directory"):
        fxgrow.load(saved)


def test_weights_file_has_the_mode_the_umask_gives(saved):
    mask = os.umask(0)
    os.umask(mask)
    for name in (fio.WEIGHTS_FILE, fio.RECIPE_FILE):
        assert (saved / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    assert saved.stat().st_mode & 0o777 == 0o777 & ~mask


def test_saving_under_a_path_that_is_a_file_is_a_storage_error(model, tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(StorageError, match="is a file") as info:
        fxgrow.save(model, tmp_path / "file" / "model")
    assert info.value.exit_code == 4
    assert (tmp_path / "file").read_text() == "mine"


def test_a_full_disk_is_a_named_error_with_its_own_exit_code(tmp_path):
    # RLIMIT_FSIZE makes the kernel refuse writes past a size (EFBIG) as a full disk would
    # refuse them (ENOSPC); Python ignores the SIGXFSZ that comes with it.
    out = tmp_path / "model"
    code = (
        "import resource, sys; from fxgrow.cli import main; "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
        f"sys.exit(main(['reduce', '--model', 'tiny_vit', '--model-kwargs', "
        f"'{json.dumps(VIT['kwargs'])}', '--out', {str(out)!r}]))"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "fxgrow: error:" in proc.stderr and "too large" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
