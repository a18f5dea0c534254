"""``pytest benchmarks/ --benchmark-only [--report-args="--shapes voc --ops generator_loss"]``: the per-op cases of
``python -m benchmarks.report`` under pytest-benchmark, chosen with the report's own flags. It runs only when
``benchmarks/`` (or a file in it) is named on the command line, so no wider pytest run spends minutes timing."""
from __future__ import annotations

import os
import shlex
from pathlib import Path

HERE = Path(__file__).resolve().parent


def pytest_addoption(parser):
    parser.addoption("--report-args", default="", help="flags of python -m benchmarks.report that choose the cases: "
                     "--shapes, --device, --ops, --dtypes, --backends, --no-compile, --include-triton-cpu, --threads")


def pytest_configure(config):
    if "--include-triton-cpu" in shlex.split(config.getoption("--report-args", default="")):
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton


def pytest_ignore_collect(collection_path, config):
    named = [Path(str(a).split("::")[0]).resolve() for a in config.args]
    return None if any(p == HERE or HERE in p.parents for p in named) else True
