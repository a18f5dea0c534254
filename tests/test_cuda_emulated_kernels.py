"""The CUDA kernels' own surface (fastadvseg._cuda_kernels), emulated on the CPU, against float64 oracles.

tests/cuda_emulation compiles the kernels' per-pixel code (fastadvseg/kernels/cuda/pixel_ops.cuh) and the finalize block's
result code with the host compiler and runs them over CPU tensors behind :class:`EmulatedExt`, which mirrors
csrc/cuda/binding.cpp exactly (argument order, returns). These tests call it directly -- no autograd layer, no
dispatch -- and check what the binding promises: RAW sums (never means), loss maps, gradients of the raw sums
(exactly 0 where a pixel does not count, also next to NaN/Inf inputs there) and the bad-label reports
([count, first bad label in pixel order], int64), for float32/float16/bfloat16 inputs in contiguous,
channels_last and sliced layouts at small odd shapes. The oracles are PyTorch's own functions
(F.cross_entropy with weight/ignore_index/label_smoothing, F.binary_cross_entropy_with_logits, softmax, autograd)
in float64 on the inputs as stored. With `size` (fused bilinear upsampling), the oracle is the same op on
F.interpolate(x.float(), size, mode="bilinear", align_corners) and the gradient its float64 adjoint, at non-integer
factors, downsampling, one axis only and identity sizes, with logits and D maps at different resolutions.
Skipped without g++ or the CUDA headers (no GPU needed).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cuda_emulation import inputs
from cuda_emulation.emulated_ext import EmulatedExt

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "sliced"]
# odd shapes: N=1, C=1, C not a power of two, H*W prime, W=1, C=150, more pixels than one block of 256
SHAPES = [(2, 5, 7, 9), (1, 1, 3, 5), (3, 21, 13, 1), (1, 150, 3, 5), (2, 19, 17, 11)]
IGNORE = 255
# sums: float32 per pixel, float64 across pixels; maps: float32; gradients: stored in the input dtype
SUM_TOL = dict(rtol=1e-5, atol=1e-4)
MAP_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-4),
}


# ------------------------------------------------------------------------------------------------------- inputs

@pytest.fixture
def ext(emulated_ext) -> EmulatedExt:
    return emulated_ext


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(20240607)


_rand = inputs.rand
_with_layout = inputs.with_layout


def _logits(shape, dtype, layout, gen, scale=3.0):
    return _with_layout(_rand(shape, gen, scale).to(dtype), layout)


def _target(shape, gen, layout="contiguous", ignore_frac=0.25, ignore_index=IGNORE):
    return inputs.target(shape, gen, ignore_frac, ignore_index, layout)


def _mask(nhw, gen, layout="contiguous", frac=0.3):
    return inputs.mask(nhw, gen, frac, layout)


def _weight(kind, c, gen):
    if kind == "none":
        return None
    w = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    if kind == "negative":  # some negative class weights (PyTorch allows them)
        w = w - 1.2
    return w.float().double()  # the kernel reads float32 weights: the oracle uses the same values


def _close(actual, expected, **tol):
    torch.testing.assert_close(actual.double(), expected.double(), equal_nan=True, **tol)


def _grad_close(actual, expected, dtype):
    assert actual.dtype == dtype
    _close(actual, expected.to(dtype), **GRAD_TOL[dtype])


def _counted(target, c, ignore_index):
    return (target != ignore_index) & (target >= 0) & (target < c)


def _softplus_neg(z):
    """BCE(z, 1) = softplus(-z), in float64."""
    return F.binary_cross_entropy_with_logits(z, torch.ones_like(z), reduction="none")


# -------------------------------------------------------------------------------------------------- softmax2d

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_softmax2d_forward_and_backward_from_saved_probabilities(ext, shape, dtype, layout, gen):
    x = _logits(shape, dtype, layout, gen)
    y = ext.softmax2d_forward(x)
    assert y.dtype == dtype and y.shape == x.shape
    _grad_close(y, torch.softmax(x.double(), dim=1), dtype)
    # the backward reads the probabilities as saved (in x's dtype): the oracle uses those very values
    p = y.double()
    for gy in (_with_layout(_rand(shape, gen, 1.0).to(dtype), layout),
               torch.ones((), dtype=dtype).expand(shape)):  # an expanded gradient, as .sum() gives
        gx = ext.softmax2d_backward(y, gy)
        g = gy.double()
        _grad_close(gx, p * (g - (p * g).sum(dim=1, keepdim=True)), dtype)
    # a float32 upstream gradient for half probabilities is converted to their dtype, like the binding does
    gy32 = _rand(shape, gen, 1.0).float()
    g = gy32.to(dtype).double()
    _grad_close(ext.softmax2d_backward(y, gy32), p * (g - (p * g).sum(dim=1, keepdim=True)), dtype)


# ---------------------------------------------------------------------------------------------- cross_entropy2d

def _ce_oracle(x, target, weight, ignore_index, eps):
    """(loss map, loss sum, weight sum, gradient of the loss sum) in float64; bad labels do not count."""
    c = x.shape[1]
    counted = _counted(target, c, ignore_index)
    t = torch.where(counted, target, torch.full_like(target, -100))
    x64 = x.detach().double().requires_grad_(True)
    loss_map = F.cross_entropy(x64, t, weight=weight, ignore_index=-100, label_smoothing=eps, reduction="none")
    loss_map = torch.where(counted, loss_map, torch.zeros_like(loss_map))
    loss_map.sum().backward()
    w = torch.ones(c, dtype=torch.float64) if weight is None else weight
    wsum = w[t[counted]].sum()
    return loss_map.detach(), loss_map.detach().sum(), wsum, x64.grad


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("weight_kind", ["none", "positive", "negative"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cross_entropy2d_raw_sums_map_and_gradient(ext, shape, dtype, layout, weight_kind, eps, gen):
    x = _logits(shape, dtype, layout, gen)
    t = _target(shape, gen, layout=layout)
    w = _weight(weight_kind, shape[1], gen)
    sums, loss_map, grad, bad = ext.cross_entropy2d_forward(x, t, w, IGNORE, eps, True, True)
    ref_map, ref_sum, ref_wsum, ref_grad = _ce_oracle(x, t, w, IGNORE, eps)
    assert sums.dtype == torch.float32 and sums.shape == (2,)
    assert bad.dtype == torch.int64 and bad.tolist() == [0, 0]
    assert loss_map.dtype == torch.float32 and loss_map.shape == t.shape
    _close(loss_map, ref_map, **MAP_TOL)
    _close(sums[0], ref_sum, **SUM_TOL)
    _close(sums[1], ref_wsum, **SUM_TOL)
    _grad_close(grad, ref_grad, dtype)
    assert torch.all(grad.masked_select(~_counted(t, shape[1], IGNORE).unsqueeze(1).expand(shape)) == 0)
    if weight_kind != "negative" and ref_wsum > 0:  # PyTorch's mean is the ratio of the two sums
        mean = F.cross_entropy(x.double(), t, weight=w, ignore_index=IGNORE, label_smoothing=eps)
        _close(sums[0] / sums[1], mean, rtol=1e-5, atol=1e-6)
    # nothing requested: the same sums, None for the map and the gradient
    sums2, map2, grad2, bad2 = ext.cross_entropy2d_forward(x, t, w, IGNORE, eps, False, False)
    assert map2 is None and grad2 is None and bad2.tolist() == [0, 0]
    assert torch.equal(sums2, sums)


@pytest.mark.parametrize("eps", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("ignore_index", [-100, 2, IGNORE])
def test_cross_entropy2d_ignore_index_values_and_smoothing_extremes(ext, ignore_index, eps, gen):
    """ignore_index inside [0, C) (that class never counts), negative, or outside; eps up to 1 (uniform target)."""
    shape = (2, 6, 5, 7)
    x = _logits(shape, torch.float32, "sliced", gen)
    t = _target(shape, gen, layout="sliced", ignore_index=ignore_index)
    w = _weight("positive", 6, gen)
    sums, loss_map, grad, bad = ext.cross_entropy2d_forward(x, t, w, ignore_index, eps, True, True)
    ref_map, ref_sum, ref_wsum, ref_grad = _ce_oracle(x, t, w, ignore_index, eps)
    assert bad.tolist() == [0, 0]
    _close(loss_map, ref_map, **MAP_TOL)
    _close(sums, torch.stack([ref_sum, ref_wsum]), **SUM_TOL)
    _grad_close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy2d_non_finite_logits_like_pytorch(ext, dtype, eps):
    inf, nan = float("inf"), float("nan")
    rows = [[inf, 1.0, 2.0, 0.0], [-inf, -inf, 3.0, 1.0], [-inf, -inf, -inf, -inf], [inf, inf, 0.0, 0.0],
            [nan, 1.0, 2.0, 3.0], [0.5, -inf, 2.0, -inf], [1.0, 2.0, 3.0, 4.0], [-inf, 2.0, 2.0, -inf]]
    x = torch.tensor(rows, dtype=torch.float64).T.reshape(1, 4, 1, len(rows)).to(dtype)
    for weight in (None, torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64)):
        for label in range(4):
            t = torch.full((1, 1, len(rows)), label)
            _, loss_map, _, _ = ext.cross_entropy2d_forward(x, t, weight, IGNORE, eps, True, False)
            ref = F.cross_entropy(x.double(), t, weight=weight, label_smoothing=eps, reduction="none")
            _close(loss_map, ref, **MAP_TOL)


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_cross_entropy2d_uncounted_pixels_give_exact_zeros(ext, eps, gen):
    """NaN/Inf logits at ignored or bad-label pixels never reach the sums; their gradient is exactly 0."""
    shape = (2, 4, 3, 5)
    x = _rand(shape, gen).float()
    t = _target(shape, gen, ignore_frac=0.0)
    x[0, :, 0, 0] = float("nan")
    x[1, :, 2, 4] = float("inf")
    x[1, 1, 1, 1] = -float("inf")
    t[0, 0, 0] = IGNORE
    t[1, 2, 4] = 7  # bad
    t[1, 1, 1] = -1  # bad
    sums, loss_map, grad, bad = ext.cross_entropy2d_forward(x, t, None, IGNORE, eps, True, True)
    assert torch.isfinite(sums).all() and torch.isfinite(grad).all()
    assert bad.tolist() == [2, -1]
    for n, h, w in ((0, 0, 0), (1, 2, 4), (1, 1, 1)):
        assert loss_map[n, h, w] == 0 and torch.all(grad[n, :, h, w] == 0)
    ref_map, ref_sum, _, ref_grad = _ce_oracle(torch.nan_to_num(x), t, None, IGNORE, eps)
    _close(sums[0], ref_sum, **SUM_TOL)
    _close(grad, ref_grad, **GRAD_TOL[torch.float32])
    # all ignored: zero sums and an all-zero gradient
    t_all = torch.full((2, 3, 5), IGNORE)
    sums, loss_map, grad, bad = ext.cross_entropy2d_forward(x, t_all, None, IGNORE, eps, True, True)
    assert sums.tolist() == [0.0, 0.0] and bad.tolist() == [0, 0]
    assert torch.count_nonzero(loss_map) == 0 and torch.count_nonzero(grad) == 0


# -------------------------------------------------------------------------------------------------- bad labels

def _plant_bad_labels(t):
    """Bad labels whose first in memory order (of a w-major or sliced map) is not the first in pixel order."""
    n, h, w = t.shape
    t[n - 1, 0, 0] = -5           # first in a w-major memory order, not in pixel order (later image)
    t[0, h - 1, w - 1] = 2**40    # the first in pixel order: image 0
    t[n - 1, h - 1, w - 1] = 6    # == C: bad too
    t[0, 0, 0] = IGNORE           # ignored, not bad
    return 3, 2**40


@pytest.mark.parametrize("layout", ["contiguous", "sliced", "w_major"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bad_labels_count_and_first_in_pixel_order(ext, dtype, layout, gen):
    shape = (3, 6, 5, 7)
    x = _logits(shape, dtype, "channels_last", gen)
    z = _with_layout(_rand((3, 5, 7), gen, 2.0).to(dtype), layout)
    base = _target(shape, gen)
    count, first = _plant_bad_labels(base)
    t = _with_layout(base, layout)
    for eps in (0.0, 0.1):
        sums, loss_map, grad, bad = ext.cross_entropy2d_forward(x, t, None, IGNORE, eps, True, True)
        assert bad.dtype == torch.int64 and bad.tolist() == [count, first]
        ref_map, ref_sum, ref_wsum, ref_grad = _ce_oracle(x, t, None, IGNORE, eps)  # bad pixels do not count
        _close(loss_map, ref_map, **MAP_TOL)
        _close(sums, torch.stack([ref_sum, ref_wsum]), **SUM_TOL)
        _grad_close(grad, ref_grad, dtype)
    sums, gx, gz, bad = ext.generator_loss_forward(x, z, t, 0.2, IGNORE, True, True)
    assert bad.tolist() == [count, first]
    counted = _counted(t, 6, IGNORE)
    assert sums[1].item() == counted.sum().item() == sums[3].item()
    # more bad labels than one block of threads, across images, and a negative one first
    t2 = torch.full((2, 17, 19), -(2**40) - 3)
    t2[0, 0, :3] = torch.tensor([IGNORE, 0, 1])
    sums, _, _, bad = ext.cross_entropy2d_forward(_rand((2, 6, 17, 19), gen).to(dtype), t2, None, IGNORE, 0.0,
                                                  False, False)
    assert bad.tolist() == [2 * 17 * 19 - 3, -(2**40) - 3]
    assert sums[1].item() == 2.0


def test_bad_labels_with_a_negative_ignore_index(ext, gen):
    x = _rand((1, 3, 2, 4), gen).float()
    t = torch.tensor([[[-100, 0, 255, 1], [2, 3, -100, -7]]])
    _, _, _, bad = ext.cross_entropy2d_forward(x, t, None, -100, 0.0, False, False)
    assert bad.tolist() == [3, 255]
    _, _, _, bad = ext.generator_loss_forward(x, torch.zeros(1, 2, 4), t, 0.2, -100, False, False)
    assert bad.tolist() == [3, 255]


# ------------------------------------------------------------------------------------------------ bce, semi, d

@pytest.mark.parametrize("target_kind", ["zero", "one", "soft", "map", "map64", "scalar_tensor"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bce_with_logits2d(ext, dtype, layout, masked, target_kind, gen):
    nhw = (3, 11, 13)
    z = _with_layout(_rand(nhw, gen).to(dtype), layout)
    target, value = None, {"zero": 0.0, "one": 1.0, "soft": 0.3}.get(target_kind, 0.0)
    if target_kind in ("map", "map64"):
        target = _with_layout(torch.rand(nhw, generator=gen, dtype=torch.float64), layout)
        target = target if target_kind == "map64" else target.float()
    elif target_kind == "scalar_tensor":
        target = torch.tensor(0.8)
    mask = _mask(nhw, gen, layout=layout) if masked else None
    sums, loss_map, grad = ext.bce_with_logits2d_forward(z, target, value, mask, True, True)
    t64 = (torch.full(nhw, value, dtype=torch.float64) if target is None
           else target.double().expand(nhw))
    keep = torch.ones(nhw, dtype=torch.bool) if mask is None else ~mask
    ref = F.binary_cross_entropy_with_logits(z.double(), t64, reduction="none")
    ref = torch.where(keep, ref, torch.zeros_like(ref))
    assert sums.dtype == torch.float32 and sums.shape == (2,)
    _close(loss_map, ref, **MAP_TOL)
    _close(sums, torch.stack([ref.sum(), keep.sum().double()]), **SUM_TOL)
    ref_grad = torch.where(keep, torch.sigmoid(z.double()) - t64, torch.zeros_like(t64))
    _grad_close(grad, ref_grad, dtype)
    sums2, map2, grad2 = ext.bce_with_logits2d_forward(z, target, value, mask, False, False)
    assert map2 is None and grad2 is None and torch.equal(sums2, sums)


def _semi_oracle(x, z, threshold, mask):
    keep = torch.sigmoid(z.float()) > threshold  # the kernel's test: sigmoid of float32(z), in float32
    if mask is not None:
        keep &= ~mask
    considered = z.numel() if mask is None else int((~mask).sum())
    x64 = x.detach().double().requires_grad_(True)
    pseudo = x.double().argmax(dim=1)
    nll = F.cross_entropy(x64, pseudo, reduction="none")
    nll = torch.where(keep, nll, torch.zeros_like(nll))
    nll.sum().backward()
    return nll.detach(), torch.tensor([nll.sum().item(), keep.sum().item(), considered], dtype=torch.float64), \
        x64.grad, keep


@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.7])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_semi_cross_entropy2d(ext, dtype, layout, masked, threshold, gen):
    shape = (2, 7, 9, 11)
    x = _logits(shape, dtype, layout, gen)
    z = _with_layout(_rand((2, 9, 11), gen, 2.0).to(torch.float16), layout)
    mask = _mask((2, 9, 11), gen, layout=layout) if masked else None
    sums, loss_map, grad = ext.semi_cross_entropy2d_forward(x, z, threshold, mask, True, True)
    ref_map, ref_sums, ref_grad, _ = _semi_oracle(x, z, threshold, mask)
    assert sums.dtype == torch.float32 and sums.shape == (3,)
    _close(loss_map, ref_map, **MAP_TOL)
    _close(sums, ref_sums, **SUM_TOL)
    _grad_close(grad, ref_grad, dtype)
    sums2, map2, grad2 = ext.semi_cross_entropy2d_forward(x, z, threshold, mask, False, False)
    assert map2 is None and grad2 is None and torch.equal(sums2, sums)


@pytest.mark.parametrize("labelled", [True, False])
@pytest.mark.parametrize("z_dtype", [None, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 21, 13, 17), (1, 3, 1, 1), (3, 19, 11, 9)])
def test_generator_loss_raw_terms(ext, shape, dtype, layout, z_dtype, labelled, gen):
    n, c, h, w = shape
    x = _logits(shape, dtype, layout, gen)
    z = _with_layout(_rand((n, h, w), gen, 2.0).to(z_dtype or dtype), layout)
    t = _target(shape, gen, layout=layout) if labelled else None
    threshold = 0.2
    sums, gx, gz, bad = ext.generator_loss_forward(x, z, t, threshold, IGNORE, True, True)
    assert sums.dtype == torch.float32 and sums.shape == (6,)
    assert bad.dtype == torch.int64 and bad.tolist() == [0, 0]
    assert gx.dtype == dtype and gz.dtype == z.dtype and gz.shape == (n, h, w)
    z64 = z.double()
    if labelled:
        _, term, count, ref_gx = _ce_oracle(x, t, None, IGNORE, 0.0)
        adv_at = _counted(t, c, IGNORE)
        kept = considered = 0
    else:
        _, semi_sums, ref_gx, _ = _semi_oracle(x, z, threshold, None)
        term, count, kept, considered = semi_sums[0], semi_sums[1], semi_sums[1], n * h * w
        adv_at = torch.ones((n, h, w), dtype=torch.bool)
    adv = torch.where(adv_at, _softplus_neg(z64), torch.zeros_like(z64))
    expected = torch.tensor([float(term), float(count), adv.sum().item(), adv_at.sum().item(), float(kept),
                             float(considered)], dtype=torch.float64)
    _close(sums, expected, **SUM_TOL)
    _grad_close(gx, ref_gx, dtype)
    _grad_close(gz, torch.where(adv_at, torch.sigmoid(z64) - 1, torch.zeros_like(z64)), z.dtype)
    sums2, gx2, gz2, bad2 = ext.generator_loss_forward(x, z, t, threshold, IGNORE, False, False)
    assert gx2 is None and gz2 is None and bad2.tolist() == [0, 0] and torch.equal(sums2, sums)


def test_generator_loss_nothing_kept_and_nothing_counted(ext, gen):
    shape = (2, 5, 4, 6)
    x = _rand(shape, gen).float()
    z = torch.full((2, 4, 6), -30.0)  # sigmoid ~ 0: nothing kept
    sums, gx, gz, bad = ext.generator_loss_forward(x, z, None, 0.2, IGNORE, True, True)
    assert sums[[0, 1, 4]].tolist() == [0.0, 0.0, 0.0] and sums[5].item() == 48.0 and sums[3].item() == 48.0
    assert torch.count_nonzero(gx) == 0 and torch.isfinite(gz).all() and bad.tolist() == [0, 0]
    x[0, :, 1, 1] = float("nan")  # never read: no pixel counts
    sums, gx, gz, bad = ext.generator_loss_forward(x, z, torch.full((2, 4, 6), IGNORE), 0.2, IGNORE, True, True)
    assert sums.tolist() == [0.0] * 6 and bad.tolist() == [0, 0]
    assert torch.count_nonzero(gx) == 0 and torch.count_nonzero(gz) == 0


@pytest.mark.parametrize("masks", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_discriminator_loss_raw_sums(ext, dtype, layout, masks, gen):
    fake = _with_layout(_rand((3, 9, 14), gen).to(dtype), layout)
    real = _with_layout(_rand((2, 17, 5), gen).to(dtype), layout)
    mf = _mask((3, 9, 14), gen, layout=layout) if masks[0] else None
    mr = _mask((2, 17, 5), gen, layout=layout) if masks[1] else None
    sums, fake_grad, real_grad = ext.discriminator_loss_forward(fake, real, mf, mr, True, True)
    assert sums.dtype == torch.float32 and sums.shape == (4,)
    expected, grads = [], []
    for d, m, label in ((fake, mf, 0.0), (real, mr, 1.0)):
        keep = torch.ones(d.shape, dtype=torch.bool) if m is None else ~m
        d64 = d.double()
        t = torch.full_like(d64, label)
        loss = F.binary_cross_entropy_with_logits(d64, t, reduction="none")
        expected += [torch.where(keep, loss, torch.zeros_like(loss)).sum().item(), keep.sum().item()]
        grads.append(torch.where(keep, torch.sigmoid(d64) - label, torch.zeros_like(d64)))
    _close(sums, torch.tensor(expected, dtype=torch.float64), **SUM_TOL)
    _grad_close(fake_grad, grads[0], dtype)
    _grad_close(real_grad, grads[1], dtype)
    sums2, fg2, rg2 = ext.discriminator_loss_forward(fake, real, mf, mr, False, True)
    assert fg2 is None and rg2 is not None and torch.equal(sums2, sums)


def test_discriminator_loss_one_empty_map(ext, gen):
    fake = torch.empty((2, 0, 5))
    real = _rand((2, 6, 5), gen).float()
    sums, fake_grad, real_grad = ext.discriminator_loss_forward(fake, real, None, None, True, True)
    ref = _softplus_neg(real.double()).sum()
    _close(sums, torch.stack([torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64), ref,
                              torch.tensor(60.0, dtype=torch.float64)]), **SUM_TOL)
    assert fake_grad.shape == fake.shape and real_grad.shape == real.shape


# ------------------------------------------------------------------------------------ fused bilinear upsampling
# Every op with `size`: the same op on F.interpolate(x.float(), size, mode="bilinear", align_corners) (the values
# the kernels interpolate, in float32), evaluated in float64; gradients at the inputs' own resolution are the
# float64 adjoint of the interpolation applied to the float64 gradient at size.

# (N, C, h, w) -> (H, W): non-integer factors, 5 -> 17, one axis only, h = 1 and C = 1, downsampling, mixed
UP_CASES = [((2, 5, 4, 6), (9, 13)), ((1, 3, 5, 5), (17, 17)), ((2, 19, 7, 4), (7, 10)), ((1, 1, 1, 4), (3, 9)),
            ((2, 4, 9, 11), (5, 6)), ((3, 6, 3, 7), (11, 8))]
ALIGN = [False, True]
# every dtype and every layout, float32 in each layout
DTYPE_LAYOUTS = [(torch.float32, "contiguous"), (torch.float32, "channels_last"), (torch.float32, "sliced"),
                 (torch.float16, "channels_last"), (torch.bfloat16, "sliced")]


def _up(x, size, align):
    """F.interpolate(x.float(), size) in float64, for an (N, C, h, w) tensor or an (N, h, w) map."""
    if x.dim() == 3:
        return _up(x.unsqueeze(1), size, align).squeeze(1)
    return F.interpolate(x.float(), size, mode="bilinear", align_corners=align).double()


def _adjoint(grad_full, x, size, align):
    """(the gradient at x's resolution of a loss whose gradient at size is grad_full, the same of |grad_full|) in
    float64. The second is the scale of each element's sum of terms, which bounds its float32 rounding."""
    if list(x.shape[-2:]) == list(size):  # an input at the label grid is used as is
        return grad_full, grad_full.abs()
    x64 = x.detach().double().requires_grad_(True)
    src = x64.unsqueeze(1) if x.dim() == 3 else x64
    full = grad_full.unsqueeze(1) if x.dim() == 3 else grad_full
    up = F.interpolate(src, size, mode="bilinear", align_corners=align)
    (g,) = torch.autograd.grad(up, x64, full, retain_graph=True)
    (scale,) = torch.autograd.grad(up, x64, full.abs())
    return g, scale


def _up_grad_close(actual, expected, like):
    """A low-resolution gradient: the input's shape and dtype; each element is a float32 sum of up to hundreds of
    terms, so beside the dtype's tolerance it may be off by 1e-5 of the sum of the terms' magnitudes (what
    PyTorch's own float32 interpolate + loss is off by; the result itself may be far smaller, by cancellation)."""
    g, scale = expected
    assert actual.shape == like.shape and actual.dtype == like.dtype
    tol = GRAD_TOL[like.dtype] if like.dtype in GRAD_TOL else GRAD_TOL[torch.float32]
    want = g.to(like.dtype).double()
    err = (actual.double() - want).abs()
    allowed = tol["atol"] + tol["rtol"] * want.abs() + 1e-5 * scale
    bad = ~((err <= allowed) | (torch.isnan(actual.double()) & torch.isnan(want)))
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} gradient elements off; worst excess "
                           f"{float((err - allowed)[bad].max()):.3g} at {tuple(bad.nonzero()[0].tolist())}")


