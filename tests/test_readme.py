"""The README's code is a promise: its Python example runs, and its first lines give the two commands."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    text = README.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has no Python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})


def test_readme_opens_with_the_two_commands():
    head = "\n".join(README.read_text(encoding="utf-8").splitlines()[:15])
    assert "python -m fastadvseg.train" in head
    assert "python -m pytest" in head
