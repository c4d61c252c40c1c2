"""notebooks/splitting_analysis.ipynb runs from top to bottom in a kernel of this interpreter."""

import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "splitting_analysis.ipynb"


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None


def test_notebook_executes(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    client = NotebookClient(
        notebook, kernel_name="python3", timeout=120,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the failing cell
    elapsed = time.perf_counter() - start
    assert notebook.cells[-1].outputs[0]["text"].strip() == sys.prefix
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    texts = "".join(o.get("text", "") for o in outputs)
    assert "equivalent: True" in texts and "bitwise equal logits: True" in texts
    assert "blocks.0.mlp.fc1" in texts  # the summary table and the plan
    errors = [float(e) for e in re.findall(r"median relative error of fast vs exact (\S+)", texts)]
    assert len(errors) == 2 and max(errors) <= 1e-3
    assert re.search(r"^48 neurons, [\d,]+ new parameters$", texts, re.M)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, "the figure-2 plot is displayed"
    assert elapsed < 60, f"the notebook took {elapsed:.0f} s"
    assert list(tmp_path.iterdir()) == []
