import re
from pathlib import Path

import fxgrow
from helpers import growth_params, paper_selection, vit_flops, vit_params, vit_shape

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_quickstart_runs_and_prints_the_closed_form_counts(capsys):
    blocks = _python_blocks(README.read_text())
    assert blocks, "README has no python quickstart"
    namespace = {"__name__": "readme"}
    exec(compile(blocks[0], "README.md quickstart", "exec"), namespace)
    printed = capsys.readouterr().out.split()
    assert printed[1] == "->"
    base_params, grown_params, grown_flops = int(printed[0]), int(printed[2]), int(printed[3])

    # tiny_vit: 32x32 images, patch 4, width 64, 4 blocks of 4 heads, MLP 256, 10 classes;
    # the base halves the head dim (16 -> 8) and the MLP (256 -> 128).
    shape = vit_shape(dim=64, depth=4, heads=4, head_dim=8, hidden=128, classes=10, patch=4,
                      img=32)
    assert base_params == vit_params(**shape)

    base, plan, report = namespace["base"], namespace["plan"], namespace["report"]
    expected_plan = paper_selection(report.eigenvalues, budget=48, layer_threshold=4)
    assert {t: list(plan[t]) for t in plan} == expected_plan
    assert 0 < sum(len(v) for v in expected_plan.values()) <= 48
    assert grown_params == base_params + growth_params(base, expected_plan)
    sites = fxgrow.linear_sites(base)
    tokens = shape["tokens"]  # the FLOPs are counted on one image
    new_flops = sum(2 * len(v) * sites[t][0].in_features * tokens for t, v in expected_plan.items())
    assert grown_flops == vit_flops(**shape) + new_flops


def test_readme_names_the_two_setup_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
