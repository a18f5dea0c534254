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


def _commands(text):
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_ci_runs_the_readme_commands():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    setup, test = _commands(first_block)
    ci = _commands((README.parent / ".ci" / "run").read_text(encoding="utf-8"))
    assert ci[-1] == test, "CI's last command must be the README's test command"
    for step in setup.split(" && ")[:2]:  # the install steps, as CI runs them (quietly, through python -m pip)
        assert any(line.replace("python -m pip install -q", "pip install") == step for line in ci), step


def test_benchmarks_readme_opens_with_the_commands_and_numbers():
    head = "\n".join((README.parent / "benchmarks" / "README.md").read_text(encoding="utf-8").splitlines()[:40])
    assert "python -m benchmarks.report" in head and "x eager" in head
