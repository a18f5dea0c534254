"""Every op, every backend available here, against the float64 oracle: values and gradients.

Odd shapes (N=1, C not a power of two, H*W prime), float32/float16/bfloat16, contiguous/channels_last/sliced
inputs, ignore_index, class weights and all reductions.
"""
import pytest
import torch
import torch.nn.functional as F

import fastadvseg as fas
import oracle
from helpers import (BACKEND_CASES, DTYPES, LAYOUTS, RTOL, SHAPES, assert_close, ids, layout_3d, make_d_logits,
                     make_logits, make_target)

pytestmark = pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)


def _grads(out, inputs, upstream):
    """Gradients of sum(out * upstream) w.r.t. inputs (upstream: a random weighting to test the scaling)."""
    return torch.autograd.grad((out.float() * upstream).sum(), inputs, allow_unused=True)


def _oracle_grads(out64, inputs64, upstream):
    return torch.autograd.grad((out64 * upstream.double()).sum(), inputs64, allow_unused=True)


def _leaf64(t):
    return t.detach().double().cpu().requires_grad_(True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_softmax2d(case, dtype, layout, shape, gen):
    backend, device = case
    x = make_logits(shape, dtype, layout, device, generator=gen)
    p = fas.softmax2d(x, backend=backend)
    assert p.dtype == dtype and p.shape == x.shape
    x64 = _leaf64(x)
    p64 = oracle.softmax2d(x64)
    assert_close(p, p64, dtype, "softmax")
    g = torch.randn(shape, generator=gen).to(device)
    (gx,) = _grads(p, [x], g)
    (gx64,) = _oracle_grads(p64, [x64], g)
    assert gx.dtype == dtype
    assert_close(gx, gx64, dtype, "softmax grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cross_entropy2d(case, dtype, layout, shape, gen):
    backend, device = case
    x = make_logits(shape, dtype, layout, device, generator=gen)
    t = make_target(shape, device, generator=gen)
    loss = fas.cross_entropy2d(x, t, backend=backend)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    x64 = _leaf64(x)
    loss64 = oracle.cross_entropy2d(x64, t.cpu())
    assert_close(loss, loss64, dtype, "ce")
    (gx,) = _grads(loss, [x], torch.tensor(0.7, device=device))
    (gx64,) = _oracle_grads(loss64, [x64], torch.tensor(0.7))
    assert gx.dtype == dtype and gx.shape == x.shape
    assert_close(gx, gx64, dtype, "ce grad")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.uint8, torch.int32], ids=str)