@pytest.mark.parametrize("align", ALIGN)
@pytest.mark.parametrize("dtype,layout", DTYPE_LAYOUTS)
@pytest.mark.parametrize("case", UP_CASES)
def test_upsampled_softmax2d_forward_and_backward(ext, case, dtype, layout, align, gen):
    shape, size = case
    x = _logits(shape, dtype, layout, gen)
    y = ext.softmax2d_forward(x, list(size), align)
    assert y.dtype == dtype and y.shape == (*shape[:2], *size)
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    _grad_close(y, torch.softmax(_up(x, size, align), dim=1), dtype)
    p = y.double()  # the backward reads the probabilities as saved
    gy = _with_layout(_rand(y.shape, gen, 1.0).to(dtype), layout)
    gx = ext.softmax2d_backward(y, gy, list(shape[2:]), align)
    g = gy.double()
    _up_grad_close(gx, _adjoint(p * (g - (p * g).sum(dim=1, keepdim=True)), x, size, align), x)


@pytest.mark.parametrize("weight_kind,eps", [("none", 0.0), ("negative", 0.0), ("positive", 0.1)])
@pytest.mark.parametrize("align", ALIGN)
@pytest.mark.parametrize("dtype,layout", DTYPE_LAYOUTS)
@pytest.mark.parametrize("case", UP_CASES)
def test_upsampled_cross_entropy2d(ext, case, dtype, layout, align, weight_kind, eps, gen):
    shape, size = case
    n, c = shape[:2]
    x = _logits(shape, dtype, layout, gen)
    t = _target((n, c, *size), gen, layout=layout)
    w = _weight(weight_kind, c, gen)
    sums, loss_map, grad, bad = ext.cross_entropy2d_forward(x, t, w, IGNORE, eps, True, True, list(size), align)
    ref_map, ref_sum, ref_wsum, ref_grad = _ce_oracle(_up(x, size, align), t, w, IGNORE, eps)
    assert bad.tolist() == [0, 0]
    assert loss_map.shape == t.shape
    _close(loss_map, ref_map, **MAP_TOL)
    _close(sums, torch.stack([ref_sum, ref_wsum]), **SUM_TOL)
    _up_grad_close(grad, _adjoint(ref_grad, x, size, align), x)
    sums2, map2, grad2, _ = ext.cross_entropy2d_forward(x, t, w, IGNORE, eps, False, False, list(size), align)
    assert map2 is None and grad2 is None and torch.equal(sums2, sums)


