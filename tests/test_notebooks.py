"""The notebooks run from top to bottom in a kernel of this interpreter and show what they
promise. They are committed without outputs."""

import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _inspect_growth(texts: str) -> None:
    assert "equivalent: True" in texts
    assert "loaded model gives bitwise equal outputs: True" in texts
    assert "CheckpointError:" in texts and "truncated" in texts


def _splitting_analysis(texts: str) -> None:
    assert "equivalent: True" in texts and "bitwise equal logits: True" in texts
    assert "blocks.0.mlp.fc1" in texts  # the summary table and the plan
    errors = [float(e) for e in re.findall(r"median relative error of fast vs exact (\S+)", texts)]
    assert len(errors) == 2 and max(errors) <= 1e-3
    assert re.search(r"^48 neurons, [\d,]+ new parameters$", texts, re.M)


EXPECTATIONS = {"inspect_growth.ipynb": _inspect_growth,
                "splitting_analysis.ipynb": _splitting_analysis}


def test_every_notebook_is_tested():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTATIONS)


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
    notebook.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    client = NotebookClient(notebook, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert outputs[-1]["text"].strip() == sys.prefix
    assert not [o for o in outputs if o.output_type == "error"]
    EXPECTATIONS[name]("".join(o.get("text", "") for o in outputs))
    assert any("image/png" in o.get("data", {}) for o in outputs), "a figure is displayed"
    assert list(tmp_path.iterdir()) == []  # it cleans up after itself
