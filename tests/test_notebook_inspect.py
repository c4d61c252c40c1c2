"""notebooks/inspect_growth.ipynb runs from top to bottom in a kernel of this interpreter."""

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "inspect_growth.ipynb"


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None


def test_notebook_executes(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # jupyter_client starts the "python3" kernel with the interpreter running this test, so
    # the kernel sees this venv's fxgrow; the last cell proves it.
    notebook.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    client = NotebookClient(
        notebook, kernel_name="python3", timeout=120,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    assert notebook.cells[-1].outputs[0]["text"].strip() == sys.prefix
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors
    texts = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code"
                    for o in c.outputs)
    assert "equivalent: True" in texts
    assert "loaded model gives bitwise equal outputs: True" in texts
    assert "CheckpointError:" in texts and "truncated" in texts
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs
              if "image/png" in o.get("data", {})]
    assert images, "the drawing is displayed"
    assert list(tmp_path.iterdir()) == []  # it cleans up after itself