@pytest.mark.parametrize("align", ALIGN)
def test_upsampled_cross_entropy2d_41_to_321(ext, align, gen):
    """DeepLab's 1/8 output of a 321 crop: a factor of 7.83, the gather reads about 16 x 16 pixels per element."""
    shape, size = (1, 3, 41, 41), (321, 321)
    x = _logits(shape, torch.float32, "contiguous", gen)
    t = _target((1, 3, *size), gen)
    sums, loss_map, grad, _ = ext.cross_entropy2d_forward(x, t, None, IGNORE, 0.0, True, True, list(size), align)
    ref_map, ref_sum, ref_wsum, ref_grad = _ce_oracle(_up(x, size, align), t, None, IGNORE, 0.0)
    _close(loss_map, ref_map, **MAP_TOL)
    _close(sums, torch.stack([ref_sum, ref_wsum]), **SUM_TOL)
    _up_grad_close(grad, _adjoint(ref_grad, x, size, align), x)


def test_upsampled_identity_size_is_the_plain_op(ext, gen):
    """size equal to the input's grid: the input is used as is, the very bits of the call without size."""
    shape = (2, 5, 7, 9)
    x = _logits(shape, torch.float16, "channels_last", gen)
    z = _rand((2, 7, 9), gen).float()
    t = _target(shape, gen)
    m = _mask((2, 7, 9), gen)
    for align in ALIGN:
        pairs = [(ext.softmax2d_forward(x), ext.softmax2d_forward(x, [7, 9], align)),
                 (ext.cross_entropy2d_forward(x, t, None, IGNORE, 0.1, True, True),
                  ext.cross_entropy2d_forward(x, t, None, IGNORE, 0.1, True, True, [7, 9], align)),
                 (ext.semi_cross_entropy2d_forward(x, z, 0.2, m, True, True),
                  ext.semi_cross_entropy2d_forward(x, z, 0.2, m, True, True, [7, 9], align)),
                 (ext.generator_loss_forward(x, z, t, 0.2, IGNORE, True, True),
                  ext.generator_loss_forward(x, z, t, 0.2, IGNORE, True, True, [7, 9], align)),
                 (ext.bce_with_logits2d_forward(z, None, 0.3, m, True, True),
                  ext.bce_with_logits2d_forward(z, None, 0.3, m, True, True, [7, 9], align)),
                 (ext.discriminator_loss_forward(z, z, m, None, True, True),
                  ext.discriminator_loss_forward(z, z, m, None, True, True, [7, 9], align))]
        for plain, sized in pairs:
            plain, sized = (plain, sized) if isinstance(plain, list) else ([plain], [sized])
            for a, b in zip(plain, sized):
                assert (a is None and b is None) or torch.equal(a, b)
        y = ext.softmax2d_forward(x)
        gy = _rand(shape, gen, 1.0).to(torch.float16)
        assert torch.equal(ext.softmax2d_backward(y, gy), ext.softmax2d_backward(y, gy, [7, 9], align))