def test_cross_entropy2d_reductions_and_weights(case, reduction, weighted, target_dtype, gen):
    backend, device = case
    shape = (2, 19, 7, 11)
    x = make_logits(shape, torch.float32, "sliced", device, generator=gen)
    t = make_target(shape, device, ignore_index=250, generator=gen)
    w = (torch.rand(19, generator=gen, dtype=torch.float64) + 0.1).float().to(device) if weighted else None
    loss = fas.cross_entropy2d(x, t.to(target_dtype), weight=w, ignore_index=250, reduction=reduction,
                               backend=backend)
    x64 = _leaf64(x)
    loss64 = oracle.cross_entropy2d(x64, t.cpu(), None if w is None else w.cpu(), 250, reduction)
    assert_close(loss, loss64, torch.float32, f"ce {reduction}")
    up = torch.rand(loss64.shape, generator=gen) + 0.5
    (gx,) = _grads(loss, [x], up.to(device))
    (gx64,) = _oracle_grads(loss64, [x64], up)
    assert_close(gx, gx64, torch.float32, f"ce {reduction} grad")
    # and exactly what PyTorch's own cross-entropy gives, the drop-in promise
    ref = torch.nn.functional.cross_entropy(x.detach().double().cpu(), t.cpu(), weight=None if w is None else
                                            w.double().cpu(), ignore_index=250, reduction=reduction)
    assert_close(loss, ref, torch.float32, "ce vs F.cross_entropy")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("target_kind", ["zero", "one", "map"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_bce_with_logits2d(case, dtype, layout, target_kind, masked, gen):
    backend, device = case
    n, h, w = 2, 7, 11
    d = make_d_logits((n, h, w), dtype, device, layout=layout, generator=gen)
    target = {"zero": 0.0, "one": 1.0}.get(target_kind)
    if target is None:
        target = layout_3d(torch.rand((n, h, w), generator=gen).to(device), layout)
    mask = (torch.rand((n, h, w), generator=gen) < 0.3).to(device) if masked else None
    d4 = d.unsqueeze(1)  # the (N, 1, H, W) form
    for reduction in ("mean", "sum", "none"):
        loss = fas.bce_with_logits2d(d4, target, ignore_mask=mask, reduction=reduction, backend=backend)
        d64 = _leaf64(d)
        t64 = target if isinstance(target, float) else target.cpu()
        loss64 = oracle.bce(d64, t64, None if mask is None else mask.cpu(), reduction)
        if reduction == "none":
            assert loss.shape == d4.shape
            loss = loss[:, 0]
        assert_close(loss, loss64, dtype, f"bce {reduction}")
        up = torch.rand(loss64.shape, generator=gen) + 0.5
        (gd,) = _grads(loss, [d], up.to(device))
        (gd64,) = _oracle_grads(loss64, [d64], up)
        assert gd.dtype == dtype
        assert_close(gd, gd64, dtype, f"bce {reduction} grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_semi_cross_entropy2d(case, dtype, layout, shape, gen):
    backend, device = case
    n, c, h, w = shape
    x = make_logits(shape, dtype, layout, device, generator=gen)
    d = make_d_logits((n, h, w), torch.float32, device, layout=layout, generator=gen)
    loss, ratio = fas.semi_cross_entropy2d(x, d.unsqueeze(1), threshold=0.2, return_ratio=True, backend=backend)
    x64 = _leaf64(x)
    loss64, ratio64 = oracle.semi(x64, d.detach().cpu(), 0.2)
    assert_close(loss, loss64, dtype, "semi")
    assert_close(ratio, ratio64, torch.float32, "semi ratio")
    assert not ratio.requires_grad
    gx, gd = _grads(loss, [x, d], torch.tensor(1.3, device=device))
    (gx64,) = _oracle_grads(loss64, [x64], torch.tensor(1.3))
    assert_close(gx, gx64, dtype, "semi grad")
    assert gd is None or not gd.any(), "d_logits must get no gradient from L_semi"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.7])
def test_semi_reductions_threshold_and_mask(case, reduction, threshold, gen):
    backend, device = case
    shape = (2, 21, 1, 31)
    x = make_logits(shape, torch.float32, "channels_last", device, generator=gen)
    d = make_d_logits((2, 1, 31), torch.float32, device, threshold=threshold, generator=gen)
    mask = (torch.rand((2, 1, 31), generator=gen) < 0.25).to(device)
    loss, ratio = fas.semi_cross_entropy2d(x, d, threshold=threshold, ignore_mask=mask, reduction=reduction,
                                           return_ratio=True, backend=backend)
    x64 = _leaf64(x)
    loss64, ratio64 = oracle.semi(x64, d.detach().cpu(), threshold, mask.cpu(), reduction)
    assert_close(loss, loss64, torch.float32, f"semi {reduction}")
    assert_close(ratio, ratio64, torch.float32, "ratio")
    up = torch.rand(loss64.shape, generator=gen) + 0.5
    (gx,) = _grads(loss, [x], up.to(device))
    (gx64,) = _oracle_grads(loss64, [x64], up)
    assert_close(gx, gx64, torch.float32, f"semi {reduction} grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_one_hot2d(case, dtype, shape, gen):
    backend, device = case
    t = make_target(shape, device, generator=gen)
    out = fas.one_hot2d(t, shape[1], dtype=dtype, backend=backend)
    assert out.dtype == dtype and out.shape == shape
    assert torch.equal(out.cpu().double(), oracle.one_hot2d(t.cpu(), shape[1]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("labelled", [True, False], ids=["labelled", "unlabelled"])
def test_generator_loss(case, dtype, layout, shape, labelled, gen):
    backend, device = case
    n, c, h, w = shape
    x = make_logits(shape, dtype, layout, device, generator=gen)
    d = make_d_logits((n, h, w), dtype, device, layout=layout, generator=gen)
    t = make_target(shape, device, generator=gen) if labelled else None
    out = fas.generator_loss(x, d.unsqueeze(1), t, lambda_adv=0.01, lambda_semi=0.1, threshold=0.2, backend=backend)
    assert isinstance(out, fas.GeneratorLossOutput)
    x64, d64 = _leaf64(x), _leaf64(d)
    out64 = oracle.generator_loss(x64, d64, None if t is None else t.cpu(), 0.01, 0.1, 0.2)
    for name, a, e in zip(out._fields, out, out64):
        assert a.dtype == torch.float32 and a.dim() == 0, name
        assert_close(a, e, dtype, f"generator {name}")
    gx, gd = _grads(out.total, [x, d], torch.tensor(0.9, device=device))
    gx64, gd64 = _oracle_grads(out64[0], [x64, d64], torch.tensor(0.9))
    assert gx.dtype == dtype and gd.dtype == dtype
    assert_close(gx, gx64, dtype, "generator grad logits")
    assert_close(gd, gd64, dtype, "generator grad d_logits")


@pytest.mark.parametrize("labelled", [True, False], ids=["labelled", "unlabelled"])
def test_generator_loss_fields_are_differentiable(case, labelled, gen):
    """ce, adv and semi can be back-propagated on their own, and combined with total, with the right gradient."""
    backend, device = case
    shape = (2, 19, 7, 11)
    x = make_logits(shape, torch.float32, "contiguous", device, generator=gen)
    d = make_d_logits((2, 7, 11), torch.float32, device, generator=gen)
    t = make_target(shape, device, generator=gen) if labelled else None
    out = fas.generator_loss(x, d, t, lambda_adv=0.3, lambda_semi=0.7, backend=backend)
    x64, d64 = _leaf64(x), _leaf64(d)
    out64 = oracle.generator_loss(x64, d64, None if t is None else t.cpu(), 0.3, 0.7)
    coeffs = torch.tensor([0.5, 1.5, -2.0, 3.0])  # total, ce, adv, semi
    combo = sum(k * f for k, f in zip(coeffs.tolist(), out[:4]) if f.requires_grad)
    combo64 = sum(k * f for k, f in zip(coeffs.tolist(), out64[:4]))
    gx, gd = torch.autograd.grad(combo, [x, d], allow_unused=True)
    gx64, gd64 = torch.autograd.grad(combo64, [x64, d64], allow_unused=True)
    assert_close(gx if gx is not None else torch.zeros_like(x), gx64, torch.float32, "combo grad logits")
    assert_close(gd if gd is not None else torch.zeros_like(d), gd64, torch.float32, "combo grad d")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_discriminator_loss(case, dtype, layout, gen):
    backend, device = case
    fake = make_d_logits((3, 5, 7), dtype, device, layout=layout, generator=gen)
    real = make_d_logits((2, 9, 4), dtype, device, layout="contiguous", generator=gen)  # shapes may differ
    mask_fake = (torch.rand((3, 5, 7), generator=gen) < 0.2).to(device)
    mask_real = (torch.rand((2, 9, 4), generator=gen) < 0.4).to(device)
    for mf, mr in ((None, None), (mask_fake, mask_real)):
        loss = fas.discriminator_loss(fake.unsqueeze(1), real, ignore_mask_fake=mf, ignore_mask_real=mr,
                                      backend=backend)
        f64, r64 = _leaf64(fake), _leaf64(real)
        loss64 = oracle.discriminator_loss(f64, r64, None if mf is None else mf.cpu(), None if mr is None else mr.cpu())
        assert loss.dim() == 0
        assert_close(loss, loss64, dtype, "D loss")
        gf, gr = torch.autograd.grad(loss * 0.8, [fake, real])
        gf64, gr64 = torch.autograd.grad(loss64 * 0.8, [f64, r64])
        assert_close(gf, gf64, dtype, "D grad fake")
        assert_close(gr, gr64, dtype, "D grad real")


def test_float64_inputs_run_and_match(case, gen):
    """float64 is not a kernel dtype: auto routes it to the reference backend; explicit kernel backends refuse it."""
    backend, device = case
    x = make_logits((1, 3, 5, 7), torch.float64, "contiguous", device, generator=gen)
    t = make_target((1, 3, 5, 7), device, generator=gen)
    if backend == "reference":
        loss = fas.cross_entropy2d(x, t, backend=backend)
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, oracle.cross_entropy2d(x, t).to(loss.device), rtol=RTOL[torch.float64], atol=0)
    else:
        with pytest.raises(TypeError, match="float64"):
            fas.cross_entropy2d(x, t, backend=backend)


# ------------------------------------------------------------------------------ F.cross_entropy parity (NCHW)

WEIGHTS = {"none": None, "positive": [0.3, 1.0, 2.5, 0.7, 1.2], "signed": [-2.0, 1.0, 0.5, -0.4, 0.1]}



@pytest.mark.parametrize("eps", [0.0, 0.1, 0.37])
@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_f_cross_entropy(case, eps, weights, reduction, gen):
    """Value and logits gradient of F.cross_entropy (float64), weight as the third positional argument."""
    backend, device = case
    shape = (2, 5, 3, 7)
    x = make_logits(shape, torch.float32, "sliced", device, generator=gen)
    t = make_target(shape, device, ignore_index=250, generator=gen)
    w = None if WEIGHTS[weights] is None else torch.tensor(WEIGHTS[weights], device=device)
    loss = fas.cross_entropy2d(x, t, w, ignore_index=250, reduction=reduction, label_smoothing=eps, backend=backend)
    x64 = x.detach().double().cpu().requires_grad_()
    w64 = None if w is None else w.double().cpu()
    want = F.cross_entropy(x64, t.cpu(), w64, ignore_index=250, reduction=reduction, label_smoothing=eps)
    assert_close(loss, want, torch.float32, "value")
    up = torch.rand(want.shape, generator=gen, dtype=torch.float64) + 0.5
    (gx,) = torch.autograd.grad((loss.double().cpu() * up).sum(), [x])
    (gx64,) = torch.autograd.grad((want * up).sum(), [x64])
    assert_close(gx, gx64, torch.float32, "gradient")



def test_signed_weight_total_and_zero_total(case):
    backend, device = case
    x = torch.tensor([[1, 2, .5], [.3, -1, 2]], device=device).reshape(2, 3, 1, 1).requires_grad_()
    t = torch.tensor([0, 2], device=device).reshape(2, 1, 1)
    w = torch.tensor([-2, 1, .5], device=device)
    loss = fas.cross_entropy2d(x, t, w, backend=backend)
    torch.testing.assert_close(loss.cpu(), F.cross_entropy(x.detach().cpu(), t.cpu(), w.cpu()))
    zero_total = torch.tensor([1.0, 1.0, -1.0], device=device)  # w[0] + w[2] == 0: our rule, 0 and no gradient
    loss = fas.cross_entropy2d(x, t, zero_total, label_smoothing=0.2, backend=backend)
    (g,) = torch.autograd.grad(loss, [x])
    assert loss.item() == 0.0 and torch.count_nonzero(g) == 0



def _weighted_ce_float64(x, t, w, eps, ignore_index):
    """F.cross_entropy's weighted, smoothed mean written out, so that the weight gets a float64 gradient
    (PyTorch's own op refuses a weight that requires grad)."""
    logp = torch.log_softmax(x, 1)
    valid = t != ignore_index
    y = torch.where(valid, t, 0)
    w_y = torch.where(valid, w[y], 0.0)
    nll = -logp.gather(1, y.unsqueeze(1)).squeeze(1)
    smooth = -(logp * w.view(1, -1, 1, 1)).sum(1)
    per_pixel = torch.where(valid, (1 - eps) * w_y * nll + eps / x.shape[1] * smooth, 0.0)
    return per_pixel.sum() / w_y.sum()



@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_learnt_class_weights_get_the_same_gradient_everywhere(case, eps, gen):
    backend, device = case
    shape = (2, 4, 3, 5)
    x = make_logits(shape, torch.float32, "channels_last", device, generator=gen)
    t = make_target(shape, device, generator=gen)
    w = (torch.rand(4, generator=gen) + 0.2).to(device).requires_grad_()
    loss = fas.cross_entropy2d(x, t, w, label_smoothing=eps, backend=backend)
    gx, gw = torch.autograd.grad(loss * 0.7, [x, w])
    x64, w64 = x.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
    gx64, gw64 = torch.autograd.grad(_weighted_ce_float64(x64, t.cpu(), w64, eps, 255) * 0.7, [x64, w64])
    assert_close(gx, gx64, torch.float32, "logits gradient")
    assert_close(gw, gw64, torch.float32, "weight gradient")

