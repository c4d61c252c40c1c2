"""The notebooks run from top to bottom in a kernel of this interpreter and show what they
promise. They are committed without outputs."""

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import paper_selection, vit_flops, vit_params, vit_shape

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _numbers(pattern: str, texts: str) -> list[int]:
    return [int(n.replace(",", "")) for n in re.findall(pattern, texts, re.M)]


def _inspect_growth(texts: str, probe: dict) -> None:
    assert "equivalent: True" in texts and "max |output difference|: 0.0\n" in texts
    assert "loaded model gives bitwise equal outputs: True" in texts
    assert "CheckpointError:" in texts and "truncated" in texts
    # tiny_vit: 32x32, patch 4, width 64, 4 blocks of 4 heads (16 -> 8), MLP 256 -> 128
    full = vit_shape(dim=64, depth=4, heads=4, head_dim=16, hidden=256, classes=10, patch=4,
                     img=32)
    reduced = vit_shape(dim=64, depth=4, heads=4, head_dim=8, hidden=128, classes=10, patch=4,
                        img=32)
    assert _numbers(r"^parameters: ([\d,]+)$", texts) == [vit_params(**full),
                                                           vit_params(**reduced)]
    assert _numbers(r"^FLOPs per batch of 4: ([\d,]+)$", texts) == [vit_flops(batch=4, **full)]
    # round 1 (paper mode): fc1 4 neurons and qkv 2 of fan-in 64, fc2 1 of fan-in 128;
    # round 2 (fused): fc1 2 and 2 rows of the round-1 linear fc1_grow0_plus, fan-in 64
    grown = vit_params(**reduced) + 2 * (6 * 65 + 129) + (2 + 2) * 65
    assert _numbers(r"^parameters: [\d,]+ -> ([\d,]+)$", texts) == [grown]


def _splitting_analysis(texts: str, probe: dict) -> None:
    assert "equivalent: True" in texts and "bitwise equal logits: True" in texts
    assert "blocks.0.mlp.fc1" in texts  # the summary table and the plan
    errors = [float(e) for e in re.findall(r"median relative error of fast vs exact (\S+)", texts)]
    assert len(errors) == 2 and max(errors) <= 1e-3
    plan = paper_selection(probe["eigenvalues"], budget=48, layer_threshold=20)
    assert probe["plan"] == plan and sum(map(len, plan.values())) == 48
    fan_in = {"attn.qkv": 64, "attn.proj": 32, "mlp.fc1": 64, "mlp.fc2": 128}
    new = sum(2 * (fan_in[t.split(".", 2)[2]] + 1) * len(v) for t, v in plan.items())
    assert re.search(rf"^48 neurons, {new:,} new parameters$", texts, re.M)
    # tiny_vit_reduced at 16x16: 17 tokens, head dim 8, MLP 128
    base = vit_params(**vit_shape(dim=64, depth=4, heads=4, head_dim=8, hidden=128,
                                  classes=10, patch=4, img=16))
    assert re.search(rf"^parameters {base:,} -> {base + new:,}$", texts, re.M)


def _study(texts: str, probe: dict) -> None:
    # the quick study: two grown conditions of one seed, two rounds each, all bitwise equal
    assert "2 runs in quick: conditions ['splitting', 'random'], seeds [0]" in texts
    assert re.findall(r"^(\w+)-seed0: 2 of 2 rounds bitwise equal", texts, re.M) == [
        "random", "splitting"]
    assert "eigenvalues_splitting-seed0" in texts and "depth_splitting-seed0" in texts
    assert re.search(r"^  blocks\.\d+\.\S+\s+\{0: \d+, 1: \d+", texts, re.M)  # some grown
    assert len(probe["checks"]) == 4
    assert all(c["loss_equal"] and c["before"] == c["after"] for c in probe["checks"])


# Run after a notebook's own cells: what the checks need beyond the printed text.
PROBES = {
    "inspect_growth.ipynb": "{}",
    "splitting_analysis.ipynb": (
        "{'plan': {t: [int(i) for i in v] for t, v in plan.items()}, "
        "'eigenvalues': {t: v.tolist() for t, v in report.eigenvalues.items()}}"
    ),
    "study.ipynb": "{'checks': [c for r in report['runs'] for c in r['loss_checks']]}",
}
EXPECTATIONS = {"inspect_growth.ipynb": _inspect_growth,
                "splitting_analysis.ipynb": _splitting_analysis,
                "study.ipynb": _study}


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTATIONS) \
        == sorted(PROBES)


@pytest.mark.parametrize("name", sorted(EXPECTATIONS))
def test_notebook_is_committed_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None


@pytest.mark.parametrize("name", sorted(EXPECTATIONS))
def test_notebook_executes(name, tmp_path):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    # jupyter_client starts the "python3" kernel with the interpreter running this test, so
    # the kernel sees this venv's fxgrow; the last cell proves it.
    notebook.cells.append(nbformat.v4.new_code_cell(
        f"import json as _json; print('probe:', _json.dumps({PROBES[name]}))"))
    notebook.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    client = NotebookClient(notebook, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert outputs[-1]["text"].strip() == sys.prefix
    assert not [o for o in outputs if o.output_type == "error"]
    probe = json.loads(outputs[-2]["text"].removeprefix("probe:"))
    EXPECTATIONS[name]("".join(o.get("text", "") for o in outputs[:-2]), probe)
    assert any("image/png" in o.get("data", {}) for o in outputs), "a figure is displayed"
    assert list(tmp_path.iterdir()) == []  # it cleans up after itself