@pytest.mark.parametrize("align", ALIGN)
def test_upsampled_gradient_is_exactly_zero_where_only_uncounted_pixels_read(ext, align, gen):
    """A NaN logit whose label-grid pixels are all ignored reaches neither the loss nor any gradient, and its own
    gradient is exactly 0 (the gather selects, it does not multiply by a zero weight)."""
    shape, size = (1, 4, 5, 6), (13, 11)
    x = _rand(shape, gen).float()
    x[0, :, 2, 3] = float("nan")
    reads = torch.isnan(_up(x, size, align)[:, 0])  # the label-grid pixels that read it, zero weights included
    t = _target((1, 4, *size), gen, ignore_frac=0.0)
    t[reads] = IGNORE
    assert 0 < int(reads.sum()) < reads.numel()
    for eps in (0.0, 0.2):
        sums, loss_map, grad, _ = ext.cross_entropy2d_forward(x, t, None, IGNORE, eps, True, True, list(size), align)
        assert torch.isfinite(sums).all() and torch.isfinite(loss_map).all() and torch.isfinite(grad).all()
        assert torch.count_nonzero(grad[0, :, 2, 3]) == 0
        ref_map, _, _, ref_grad = _ce_oracle(torch.nan_to_num(_up(x, size, align)), t, None, IGNORE, eps)
        _close(loss_map, ref_map, **MAP_TOL)
        _up_grad_close(grad, _adjoint(ref_grad, torch.nan_to_num(x), size, align), x)
    # all ignored: zero sums and an all-zero gradient, also at the NaN
    t_all = torch.full((1, *size), IGNORE)
    sums, _, grad, _ = ext.cross_entropy2d_forward(x, t_all, None, IGNORE, 0.0, True, True, list(size), align)
    assert sums.tolist() == [0.0, 0.0] and torch.count_nonzero(grad) == 0


