"""The shape of the repository: the graph side loads without the training side, nothing
points outside the repository, and what fxgrow knows about ops is written once."""

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fxgrow"


def test_the_graph_side_loads_without_the_training_side():
    code = (
        "import json, sys\n"
        "import fxgrow, fxgrow.passes, fxgrow.verify, fxgrow.io, fxgrow.inspection, "
        "fxgrow.plan, fxgrow.select, fxgrow.models, fxgrow.tracing\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('fxgrow'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    loaded = json.loads(out)
    assert "fxgrow.passes.grow" in loaded and "fxgrow.verify.flops" in loaded
    assert [m for m in loaded if m == "fxgrow.training" or m.startswith("fxgrow.training.")] == []


def _tracked_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], capture_output=True, check=True,
                                cwd=ROOT).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / p for p in listed.split("\0") if p and not p.startswith(".ci/")]


def test_no_file_points_outside_the_repository():
    # Spelled in pieces so that this file does not name them itself.
    forbidden = ["DESIGN" + ".md", ".." + "/shared", "/work" + "/"]
    found = []
    for path in _tracked_files():
        if not path.is_file() or path.is_symlink():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        for word in forbidden:
            if word in text:
                found.append(f"{path.relative_to(ROOT)}: {word}")
    assert found == []


# A literal collection (set, tuple, list, frozenset(...)) naming at least two members of a
# family is a table of that family; fxgrow/_ops.py is the only place for one.
FAMILIES = {
    "activation": {"gelu", "relu", "silu", "tanh", "sigmoid", "mish", "elu", "GELU", "ReLU",
                   "SiLU", "Tanh", "Sigmoid", "Mish", "ELU"},
    "attention": {"scaled_dot_product_attention"},
    "matmul": {"matmul", "bmm", "mm", "baddbmm"},
    "linear": {"linear"},
    "layer norm": {"layer_norm", "LayerNorm"},
}


def _member_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def _tables(tree: ast.AST):
    for node in ast.walk(tree):
        items = None
        if isinstance(node, (ast.Set, ast.Tuple, ast.List)):
            items = node.elts
        elif isinstance(node, ast.Call) and _member_name(node.func) in ("frozenset", "set") \
                and node.args and isinstance(node.args[0], (ast.Set, ast.Tuple, ast.List)):
            continue  # its literal argument is visited itself
        if not items:
            continue
        names = [_member_name(item) for item in items]
        for family, members in FAMILIES.items():
            if sum(name in members for name in names) >= 2:
                yield family, node.lineno


def test_op_tables_are_defined_once():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for family, line in _tables(ast.parse(path.read_text(encoding="utf-8"))):
            found.setdefault(family, []).append(f"{path.relative_to(ROOT)}:{line}")
    outside = {family: [w for w in where if not w.startswith("fxgrow/_ops.py:")]
               for family, where in found.items()}
    assert {family: where for family, where in outside.items() if where} == {}
    assert set(found) == set(FAMILIES)  # each family has its table in _ops.py


def test_flop_formulas_and_grow_records_have_one_home():
    # The per-node FLOPs of the summary come from verify.flops; the grow records are read
    # by grow's own parser, which grow_lineage and the inspection share.
    # (fxgrow.inspection.summary and fxgrow.passes.grow are the functions; the modules:)
    summary = importlib.import_module("fxgrow.inspection.summary")
    draw = importlib.import_module("fxgrow.inspection.draw")
    grow = importlib.import_module("fxgrow.passes.grow")
    flops = importlib.import_module("fxgrow.verify.flops")

    assert summary.node_flops is flops.node_flops
    assert summary.created_modules is grow.created_modules is draw.created_modules
    summary_source = Path(summary.__file__).read_text(encoding="utf-8")
    assert "kernel_size" not in summary_source and '"history"' not in summary_source
    assert '"created"' not in Path(summary.__file__).read_text(encoding="utf-8")
    assert '"created"' not in Path(draw.__file__).read_text(encoding="utf-8")


def test_every_pass_registers_its_own_replayer():
    grow = importlib.import_module("fxgrow.passes.grow")
    reduce = importlib.import_module("fxgrow.passes.reduce")
    replay = importlib.import_module("fxgrow.passes.replay")

    assert replay._REPLAYERS["grow"] is grow.replay_grow
    assert replay._REPLAYERS["reduce"] is reduce.replay_reduce
    replay_source = Path(replay.__file__).read_text(encoding="utf-8")
    assert "import grow" not in replay_source and "from .grow" not in replay_source


def test_no_private_name_crosses_modules():
    """A name one module imports from another is public where it is defined (private modules
    such as ``_fsio`` may be imported whole); torch's private
    ``_get_attr`` is wrapped once (``_ops.get_attr_value``)."""
    crossing, torch_private = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0 and node.module:
                crossing += [f"{where}:{node.lineno} {a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
            if isinstance(node, ast.Attribute) and node.attr == "_get_attr":
                torch_private.append(f"{where}:{node.lineno}")
    assert crossing == []
    assert all(w.startswith("fxgrow/_ops.py:") for w in torch_private), torch_private
