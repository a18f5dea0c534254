"""pytest-benchmark suite options: ``pytest benchmarks/ --benchmark-only [--shapes small|voc|cityscapes|ade|full]``.

The suite runs only when ``benchmarks/`` (or a file in it) is named on the command line, so a plain ``pytest`` at the
repository root does not spend minutes timing kernels.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_addoption(parser):
    group = parser.getgroup("fastadvseg benchmarks")
    group.addoption("--shapes", default=None, choices=("smoke", "small", "voc", "cityscapes", "ade", "full"),
                    help="benchmark shape set (default: small on CPU, full on CUDA)")
    group.addoption("--bench-device", default=None, choices=("cpu", "cuda"),
                    help="device to benchmark (default: cuda if available)")
    group.addoption("--bench-dtypes", default=None,
                    help="comma-separated dtypes (default: float32,bfloat16, + float16 on cuda)")
    group.addoption("--bench-ops", default=None, help="comma-separated op rows or API names (default: all)")
    group.addoption("--no-compile", action="store_true", default=False, help="skip the torch.compile baseline")
    group.addoption("--include-triton-cpu", action="store_true", default=False,
                    help="on CPU, time the Triton backend under TRITON_INTERPRET=1 (tiny shapes only)")
    group.addoption("--bench-threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")


def pytest_configure(config):
    if config.getoption("--include-triton-cpu", default=False):
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton


def _requested(config) -> bool:
    for arg in config.args:
        path = Path(str(arg).split("::")[0]).resolve()
        if path == HERE or HERE in path.parents:
            return True
    return False


def pytest_collection_modifyitems(config, items):
    if _requested(config):
        return
    skip = pytest.mark.skip(reason="benchmarks run only as `pytest benchmarks/ --benchmark-only`")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)