def test_upsampled_bad_labels_are_reported_at_the_label_grid(ext, gen):
    shape, size = (3, 6, 2, 3), (5, 7)
    x = _logits(shape, torch.float32, "sliced", gen)
    base = _target((3, 6, *size), gen)
    count, first = _plant_bad_labels(base)
    for layout in ("contiguous", "w_major"):
        t = _with_layout(base, layout)
        _, _, _, bad = ext.cross_entropy2d_forward(x, t, None, IGNORE, 0.0, False, True, list(size), True)
        assert bad.tolist() == [count, first]
        sums, _, _, bad = ext.generator_loss_forward(x, torch.zeros(3, 1, 2), t, 0.2, IGNORE, True, True, list(size),
                                                     False)
        assert bad.tolist() == [count, first]
        assert sums[1].item() == _counted(t, 6, IGNORE).sum().item() == sums[3].item()


def _keep_up(z, size, align, threshold):
    """The keep rule of L_semi on the interpolated float32 z."""
    from fastadvseg._keep import keep_mask
    return keep_mask(F.interpolate(z.float().unsqueeze(1), size, mode="bilinear", align_corners=align)[:, 0],
                     threshold) if list(z.shape[1:]) != list(size) else keep_mask(z, threshold)


def _semi_up_oracle(x, z, size, align, threshold, mask):
    """(loss map, [sum, kept, considered], gradient at x's resolution) of L_semi on the upsampled inputs."""
    keep = _keep_up(z, size, align, threshold)
    if mask is not None:
        keep &= ~mask
    xu = _up(x, size, align) if list(x.shape[2:]) != list(size) else x.double()
    xu = xu.detach().requires_grad_(True)
    nll = F.cross_entropy(xu, xu.detach().argmax(dim=1), reduction="none")
    nll = torch.where(keep, nll, torch.zeros_like(nll))
    nll.sum().backward()
    considered = keep.numel() if mask is None else int((~mask).sum())
    sums = torch.tensor([nll.sum().item(), keep.sum().item(), considered], dtype=torch.float64)
    return nll.detach(), sums, _adjoint(xu.grad, x, size, align)


# logits (N, C, h, w), D map (N, hd, wd), label grid (H, W): D at a lower resolution than the logits, D at the
# label grid, logits at the label grid with D below it
SEMI_CASES = [((2, 5, 4, 5), (2, 2, 3), (9, 11)), ((1, 7, 3, 3), (1, 9, 11), (9, 11)),
              ((2, 4, 9, 11), (2, 3, 2), (9, 11))]


@pytest.mark.parametrize("masked,threshold", [(False, 0.0), (True, 0.2), (False, 0.7)])
@pytest.mark.parametrize("align", ALIGN)
@pytest.mark.parametrize("dtype,layout", DTYPE_LAYOUTS)
@pytest.mark.parametrize("case", SEMI_CASES)
def test_upsampled_semi_cross_entropy2d(ext, case, dtype, layout, align, masked, threshold, gen):
    shape, zshape, size = case
    x = _logits(shape, dtype, layout, gen)
    z = _with_layout(_rand(zshape, gen, 2.0).to(torch.float16), layout)
    mask = _mask((shape[0], *size), gen, layout=layout) if masked else None
    sums, loss_map, grad = ext.semi_cross_entropy2d_forward(x, z, threshold, mask, True, True, list(size), align)
    ref_map, ref_sums, ref_grad = _semi_up_oracle(x, z, size, align, threshold, mask)
    _close(loss_map, ref_map, **MAP_TOL)
    _close(sums, ref_sums, **SUM_TOL)
    _up_grad_close(grad, ref_grad, x)
    sums2, map2, grad2 = ext.semi_cross_entropy2d_forward(x, z, threshold, mask, False, False, list(size), align)
    assert map2 is None and grad2 is None and torch.equal(sums2, sums)


