"""The backend table: what is listed runs, auto picks and falls back with one warning, overrides work."""
import warnings

import pytest
import torch

import fastadvseg as fas
from fastadvseg import _dispatch


@pytest.fixture
def fresh_dispatch():
    _dispatch._reset_for_tests()
    yield _dispatch
    _dispatch._reset_for_tests()


def test_available_backends_are_known_and_run():
    names = fas.available_backends()
    assert "reference" in names and names[-1] == "reference"
    assert set(names) <= set(fas.BACKEND_NAMES)
    x, t = torch.randn(1, 3, 2, 2), torch.tensor([[[0, 1], [2, 255]]])
    for name in fas.available_backends("cpu"):
        assert torch.isfinite(fas.cross_entropy2d(x, t, backend=name)), name


def test_auto_prefers_the_table_order_on_cpu():
    name = _dispatch.resolve("cross_entropy2d", "auto", torch.device("cpu"), torch.float32)
    expected = "cpu" if "cpu" in fas.available_backends("cpu") else "reference"
    assert name == expected


def test_float64_goes_to_reference():
    name = _dispatch.resolve("cross_entropy2d", "auto", torch.device("cpu"), torch.float64)
    assert name == "reference"


def test_fallback_warns_once_with_the_reason(fresh_dispatch, monkeypatch):
    monkeypatch.setitem(fresh_dispatch._unavailable, "cpu", "forced off by the test")
    x, t = torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.warns(RuntimeWarning, match="forced off by the test"):
        fas.cross_entropy2d(x, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fas.softmax2d(x)  # same device and dtype: no second warning
    assert fas.unavailable_reason("cpu") == "forced off by the test"
    assert "cpu" not in fas.available_backends()


def test_unavailable_reason_is_none_for_reference():
    assert fas.unavailable_reason("reference") is None


def test_backend_must_be_a_string():
    with pytest.raises(TypeError, match="backend"):
        fas.softmax2d(torch.randn(1, 2, 1, 1), backend=None)


def test_triton_on_cpu_without_interpreter_is_refused(fresh_dispatch, monkeypatch):
    if "triton" not in fas.available_backends("cpu"):
        pytest.skip("triton backend not usable on CPU here")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        fas.softmax2d(torch.randn(1, 2, 1, 1), backend="triton")
