"""Test session setup.

Without a GPU, TRITON_INTERPRET=1 is set before any Triton kernel is defined, so the ``triton`` backend runs the
very kernels that run on GPUs, interpreted on CPU tensors (slowly: keep shapes small).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import BACKEND_CASES  # noqa: E402


def pytest_report_header(config):
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return [f"fastadvseg backends under test: {BACKEND_CASES} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')})",
            f"torch {torch.__version__} (CUDA {torch.version.cuda}), Triton {triton_version}: the compile check "
            "(tests/test_kernel_resources.py) compiles with this Triton"]


@pytest.fixture
def gen():
    """A seeded generator per test: fresh random inputs for each test, reproducible failures."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def emulated_ext(tmp_path_factory):
    """The host emulation of the CUDA kernels (tests/cuda_emulation), compiled once per session; skips where g++
    or the CUDA headers are missing."""
    from cuda_emulation.emulated_ext import EmulatedExt, build_harness
    try:
        return EmulatedExt(build_harness(tmp_path_factory.mktemp("cuda_emulation")))
    except FileNotFoundError as exc:
        pytest.skip(f"cuda emulation: {exc}")
