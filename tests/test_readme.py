import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_quickstart_runs(capsys):
    blocks = _python_blocks(README.read_text())
    assert blocks, "README has no python quickstart"
    exec(compile(blocks[0], "README.md quickstart", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out.split()
    base, grown = int(printed[0]), int(printed[2])
    assert grown > base


def test_readme_names_the_two_setup_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
