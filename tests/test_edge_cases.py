"""Edge cases of the API contract on every backend: empty sets give 0 with zero gradient, NaN/Inf behave as PyTorch,
empty batches give 0, out-of-range labels with validation off are ignored (never read out of bounds)."""
import pytest
import torch
import torch.nn.functional as F

import fastadvseg as fas
import oracle
from helpers import BACKEND_CASES, assert_close, ids, make_d_logits, make_logits, make_target

pytestmark = pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)


def _finite_zero(loss):
    loss = loss.detach()
    assert torch.isfinite(loss).all() and float(loss.abs().sum()) == 0.0, f"expected 0, got {loss}"


def _zero_grad(g):
    """A gradient that exists and is all zero: an empty mean still differentiates (to 0), it is not dropped from
    the graph (a dropped gradient would leave a user's .grad None and an optimizer skipping the parameter)."""
    assert g is not None, "expected an all-zero gradient, got None (the input was dropped from the graph)"
    assert torch.isfinite(g).all() and not g.any(), "expected an all-zero gradient"


def test_all_ignored_cross_entropy(case, gen):
    backend, device = case
    x = make_logits((2, 5, 3, 4), torch.float32, "contiguous", device, generator=gen)
    t = torch.full((2, 3, 4), 255, device=device)
    for reduction in ("mean", "sum", "none"):
        loss = fas.cross_entropy2d(x, t, reduction=reduction, backend=backend)
        _finite_zero(loss)
        (g,) = torch.autograd.grad(loss.sum(), [x], allow_unused=True)
        _zero_grad(g)
    w = torch.rand(5, device=device)
    _finite_zero(fas.cross_entropy2d(x, t, weight=w, backend=backend))


def test_all_ignored_bce_and_discriminator(case, gen):
    backend, device = case
    d = make_d_logits((2, 3, 4), torch.float32, device, generator=gen)
    mask = torch.ones((2, 3, 4), dtype=torch.bool, device=device)
    loss = fas.bce_with_logits2d(d, 1.0, ignore_mask=mask, backend=backend)
    _finite_zero(loss)
    (g,) = torch.autograd.grad(loss, [d], allow_unused=True)
    _zero_grad(g)
    real = make_d_logits((1, 2, 2), torch.float32, device, generator=gen)
    loss = fas.discriminator_loss(d, real, ignore_mask_fake=mask, backend=backend)
    assert_close(loss, oracle.bce(real.detach().cpu(), 1.0), torch.float32, "D loss with fake all ignored")


def test_no_pixel_over_threshold(case, gen):
    backend, device = case
    x = make_logits((2, 7, 3, 5), torch.float32, "contiguous", device, generator=gen)
    d = torch.full((2, 1, 3, 5), -10.0, device=device)  # sigmoid(-10) << 0.2
    loss, ratio = fas.semi_cross_entropy2d(x, d, threshold=0.2, return_ratio=True, backend=backend)
    _finite_zero(loss)
    _finite_zero(ratio)
    (g,) = torch.autograd.grad(loss, [x], allow_unused=True)
    _zero_grad(g)
    out = fas.generator_loss(x, d.requires_grad_(), None, lambda_adv=0.01, lambda_semi=0.1, backend=backend)
    _finite_zero(out.semi)
    _finite_zero(out.semi_ratio)
    assert torch.isfinite(out.total)


def test_generator_loss_all_ignored_labelled(case, gen):
    backend, device = case
    x = make_logits((1, 4, 2, 3), torch.float32, "contiguous", device, generator=gen)
    d = make_d_logits((1, 2, 3), torch.float32, device, generator=gen)
    t = torch.full((1, 2, 3), 255, device=device)
    out = fas.generator_loss(x, d, t, lambda_adv=0.01, backend=backend)
    for f in out:
        _finite_zero(f)
    gx, gd = torch.autograd.grad(out.total, [x, d], allow_unused=True)
    _zero_grad(gx)
    _zero_grad(gd)


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4), (2, 3, 4, 0)], ids=str)
def test_empty_batches(case, shape):
    backend, device = case
    n, c, h, w = shape
    x = torch.randn(shape, device=device, requires_grad=True)
    t = torch.zeros((n, h, w), dtype=torch.long, device=device)
    d = torch.randn((n, 1, h, w), device=device, requires_grad=True)
    results = [
        fas.cross_entropy2d(x, t, backend=backend),
        fas.bce_with_logits2d(d, 1.0, backend=backend),
        fas.semi_cross_entropy2d(x, d, backend=backend),
        fas.discriminator_loss(d, d, backend=backend),
        *fas.generator_loss(x, d, t, lambda_adv=0.01, backend=backend),
        *fas.generator_loss(x, d, None, lambda_adv=0.01, backend=backend),
    ]
    for r in results:
        _finite_zero(r)
    total = fas.generator_loss(x, d, None, lambda_adv=0.01, backend=backend).total
    total.backward()
    assert fas.softmax2d(x, backend=backend).shape == shape
    assert fas.one_hot2d(t, c, backend=backend).shape == shape
    assert fas.cross_entropy2d(x, t, reduction="none", backend=backend).shape == (n, h, w)