@pytest.mark.parametrize("labelled", [True, False])
@pytest.mark.parametrize("align", ALIGN)
@pytest.mark.parametrize("dtype,layout", DTYPE_LAYOUTS)
@pytest.mark.parametrize("case", SEMI_CASES)
def test_upsampled_generator_loss(ext, case, dtype, layout, align, labelled, gen):
    shape, zshape, size = case
    n, c = shape[:2]
    x = _logits(shape, dtype, layout, gen)
    z = _with_layout(_rand(zshape, gen, 2.0).to(dtype), layout)
    t = _target((n, c, *size), gen, layout=layout) if labelled else None
    sums, gx, gz, bad = ext.generator_loss_forward(x, z, t, 0.2, IGNORE, True, True, list(size), align)
    assert bad.tolist() == [0, 0] and gz.shape == z.shape and gz.dtype == z.dtype
    zu = _up(z, size, align) if list(zshape[1:]) != list(size) else z.double()
    xu = _up(x, size, align) if list(shape[2:]) != list(size) else x.double()
    if labelled:
        _, term, count, ref_gxu = _ce_oracle(xu, t, None, IGNORE, 0.0)
        ref_gx = _adjoint(ref_gxu, x, size, align)
        adv_at = _counted(t, c, IGNORE)
        kept = considered = 0
    else:
        _, semi_sums, ref_gx = _semi_up_oracle(x, z, size, align, 0.2, None)
        term, count, kept, considered = semi_sums[0], semi_sums[1], semi_sums[1], n * size[0] * size[1]
        adv_at = torch.ones((n, *size), dtype=torch.bool)
    adv = torch.where(adv_at, _softplus_neg(zu), torch.zeros_like(zu))
    expected = torch.tensor([float(term), float(count), adv.sum().item(), adv_at.sum().item(), float(kept),
                             float(considered)], dtype=torch.float64)
    _close(sums, expected, **SUM_TOL)
    _up_grad_close(gx, ref_gx, x)
    gzu = torch.where(adv_at, torch.sigmoid(zu) - 1, torch.zeros_like(zu))
    _up_grad_close(gz, _adjoint(gzu, z, size, align), z)
    sums2, gx2, gz2, _ = ext.generator_loss_forward(x, z, t, 0.2, IGNORE, False, False, list(size), align)
    assert gx2 is None and gz2 is None and torch.equal(sums2, sums)


