"""The backend table: what is listed runs, auto picks and falls back with one warning, overrides work."""
import warnings

import pytest
import torch

import fastadvseg as fas
from fastadvseg.backends import reference
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


def _compiled_targets(fn, *args):
    """(result, the call targets of the one graph torch.compile(fullgraph=True) traced from fn)."""
    targets = []

    def capture(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    torch._dynamo.reset()
    try:
        return torch.compile(fn, backend=capture, fullgraph=True)(*args), targets
    finally:
        torch._dynamo.reset()


@pytest.mark.skipif("cpu" not in fas.available_backends("cpu"), reason="cpu backend not built")
@pytest.mark.parametrize("size", [None, (7, 9)])
def test_compiled_functions_keep_the_kernel_ops(fresh_dispatch, size):
    """Under torch.compile, auto picks the same kernels as in eager code: softmax2d and the losses are one kernel op
    each in the graph, never their traced torch formulas. (Traced, an upsampled softmax2d made the compiler build
    the full-resolution logits and scatter their gradient back: a compiled G step took 1.3x the eager one.)"""
    x = torch.randn(2, 5, 3, 4, requires_grad=True)
    t = torch.randint(0, 5, (2,) + (size or (3, 4)))

    def step(x, t):
        p = fas.softmax2d(x, size=size, align_corners=True)
        return p, fas.cross_entropy2d(x, t, size=size, align_corners=True)

    (p, loss), targets = _compiled_targets(step, x, t)
    assert any("fastadvseg.cross_entropy2d" in s for s in targets), targets
    assert any("fastadvseg.softmax2d" in s for s in targets), targets
    assert not any(("softmax" in s or "interpolate" in s or "upsample" in s) and "fastadvseg" not in s
                   for s in targets), targets
    want = torch.softmax(reference.upsample(x, size, True), 1)
    torch.testing.assert_close(p, want)
    up = torch.randn_like(p)
    torch.testing.assert_close(torch.autograd.grad((p * up).sum(), x)[0],
                               torch.autograd.grad((want * up).sum(), x)[0])
