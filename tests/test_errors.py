"""Bad input gets a clear error that names the problem, before any result is returned: from the
public checks, or (labels outside [0, C) on the cpu backend) from the pass the backend makes over the labels."""
import pytest
import torch

import fastadvseg as fas


@pytest.fixture
def x():
    return torch.randn(2, 4, 3, 5)


@pytest.fixture
def t():
    return torch.randint(0, 4, (2, 3, 5))


@pytest.fixture
def d():
    return torch.randn(2, 1, 3, 5)


def test_wrong_dimensionality_names_the_shape(x, t):
    with pytest.raises(ValueError, match=r"4-D.*\(4, 3, 5\)"):
        fas.cross_entropy2d(x[0], t)
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\) or \(N, H, W\)"):
        fas.bce_with_logits2d(torch.randn(5), 1.0)


def test_shape_mismatch_names_both_shapes(x, t, d):
    with pytest.raises(ValueError, match=r"\(2, 3, 5\).*\(2, 3, 4\)"):
        fas.cross_entropy2d(x, t[:, :, :4])
    with pytest.raises(ValueError, match=r"\(2, 1, 3, 4\).*\(2, 4, 3, 5\)"):
        fas.generator_loss(x, d[..., :4], t, lambda_adv=0.01)
    with pytest.raises(ValueError, match=r"channel dim is not 1"):
        fas.semi_cross_entropy2d(x, torch.randn(2, 2, 3, 5))
    with pytest.raises(ValueError, match=r"ignore_mask.*\(2, 3, 4\)"):
        fas.bce_with_logits2d(d, 1.0, ignore_mask=torch.zeros(2, 3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"target.*\(3, 3, 5\)"):
        fas.bce_with_logits2d(d, torch.rand(3, 3, 5))
    with pytest.raises(ValueError, match=r"weight.*\(4,\).*\(3,\)"):
        fas.cross_entropy2d(x, t, weight=torch.ones(3))


def test_device_mismatch_names_both_devices(x, t):
    with pytest.raises(ValueError, match=r"cpu.*meta"):
        fas.cross_entropy2d(x, t.to("meta"))


def test_non_floating_logits_and_integer_maps_are_type_errors(x, t, d):
    with pytest.raises(TypeError, match="int64"):
        fas.cross_entropy2d(t.unsqueeze(1).expand(2, 4, 3, 5), t)
    with pytest.raises(TypeError, match="integer class indices"):
        fas.cross_entropy2d(x, t.float())
    with pytest.raises(TypeError, match="d_logits.*floating"):
        fas.bce_with_logits2d(d.long(), 1.0)
    with pytest.raises(TypeError, match="target.*floating"):
        fas.bce_with_logits2d(d, torch.ones(2, 1, 3, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="ignore_mask.*bool"):
        fas.bce_with_logits2d(d, 1.0, ignore_mask=torch.zeros(2, 3, 5))
    with pytest.raises(TypeError, match="torch.Tensor"):
        fas.softmax2d([[1.0]])
    with pytest.raises(TypeError, match="lambda_adv"):
        fas.generator_loss(x, d, t, lambda_adv="0.01")


@pytest.mark.parametrize("bad", [4, -1, 1000])
def test_label_out_of_range_names_the_value(x, t, d, bad):
    t = t.clone()
    t[1, 2, 3] = bad
    with pytest.raises(ValueError, match=rf"label {bad}\b.*\[0, 4\)"):
        fas.cross_entropy2d(x, t)
    with pytest.raises(ValueError, match=rf"label {bad}\b"):
        fas.generator_loss(x, d, t, lambda_adv=0.01)
    with pytest.raises(ValueError, match=rf"label {bad}\b"):
        fas.one_hot2d(t, 4)
    with fas.label_validation(False):
        assert torch.isfinite(fas.cross_entropy2d(x, t))
    assert fas.label_validation_enabled()


def test_ignore_index_is_not_out_of_range(x, t):
    t = t.clone()
    t[0, 0, 0] = -100
    assert torch.isfinite(fas.cross_entropy2d(x, t, ignore_index=-100))


def test_bad_options(x, t, d):
    with pytest.raises(ValueError, match="reduction"):
        fas.cross_entropy2d(x, t, reduction="avg")
    with pytest.raises(ValueError, match="threshold"):
        fas.semi_cross_entropy2d(x, d, threshold=1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fas.bce_with_logits2d(d, 2.0)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        fas.cross_entropy2d(x, t, backend="fast")
    with pytest.raises(ValueError, match="num_classes"):
        fas.one_hot2d(t, 0)


@pytest.mark.parametrize("backend", fas.available_backends("cpu"))
def test_ignore_index_and_lambdas_are_checked_on_every_backend(x, t, d, backend):
    for bad in (255.5, 255.0, "255", None, True):
        for call in (lambda: fas.cross_entropy2d(x, t, ignore_index=bad, backend=backend),
                     lambda: fas.one_hot2d(t, 3, ignore_index=bad, backend=backend),
                     lambda: fas.generator_loss(x, d, t, lambda_adv=0.01, ignore_index=bad, backend=backend)):
            with pytest.raises(TypeError, match="ignore_index must be an int"):
                call()
    import numpy as np
    assert torch.equal(fas.cross_entropy2d(x, t, ignore_index=np.int64(255), backend=backend),
                       fas.cross_entropy2d(x, t, backend=backend))
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="lambda_adv must be a finite number"):
            fas.generator_loss(x, d, t, lambda_adv=bad, backend=backend)
        with pytest.raises(ValueError, match="lambda_semi must be a finite number"):
            fas.generator_loss(x, d, None, lambda_adv=0.01, lambda_semi=bad, backend=backend)


def test_unavailable_backend_says_why(x, t):
    if "cuda" in fas.available_backends():
        pytest.skip("the cuda backend is available here")
    with pytest.raises((RuntimeError, ValueError), match="cuda"):
        fas.cross_entropy2d(x, t, backend="cuda")


def test_env_backend_override(monkeypatch, x, t):
    monkeypatch.setenv("FASTADVSEG_BACKEND", "reference")
    assert torch.isfinite(fas.cross_entropy2d(x, t))
    monkeypatch.setenv("FASTADVSEG_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="nonsense"):
        fas.cross_entropy2d(x, t)


# ---- the registered ops called directly: each checks what its kernels read, on every backend ---------------------
def _direct_calls(x, t, d):
    """(what, call of torch.ops.fastadvseg.* with one wrong argument, error type, message pattern)."""
    ops = torch.ops.fastadvseg
    z = d[:, 0]
    p = torch.softmax(x, 1)
    yield ("int32 target", lambda b: ops.cross_entropy2d(x, t.int(), None, 255, 0.0, "sum", False, False, b),
           TypeError, r"target must be int64.*int32")
    yield ("uint8 target", lambda b: ops.generator_loss(x, z, t.to(torch.uint8), 0.1, 0.1, 0.2, 255, False, False,
                                                         False, b), TypeError, r"target must be int64.*uint8")
    yield ("target shape", lambda b: ops.cross_entropy2d(x, t[:, :2], None, 255, 0.0, "sum", False, False, b),
           ValueError, r"target \(2, 2, 5\).*\(2, 3, 5\)")
    yield ("weight length", lambda b: ops.cross_entropy2d(x, t, torch.ones(3), 255, 0.0, "sum", False, False, b),
           ValueError, r"weight must have shape \(C,\) = \(4,\), got \(3,\)")
    yield ("integer weight", lambda b: ops.cross_entropy2d(x, t, torch.ones(4, dtype=torch.int64), 255, 0.0, "sum",
                                                            False, False, b), TypeError, r"weight must be a floating")
    yield ("softmax gradient shape", lambda b: ops.softmax2d_backward(p, p[:, :, :2], b), ValueError,
           r"grad_probs \(2, 4, 2, 5\) does not match probs \(2, 4, 3, 5\)")
    yield ("d map shape", lambda b: ops.semi_cross_entropy2d(x, z[:, :, :4], 0.2, None, "sum", False, b),
           ValueError, r"d_logits \(2, 3, 4\) does not match")
    yield ("integer d map", lambda b: ops.semi_cross_entropy2d(x, z.long(), 0.2, None, "sum", False, b),
           TypeError, r"d_logits must be a floating")
    yield ("4-D d map", lambda b: ops.bce_with_logits2d(d, None, 1.0, None, "sum", False, b),
           ValueError, r"d_logits must be \(N, H, W\)")
    yield ("target map shape", lambda b: ops.bce_with_logits2d(z, z[:1], 1.0, None, "sum", False, b),
           ValueError, r"target_map \(1, 3, 5\) does not match d_logits")
    yield ("uint8 mask", lambda b: ops.bce_with_logits2d(z, None, 1.0, torch.zeros(2, 3, 5, dtype=torch.uint8),
                                                          "sum", False, b), TypeError, r"ignore_mask must be a bool")
    yield ("mask shape", lambda b: ops.discriminator_loss(z, z, None, torch.zeros(2, 3, 4, dtype=torch.bool),
                                                          False, False, b), ValueError, r"ignore_mask_real \(2, 3, 4\)")
    yield ("int32 one-hot target", lambda b: ops.one_hot2d(t.int(), 4, 255, torch.float32, False, b), TypeError,
           r"target must be int64")
    yield ("3-D logits", lambda b: ops.softmax2d(x[0], b), ValueError, r"logits must be 4-D")


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_registered_ops_reject_what_their_kernels_would_misread(x, t, d, backend):
    if backend not in fas.available_backends("cpu"):
        pytest.skip(f"{backend}: {fas.unavailable_reason(backend)}")
    for what, call, error, pattern in _direct_calls(x, t, d):
        with fas.label_validation(False), pytest.raises(error, match=pattern):
            call(backend)
            pytest.fail(f"{backend}: {what} was accepted")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_registered_ops_reject_dtypes_their_backend_does_not_run(x, t, backend):
    if backend not in fas.available_backends("cpu"):
        pytest.skip(f"{backend}: {fas.unavailable_reason(backend)}")
    with pytest.raises(TypeError, match=rf"logits must be float32, float16, bfloat16 for backend '{backend}', got "
                                        r"torch.float64"):
        torch.ops.fastadvseg.cross_entropy2d(x.double(), t, None, 255, 0.0, "sum", False, False, backend)


def test_pseudo_label_bad_input_names_the_argument_and_shapes(x, d):
    pl = fas.pseudo_label_cross_entropy2d
    with pytest.raises(ValueError, match=r"teacher_logits \(2, 3, 3, 5\) does not match logits \(2, 4, 3, 5\)"):
        pl(x, x[:, :3])
    with pytest.raises(ValueError, match=r"teacher_logits \(1, 4, 3, 5\) does not match logits \(2, 4, 3, 5\)"):
        pl(x, x[:1], size=(6, 10))
    with pytest.raises(ValueError, match=r"teacher_logits \(2, 4, 3, 4\).*\(H, W\) = \(3, 5\).*size="):
        pl(x, x[..., :4])
    with pytest.raises(TypeError, match=r"teacher_logits must be float"):
        pl(x, x.long())
    with pytest.raises(ValueError, match=r"teacher_logits must be 4-D"):
        pl(x, x[0])
    for bad in (1.5, -0.1, "high", True):
        with pytest.raises(ValueError, match=r"confidence_threshold must be a number in \[0, 1\] or None"):
            pl(x, confidence_threshold=bad)
    with pytest.raises(ValueError, match=r"d_threshold must be a number in \[0, 1\]"):
        pl(x, d_logits=d, d_threshold=2.0)
    with pytest.raises(ValueError, match=r"d_logits \(2, 1, 3, 4\) does not match logits \(2, 4, 3, 5\)"):
        pl(x, d_logits=d[..., :4])
    with pytest.raises(ValueError, match=r"channel dim is not 1"):
        pl(x, d_logits=torch.randn(2, 2, 3, 5))
    with pytest.raises(ValueError, match=r"ignore_mask \(2, 3, 4\) does not match"):
        pl(x, ignore_mask=torch.zeros(2, 3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"ignore_mask \(2, 3, 5\) must be at size \(6, 10\)"):
        pl(x, ignore_mask=torch.zeros(2, 3, 5, dtype=torch.bool), size=(6, 10))
    with pytest.raises(ValueError, match="reduction"):
        pl(x, reduction="avg")


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_registered_pseudo_label_op_rejects_what_its_kernels_would_misread(x, d, backend):
    if backend not in fas.available_backends("cpu"):
        pytest.skip(f"{backend} does not run on CPU here")
    op, z = torch.ops.fastadvseg.pseudo_label_cross_entropy2d, d[:, 0]
    mask = torch.zeros(2, 3, 5, dtype=torch.bool)
    calls = [
        (lambda: op(x, x.double(), None, 0.5, 0.2, None, "sum", False, backend), TypeError,
         r"teacher_logits must have the logits' dtype torch.float32"),
        (lambda: op(x, x[:, :3], None, 0.5, 0.2, None, "sum", False, backend), ValueError,
         r"teacher_logits \(2, 3, 3, 5\) does not match logits \(2, 4, 3, 5\)"),
        (lambda: op(x, x[..., :4], None, 0.5, 0.2, None, "sum", False, backend), ValueError,
         r"teacher_logits \(2, 4, 3, 4\) does not match"),
        (lambda: op(x, None, z[..., :4], 0.5, 0.2, None, "sum", False, backend), ValueError,
         r"d_logits \(2, 3, 4\) does not match"),
        (lambda: op(x, None, z.long(), 0.5, 0.2, None, "sum", False, backend), TypeError,
         r"d_logits must be a floating"),
        (lambda: op(x, None, None, 0.5, 0.2, mask[..., :4], "sum", False, backend), ValueError,
         r"ignore_mask \(2, 3, 4\) does not match"),
        (lambda: op(x, None, None, 0.5, 0.2, mask.int(), "sum", False, backend), TypeError,
         r"ignore_mask must be a bool"),
        (lambda: op(x, x[..., :0], None, 0.5, 0.2, None, "sum", False, backend, [6, 10]), ValueError,
         r"cannot upsample teacher_logits"),
    ]
    for call, error, pattern in calls:
        with pytest.raises(error, match=pattern):
            call()