def test_nan_and_inf_propagate_like_pytorch(case, gen):
    backend, device = case
    x = make_logits((1, 5, 2, 4), torch.float32, "contiguous", device, generator=gen).detach()
    t = make_target((1, 5, 2, 4), device, ignore_frac=0.0, generator=gen)
    t[0, 1, 3] = 255
    for bad in (float("nan"), float("inf"), float("-inf")):
        for pixel in ((0, 0), (1, 3)):  # a counted pixel, then an ignored one
            xb = x.clone()
            xb[0, 2, pixel[0], pixel[1]] = bad
            ours = fas.cross_entropy2d(xb, t, reduction="none", backend=backend)
            ref = F.cross_entropy(xb.cpu(), t.cpu(), ignore_index=255, reduction="none")
            assert torch.equal(torch.isnan(ours.cpu()), torch.isnan(ref)), (bad, pixel, ours, ref)
            mean = fas.cross_entropy2d(xb, t, backend=backend)
            ref_mean = F.cross_entropy(xb.cpu(), t.cpu(), ignore_index=255)
            assert torch.isnan(mean).item() == torch.isnan(ref_mean).item(), (bad, pixel)
    for bad, target in ((float("nan"), 1.0), (float("inf"), 0.0), (float("inf"), 1.0), (float("-inf"), 1.0)):
        d = torch.zeros((1, 1, 2, 2), device=device)
        d[0, 0, 0, 0] = bad
        ours = fas.bce_with_logits2d(d, target, backend=backend)
        ref = F.binary_cross_entropy_with_logits(d.cpu(), torch.full_like(d.cpu(), target))
        assert torch.isnan(ours).item() == torch.isnan(ref).item() and torch.isinf(ours).item() == torch.isinf(ref).item(), (bad, target, ours, ref)
        if torch.isfinite(ref):
            assert_close(ours, ref.double(), torch.float32, "bce with inf")


def test_nan_logit_in_kept_pixel_propagates_to_semi(case, gen):
    backend, device = case
    x = make_logits((1, 4, 2, 3), torch.float32, "contiguous", device, generator=gen).detach()
    d = torch.full((1, 2, 3), 5.0, device=device)  # every pixel kept
    x[0, 1, 0, 0] = float("nan")
    assert torch.isnan(fas.semi_cross_entropy2d(x, d, backend=backend))
    d[0, 0, 0] = -5.0  # that pixel dropped: the loss is finite again
    assert torch.isfinite(fas.semi_cross_entropy2d(x, d, backend=backend))


def test_out_of_range_labels_without_validation_are_ignored(case, gen):
    backend, device = case
    shape = (2, 6, 3, 5)
    x = make_logits(shape, torch.float32, "contiguous", device, generator=gen)
    t = make_target(shape, device, generator=gen)
    bad = t.clone()
    bad[0, 0, 0], bad[0, 1, 1], bad[1, 2, 4], bad[1, 0, 1] = 6, -3, 10_000, -10_000
    clean = bad.clone()
    clean[(bad < 0) | (bad >= 6)] = 255
    w = torch.rand(6, device=device) + 0.5
    with fas.label_validation(False):
        ours = fas.cross_entropy2d(x, bad, weight=w, reduction="none", backend=backend)
        d = make_d_logits((2, 3, 5), torch.float32, device, generator=gen)
        g_ours = fas.generator_loss(x, d, bad, lambda_adv=0.1, backend=backend)
        oh = fas.one_hot2d(bad, 6, backend=backend)
    assert_close(ours, oracle.cross_entropy2d(x.detach().cpu(), clean.cpu(), w.cpu(), reduction="none"),
                 torch.float32, "ce with out-of-range labels ignored")
    g_ref = oracle.generator_loss(x.detach().cpu(), d.detach().cpu(), clean.cpu(), 0.1, 0.1)
    assert_close(g_ours.total, g_ref[0], torch.float32, "generator with out-of-range labels ignored")
    assert torch.equal(oh.cpu().double(), oracle.one_hot2d(clean.cpu(), 6))


def test_threshold_is_strict(case, gen):
    """sigmoid(d) > T keeps a pixel, decided exactly: sigmoid(0) == 0.5 is not kept at T = 0.5, sigmoid(-inf) == 0
    is not kept at T = 0, but sigmoid(-200) > 0 is (although it underflows to 0 in float32)."""
    backend, device = case
    x = make_logits((1, 3, 2, 2), torch.float32, "contiguous", device, generator=gen)
    for value, threshold, ratio_kept in ((0.0, 0.5, 0.25), (float("-inf"), 0.0, 0.25), (-200.0, 0.0, 1.0)):
        d = torch.full((1, 2, 2), value, device=device)
        d[0, 0, 0] = 3.0  # one kept pixel
        loss, ratio = fas.semi_cross_entropy2d(x, d, threshold=threshold, return_ratio=True, backend=backend)
        assert float(ratio) == ratio_kept, (value, threshold, ratio)
        if ratio_kept == 0.25:
            assert_close(loss, oracle.cross_entropy2d(x.detach().cpu()[..., :1, :1],
                                                      x.detach().cpu()[..., :1, :1].argmax(1)), torch.float32, "strict")