@pytest.mark.parametrize("target_kind", ["soft", "map", "scalar_tensor"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("align", ALIGN)
@pytest.mark.parametrize("dtype,layout", DTYPE_LAYOUTS + [(torch.float64, "contiguous")])
def test_upsampled_bce_with_logits2d(ext, dtype, layout, align, masked, target_kind, gen):
    zshape, size = (2, 3, 5), (7, 12)
    nhw = (2, *size)
    z = _with_layout(_rand(zshape, gen).to(dtype), layout)
    target, value = None, 0.3
    if target_kind == "map":
        target = _with_layout(torch.rand(nhw, generator=gen, dtype=torch.float64), layout).float()
    elif target_kind == "scalar_tensor":
        target = torch.tensor(0.8)
    mask = _mask(nhw, gen, layout=layout) if masked else None
    sums, loss_map, grad = ext.bce_with_logits2d_forward(z, target, value, mask, True, True, list(size), align)
    zu = _up(z, size, align)
    t64 = torch.full(nhw, value, dtype=torch.float64) if target is None else target.double().expand(nhw)
    keep = torch.ones(nhw, dtype=torch.bool) if mask is None else ~mask
    ref = torch.where(keep, F.binary_cross_entropy_with_logits(zu, t64, reduction="none"), torch.zeros_like(zu))
    _close(loss_map, ref, **MAP_TOL)
    _close(sums, torch.stack([ref.sum(), keep.sum().double()]), **SUM_TOL)
    gu = torch.where(keep, torch.sigmoid(zu) - t64, torch.zeros_like(zu))
    _up_grad_close(grad, _adjoint(gu, z, size, align), z)


@pytest.mark.parametrize("masks", [(False, False), (True, True)])
@pytest.mark.parametrize("align", ALIGN)
@pytest.mark.parametrize("dtype", DTYPES)
def test_upsampled_discriminator_loss(ext, dtype, align, masks, gen):
    """Fake and real at different resolutions (one of them at size), both read at size."""
    size = (9, 10)
    fake = _with_layout(_rand((3, 2, 3), gen).to(dtype), "sliced")
    real = _with_layout(_rand((2, *size), gen).to(dtype), "channels_last")
    mf = _mask((3, *size), gen) if masks[0] else None
    mr = _mask((2, *size), gen) if masks[1] else None
    sums, fake_grad, real_grad = ext.discriminator_loss_forward(fake, real, mf, mr, True, True, list(size), align)
    expected, grads = [], []
    for d, m, label in ((fake, mf, 0.0), (real, mr, 1.0)):
        du = _up(d, size, align) if list(d.shape[1:]) != list(size) else d.double()
        keep = torch.ones(du.shape, dtype=torch.bool) if m is None else ~m
        loss = F.binary_cross_entropy_with_logits(du, torch.full_like(du, label), reduction="none")
        expected += [torch.where(keep, loss, torch.zeros_like(loss)).sum().item(), keep.sum().item()]
        g = torch.where(keep, torch.sigmoid(du) - label, torch.zeros_like(du))
        grads.append(_adjoint(g, d, size, align))
    _close(sums, torch.tensor(expected, dtype=torch.float64), **SUM_TOL)
    _up_grad_close(fake_grad, grads[0], fake)
    _up_grad_close(real_grad, grads[1], real)


def test_upsampled_empty_batch(ext):
    x = torch.empty((0, 4, 3, 5))
    t = torch.empty((0, 7, 9), dtype=torch.int64)
    sums, loss_map, grad, bad = ext.cross_entropy2d_forward(x, t, None, IGNORE, 0.0, True, True, [7, 9], False)
    assert sums.tolist() == [0.0, 0.0] and bad.tolist() == [0, 0]
    assert loss_map.shape == (0, 7, 9) and grad.shape == x.shape
    assert ext.softmax2d_forward(x, [7, 9], True).shape == (0, 4, 7, 9)
    sums, gx, gz, _ = ext.generator_loss_forward(x, torch.empty((0, 2, 2)), None, 0.2, IGNORE, True, True, [7, 9],
                                                 False)
    assert sums.tolist() == [0.0] * 6 and gx.shape == x.shape and gz.shape == (0, 2, 2)


def test_upsampled_results_are_deterministic(ext, gen):
    shape, size = (2, 5, 4, 6), (11, 13)
    x = _logits(shape, torch.bfloat16, "channels_last", gen)
    t = _target((2, 5, *size), gen)
    z = _rand((2, 3, 2), gen).float()
    first = ext.generator_loss_forward(x, z, t, 0.2, IGNORE, True, True, list(size), True)
    again = ext.generator_loss_forward(x, z, t, 0.2, IGNORE, True, True, list(size), True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


# ------------------------------------------------------------------------------- pseudo_label_cross_entropy2d
# The student's -log softmax[y], y = argmax of the teacher (the student itself when None), kept where not masked,
# where the teacher's max softmax >= tau (when given) and where sigmoid(z) > T (when z is given): the oracle is
# that definition in float64 on the inputs as the kernels see them (upsampled in float32 by F.interpolate).
# The confidence test is decided in float32 by the kernels: tau is drawn at least 1e-4 away from every pixel's
# float64 confidence, so no pixel sits at the boundary.

def _at(t, grid, align):
    """t as the op sees it at the label grid, in float64: upsampled from its own grid, or as stored."""
    return t.double() if list(t.shape[-2:]) == list(grid) else _up(t, grid, align)


def _confidence(t):
    """(max softmax, argmax) per pixel of (N, C, H, W) logits, float64; NaN where a channel difference is NaN."""
    return 1.0 / torch.exp(t - t.max(dim=1, keepdim=True).values).sum(dim=1), t.argmax(dim=1)


def _tau_clear_of(confidence, want):
    """A tau near `want` at least 1e-4 from every finite confidence."""
    conf = confidence[torch.isfinite(confidence)]
    for k in range(5000):
        for tau in (want + k * 1e-4, want - k * 1e-4):
            if 0.0 < tau < 1.0 and (conf.numel() == 0 or float((conf - tau).abs().min()) > 1e-4):
                return tau
    raise AssertionError("no tau clear of the confidences")


def _pl_oracle(x, teacher, z, tau, d_threshold, mask, grid, align=False):
    """(loss map, [sum, kept, considered], (gradient at x's grid, its scale)) of the pseudo-label loss."""
    xu = _at(x, grid, align)
    conf, y = _confidence(xu if teacher is None else _at(teacher, grid, align))
    keep = torch.ones(y.shape, dtype=torch.bool) if mask is None else ~mask
    if tau is not None:
        keep &= conf >= tau
    if z is not None:
        keep &= _keep_up(z, grid, align, d_threshold)
    xl = xu.detach().requires_grad_(True)
    nll = F.cross_entropy(xl, y, reduction="none")
    nll = torch.where(keep, nll, torch.zeros_like(nll))
    nll.sum().backward()
    considered = keep.numel() if mask is None else int((~mask).sum())
    sums = torch.tensor([nll.sum().item(), keep.sum().item(), considered], dtype=torch.float64)
    return nll.detach(), sums, _adjoint(xl.grad, x, grid, align)


def _check_pseudo_label(ext, x, teacher, z, tau, mask, grid, align, d_threshold=0.3):
    size = None if list(grid) == list(x.shape[2:]) and (teacher is None or list(teacher.shape[2:]) == list(grid)) \
        and (z is None or list(z.shape[1:]) == list(grid)) else list(grid)
    sums, loss_map, grad = ext.pseudo_label_cross_entropy2d_forward(x, teacher, z, tau, d_threshold, mask, True,
                                                                    True, size, align)
    ref_map, ref_sums, ref_grad = _pl_oracle(x, teacher, z, tau, d_threshold, mask, grid, align)
    assert sums.dtype == torch.float32 and sums.shape == (3,)
    assert loss_map.shape == (x.shape[0], *grid) and loss_map.dtype == torch.float32
    _close(loss_map, ref_map, **MAP_TOL)
    _close(sums, ref_sums, **SUM_TOL)
    _up_grad_close(grad, ref_grad, x)
    assert torch.count_nonzero(loss_map[ref_map == 0]) == 0
    sums2, map2, grad2 = ext.pseudo_label_cross_entropy2d_forward(x, teacher, z, tau, d_threshold, mask, False,
                                                                  False, size, align)
    assert map2 is None and grad2 is None and torch.equal(sums2, sums)
    return sums


def _tau_for(x, teacher, grid, align, want):
    return None if want is None else _tau_clear_of(_confidence(_at(x if teacher is None else teacher, grid,
                                                                       align))[0], want)


@pytest.mark.parametrize("want_tau", [None, 0.6])
@pytest.mark.parametrize("with_d", [False, True])
@pytest.mark.parametrize("with_teacher", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pseudo_label_cross_entropy2d(ext, dtype, layout, with_teacher, with_d, want_tau, gen):
    shape = (2, 7, 9, 11)
    x = _logits(shape, dtype, layout, gen)
    teacher = _logits(shape, dtype, layout, gen, scale=2.0) if with_teacher else None
    z = _with_layout(_rand((2, 9, 11), gen, 2.0).to(torch.float16), layout) if with_d else None
    mask = _mask((2, 9, 11), gen, layout=layout)
    tau = _tau_for(x, teacher, shape[2:], False, want_tau)
    sums = _check_pseudo_label(ext, x, teacher, z, tau, mask, shape[2:], False)
    if tau is not None or with_d:  # some pixels kept, some not: both sides of the tests are exercised
        assert 0 < sums[1] < sums[2]
    else:
        assert sums[1] == sums[2]


@pytest.mark.parametrize("with_teacher", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_pseudo_label_cross_entropy2d_odd_shapes(ext, shape, with_teacher, gen):
    n, c, h, w = shape
    x = _logits(shape, torch.float32, "channels_last", gen)
    teacher = _logits(shape, torch.float32, "sliced", gen, scale=1.0) if with_teacher else None
    z = _rand((n, h, w), gen, 2.0).float()
    tau = _tau_for(x, teacher, (h, w), False, 0.5)
    _check_pseudo_label(ext, x, teacher, z, tau, None, (h, w), False)


# logits (N, C, h, w), teacher (N, C, ht, wt) or None, D map (N, hd, wd) or None, label grid (H, W): each at its
# own grid, some at the label grid, non-integer factors, downsampling, C = 1
PSEUDO_CASES = [((2, 5, 4, 5), (2, 5, 3, 3), (2, 2, 3), (9, 11)),     # all three below the grid, all different
                ((1, 7, 3, 3), (1, 7, 9, 11), (1, 9, 11), (9, 11)),   # only the student upsampled
                ((2, 4, 9, 11), (2, 4, 2, 5), (2, 3, 2), (9, 11)),    # the student at the grid, the teacher not
                ((2, 6, 5, 4), None, (2, 1, 1), (13, 7)),              # self-training, D at 1x1
                ((1, 3, 11, 9), (1, 3, 4, 6), None, (5, 6)),           # downsampling, no D
                ((2, 1, 2, 3), (2, 1, 3, 2), (2, 2, 2), (5, 7)),       # C = 1: always confident, loss 0
                ((2, 3, 5, 7), (2, 3, 1, 1), (2, 5, 7), (13, 17)),     # a 1x1 teacher, D at the student's grid
                ((1, 21, 1, 1), None, None, (4, 3))]                   # 1x1 -> 4x3, C = 21


@pytest.mark.parametrize("want_tau", [None, 0.55])
@pytest.mark.parametrize("align", ALIGN)
@pytest.mark.parametrize("dtype,layout", DTYPE_LAYOUTS)
@pytest.mark.parametrize("case", PSEUDO_CASES)
def test_upsampled_pseudo_label_cross_entropy2d(ext, case, dtype, layout, align, want_tau, gen):
    shape, tshape, zshape, size = case
    x = _logits(shape, dtype, layout, gen)
    teacher = None if tshape is None else _logits(tshape, dtype, layout, gen, scale=2.0)
    z = None if zshape is None else _with_layout(_rand(zshape, gen, 2.0).to(torch.bfloat16), layout)
    mask = _mask((shape[0], *size), gen, layout=layout)
    tau = _tau_for(x, teacher, size, align, want_tau)
    _check_pseudo_label(ext, x, teacher, z, tau, mask, size, align)


@pytest.mark.parametrize("size", [None, [13, 11]])
def test_pseudo_label_without_teacher_or_tau_is_semi_bit_for_bit(ext, size, gen):
    """With the D test and no confidence test, the self-training loss is L_semi: the very same bits."""
    shape = (2, 5, 7, 9) if size is None else (2, 5, 4, 6)
    x = _logits(shape, torch.float16, "channels_last", gen)
    z = _rand((2, 7, 9) if size is None else (2, 3, 2), gen, 2.0).float()
    m = _mask((2, 7, 9) if size is None else (2, *size), gen)
    for align in ALIGN:
        pl = ext.pseudo_label_cross_entropy2d_forward(x, None, z, None, 0.2, m, True, True, size, align)
        semi = ext.semi_cross_entropy2d_forward(x, z, 0.2, m, True, True, size, align)
        assert all(torch.equal(a, b) for a, b in zip(pl, semi))


@pytest.mark.parametrize("size", [None, [11, 13]])
def test_pseudo_label_teacher_equal_to_the_student_gives_the_same_bits(ext, size, gen):
    """The teacher read separately (a copy of the logits) or not at all (None): the same results to the bit, which
    is what lets the backend drop a teacher that is the logits themselves."""
    shape = (2, 6, 5, 7)
    x = _logits(shape, torch.bfloat16, "sliced", gen)
    x[0, :, 1, 2] = float("nan")
    x[1, 3, 0, 0] = float("inf")
    copy = x.clone()
    for tau in (None, 0.45):
        own = ext.pseudo_label_cross_entropy2d_forward(x, None, None, tau, 0.2, None, True, True, size, True)
        sep = ext.pseudo_label_cross_entropy2d_forward(x, copy, None, tau, 0.2, None, True, True, size, True)
        for a, b in zip(own, sep):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("with_teacher", [False, True])
def test_pseudo_label_non_finite_logits_like_the_reference(ext, with_teacher):
    """NaN/Inf teacher logits: never confident under a tau (their confidence is NaN, all -inf included); without
    a tau the pseudo-label is their argmax (a NaN counts as the maximum) and the student's loss there as PyTorch
    gives it. NaN student logits reach the loss only where the pixel is kept."""
    inf, nan = float("inf"), float("nan")
    rows = [[inf, 1.0, 2.0, 0.0], [-inf, -inf, 3.0, 1.0], [-inf, -inf, -inf, -inf], [nan, 1.0, 2.0, 3.0],
            [0.5, -inf, 2.0, -inf], [1.0, 2.0, 3.0, 4.0], [20.0, 0.0, 0.0, 0.0], [-inf, 2.0, 2.0, -inf]]
    t = torch.tensor(rows, dtype=torch.float64).T.reshape(1, 4, 1, len(rows)).float()
    student = torch.tensor([[0.3, -1.0, 2.0, 0.5]] * len(rows), dtype=torch.float64).T.reshape(1, 4, 1, len(rows))
    x = student.float() if with_teacher else t
    teacher = t if with_teacher else None
    confidence, _ = _confidence(t.double())
    for tau in (None, 0.0, 0.3, 0.9):
        sums, loss_map, grad = ext.pseudo_label_cross_entropy2d_forward(x, teacher, None, tau, 0.2, None, True, True)
        ref_map, ref_sums, _ = _pl_oracle(x, teacher, None, tau, 0.2, None, (1, len(rows)))
        _close(loss_map, ref_map, **MAP_TOL)
        keep = torch.ones_like(confidence, dtype=torch.bool) if tau is None else confidence >= tau
        assert sums[1].item() == keep.sum().item() == ref_sums[1].item()
        if tau is not None:
            assert not keep[0, 0, [0, 2, 3]].any()  # +inf, all -inf, NaN: never confident
            assert keep[0, 0, 1] == (tau < 0.88)    # -inf next to a finite maximum: 1 / (1 + e**-2)
        assert torch.all(grad.permute(0, 2, 3, 1)[~keep] == 0)
        if with_teacher and tau is not None:        # finite student logits at the kept pixels
            assert torch.isfinite(sums).all() and torch.isfinite(grad).all()
            _close(sums, ref_sums, **SUM_TOL)


def test_pseudo_label_reads_logits_only_where_needed(ext, gen):
    """NaN student logits where the teacher is not confident, NaN teacher logits where D rejects the pixel, NaN z
    where the pixel is ignored: none reaches the sums, the map or the gradient."""
    shape = (1, 5, 4, 6)
    x = _rand(shape, gen).float()
    teacher = _rand(shape, gen, 0.1).float()  # nearly uniform: never confident at tau 0.9 ...
    teacher[0, 2, 0, :] = 40.0                # ... but on row 0
    z = torch.full((1, 4, 6), 5.0)
    z[0, 0, 5] = -5.0                         # D rejects (0, 5)
    teacher[0, :, 0, 5] = float("nan")
    x[0, :, 1:, :] = float("nan")             # rows 1.. are not confident
    mask = torch.zeros((1, 4, 6), dtype=torch.bool)
    mask[0, 0, 4] = True
    z[0, 0, 4] = float("nan")                 # ignored
    sums, loss_map, grad = ext.pseudo_label_cross_entropy2d_forward(x, teacher, z, 0.9, 0.2, mask, True, True)
    assert sums[1:].tolist() == [4.0, 23.0]
    assert torch.isfinite(sums).all() and torch.isfinite(loss_map).all() and torch.isfinite(grad).all()
    ref_map, ref_sums, (ref_grad, _) = _pl_oracle(torch.nan_to_num(x), teacher.nan_to_num(), z.nan_to_num(), 0.9,
                                                  0.2, mask, (4, 6))
    _close(loss_map, ref_map, **MAP_TOL)
    _close(sums, ref_sums, **SUM_TOL)
    _grad_close(grad, ref_grad, torch.float32)
    assert torch.count_nonzero(grad[0, :, 1:]) == 0


@pytest.mark.parametrize("size", [None, [7, 9]])
def test_pseudo_label_tau_extremes_nothing_kept_and_all_ignored(ext, size, gen):
    shape = (2, 4, 7, 9) if size is None else (2, 4, 3, 4)
    x = _rand(shape, gen).float()
    x[0] = 0.0
    x[0, 1] = 200.0  # image 0: a confidence of exactly 1 in float32 at every pixel, also interpolated
    grid = (7, 9)
    # tau = 1: only the pixels whose float32 confidence is exactly 1; tau = 0: every pixel
    for tau, kept in ((1.0, 7 * 9), (0.0, 2 * 7 * 9)):
        sums, loss_map, grad = ext.pseudo_label_cross_entropy2d_forward(x, None, None, tau, 0.2, None, True, True,
                                                                        size, False)
        ref_map, ref_sums, ref_grad = _pl_oracle(x, None, None, tau, 0.2, None, grid)
        assert sums[1].item() == kept
        _close(sums, ref_sums, **SUM_TOL)
        _close(loss_map, ref_map, **MAP_TOL)
        _up_grad_close(grad, ref_grad, x)
    # a teacher that is never confident at tau 0.9: zero sums but the considered count, an all-zero gradient
    teacher = torch.zeros(shape)
    sums, loss_map, grad = ext.pseudo_label_cross_entropy2d_forward(x, teacher, None, 0.9, 0.2, None, True, True,
                                                                    size, True)
    assert sums.tolist() == [0.0, 0.0, 126.0]
    assert torch.count_nonzero(loss_map) == 0 and torch.count_nonzero(grad) == 0
    # all ignored, NaN logits included: nothing considered
    x[1, :, 1, 1] = float("nan")
    m = torch.ones((2, *grid), dtype=torch.bool)
    sums, loss_map, grad = ext.pseudo_label_cross_entropy2d_forward(x, None, torch.zeros(2, 1, 1), None, 0.2, m,
                                                                    True, True, [7, 9], False)
    assert sums.tolist() == [0.0, 0.0, 0.0] and torch.count_nonzero(grad) == 0


def test_upsampled_pseudo_label_empty_batch_and_determinism(ext, gen):
    x = torch.empty((0, 4, 3, 5))
    sums, loss_map, grad = ext.pseudo_label_cross_entropy2d_forward(x, torch.empty((0, 4, 2, 2)), torch.empty((0, 2, 2)),
                                                                    0.5, 0.2, None, True, True, [7, 9], False)
    assert sums.tolist() == [0.0] * 3 and loss_map.shape == (0, 7, 9) and grad.shape == x.shape
    x = _logits((2, 5, 4, 6), torch.bfloat16, "channels_last", gen)
    teacher = _logits((2, 5, 3, 3), torch.bfloat16, "contiguous", gen)
    z = _rand((2, 3, 2), gen).float()
    first = ext.pseudo_label_cross_entropy2d_forward(x, teacher, z, 0.4, 0.2, None, True, True, [11, 13], True)
    again = ext.pseudo_label_cross_entropy2d_forward(x, teacher, z, 0.4, 0.2, None, True, True, [11, 13], True)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
