"""setup.py finds the real CUDA toolkit behind the nvcc on PATH when CUDA_HOME is not set.

torch guesses CUDA_HOME as the parent of the folder of the nvcc on PATH; behind a wrapper script (the GPU image's
/usr/local/bin/nvcc is ``exec /usr/local/cuda-13.0/bin/nvcc "$@"``) or a symlink that parent has no CUDA headers,
and the build of the cuda backend failed on ``cuda_runtime_api.h`` with only a warning. setup.py's own functions are
taken from its source (importing it would run setup()) and run against stand-in toolkits here.
"""
import ast
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("_is_toolkit", "_toolkit_of_nvcc", "_resolve_cuda_home")


@pytest.fixture(scope="module")
def setup_fns():
    tree = ast.parse((ROOT / "setup.py").read_text())
    module = ast.Module(body=[n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in NAMES],
                        type_ignores=[])
    namespace = {"os": os, "re": re, "shutil": shutil, "sys": sys}
    exec(compile(module, "setup.py", "exec"), namespace)
    assert all(name in namespace for name in NAMES)
    return namespace


def _toolkit(root: Path) -> Path:
    """A stand-in toolkit: include/cuda_runtime_api.h, and a bin/nvcc that answers --dryrun as nvcc does."""
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime_api.h").write_text("")
    (root / "bin").mkdir()
    nvcc = root / "bin" / "nvcc"
    here = '$(cd "$(dirname "$0")" && pwd)'
    nvcc.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = --dryrun ] && {{ echo "#$ _HERE_={here}"; '
                    f'echo "#$ TOP={here}/.."; exit 0; }}; done\necho nvcc\n')
    nvcc.chmod(0o755)
    return root


def test_a_wrapper_script_leads_to_its_toolkit(setup_fns, tmp_path):
    toolkit = _toolkit(tmp_path / "cuda-13.0")
    wrapper = tmp_path / "local" / "bin" / "nvcc"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    assert not setup_fns["_is_toolkit"](str(tmp_path / "local"))  # torch's guess: no headers there
    assert setup_fns["_toolkit_of_nvcc"](str(wrapper)) == os.path.realpath(toolkit)


def test_a_symlink_leads_to_its_toolkit_and_a_lone_nvcc_to_none(setup_fns, tmp_path):
    toolkit = _toolkit(tmp_path / "cuda")
    link = tmp_path / "bin" / "nvcc"
    link.parent.mkdir()
    link.symlink_to(toolkit / "bin" / "nvcc")
    assert setup_fns["_toolkit_of_nvcc"](str(link)) == os.path.realpath(toolkit)
    lone = tmp_path / "lone" / "nvcc"
    lone.parent.mkdir()
    lone.write_text("#!/bin/sh\necho nvcc\n")
    lone.chmod(0o755)
    assert setup_fns["_toolkit_of_nvcc"](str(lone)) is None
    assert setup_fns["_toolkit_of_nvcc"](str(tmp_path / "missing" / "nvcc")) is None


def test_cuda_home_is_set_only_when_the_user_did_not(setup_fns, tmp_path, monkeypatch):
    toolkit = _toolkit(tmp_path / "cuda-13.0")
    wrapper_dir = tmp_path / "wrap"
    wrapper_dir.mkdir()
    (wrapper_dir / "nvcc").write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    (wrapper_dir / "nvcc").chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("CUDA_HOME", "/somewhere/else")
    assert setup_fns["_resolve_cuda_home"]() is False and os.environ["CUDA_HOME"] == "/somewhere/else"
    monkeypatch.delenv("CUDA_HOME")
    assert setup_fns["_resolve_cuda_home"]() is True
    assert os.environ["CUDA_HOME"] == os.path.realpath(toolkit)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_the_nvcc_on_path_leads_to_a_toolkit(setup_fns):
    """This machine's nvcc (a wrapper script in /usr/local/bin on the GPU image and here)."""
    home = setup_fns["_toolkit_of_nvcc"]("nvcc")
    assert home is not None and setup_fns["_is_toolkit"](home), home
