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
