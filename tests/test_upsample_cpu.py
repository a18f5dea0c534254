"""The ``cpu`` backend's fused bilinear upsampling, its launches called directly.

Every launch over logits or D maps takes ``size=(H, W)`` and ``align_corners``: inputs at another spatial size are
resized inside the kernel as ``F.interpolate(x.float(), size, mode="bilinear", align_corners=a)`` would, and the
gradients come back at the inputs' own (low) resolution. Each result is compared with the same op applied to the
interpolated input in float64 (values, loss maps, counts) and with ``torch.autograd.grad`` through that float64
composition (gradients), on fresh random inputs: odd shapes, factors that are not integers, downsampling, layouts,
half dtypes, logits and D maps at different low resolutions. Also: the resize weights equal PyTorch's bit for
bit, an input already at ``size`` gives exactly the plain op's result, results are bit-identical across runs and
thread counts, and the native boundary checks the new arguments.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fastadvseg as fas
from fastadvseg._keep import keep_mask
from helpers import RTOL, layout_4d

pytestmark = pytest.mark.skipif("cpu" not in fas.available_backends("cpu"),
                                reason=f"cpu backend not built: {fas.unavailable_reason('cpu')}")

if "cpu" in fas.available_backends("cpu"):
    from fastadvseg.backends import cpu
    from fastadvseg import _C_cpu as ext

IGNORE = 255
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (low (h, w), full (H, W)): factors that are not integers, an integer one, one axis kept, downsampling,
# single-pixel rows and columns
RESIZES = [((5, 7), (17, 23)), ((3, 4), (12, 16)), ((6, 5), (6, 11)), ((13, 11), (5, 4)), ((1, 3), (4, 7)),
           ((4, 1), (9, 1))]


def resize_matrix(n_in, n_out, align_corners):
    """(n_out, n_in) float64 matrix of PyTorch's float32 bilinear weights along one axis (the identity basis
    interpolated: its weights exactly)."""
    basis = torch.eye(n_in).reshape(n_in, 1, 1, n_in)
    return F.interpolate(basis, size=(1, n_out), mode="bilinear", align_corners=align_corners)[:, 0, 0].T.double()


def up(x, size, align_corners):
    """The reference resize of a (N, C, h, w) or (N, h, w) tensor: F.interpolate's float32 weights (its float32
    interpolation, as the kernels do), the products and sums in float64; differentiable."""
    mh = resize_matrix(x.shape[-2], size[0], align_corners)
    mw = resize_matrix(x.shape[-1], size[1], align_corners)
    return torch.einsum("Hh,...hw,Ww->...HW", mh, x.double(), mw)


def up32(z, size, align_corners):
    """A D map resized in float32, as the keep rule sees it."""
    return F.interpolate(z[:, None].float(), size=size, mode="bilinear", align_corners=align_corners)[:, 0]


def low_leaf(x):
    return x.detach().double().requires_grad_()


def close(actual, expected, dtype=torch.float32, what="", slack=1.0):
    """Float32: 1e-5 relative, 1e-6 absolute per unit of the largest expected value; half dtypes: their rounding."""
    actual = actual.detach().double()
    expected = expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    rtol = (1e-5 if dtype == torch.float32 else RTOL[dtype]) * slack
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
    atol = (1e-6 if dtype == torch.float32 else RTOL[dtype]) * scale * slack
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def logits(shape, dtype, gen, layout="contiguous", scale=3.0):
    return layout_4d((torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype), layout)


def labels(n, size, c, gen, ignore_frac=0.2):
    t = torch.randint(0, c, (n,) + tuple(size), generator=gen)
    t[torch.rand((n,) + tuple(size), generator=gen) < ignore_frac] = IGNORE
    return t


def d_map(n, size, gen, scale=2.0):
    """D's logits, with a confident and an unconfident pixel in each map (the keep rule sees both)."""
    z = torch.randn((n,) + tuple(size), generator=gen, dtype=torch.float64).float() * scale
    z[:, 0, 0] = -3.0
    z[:, -1, -1] = 3.0
    return z


def nll_map(x_full, label_map):
    """-log softmax at label_map (N, H, W) of float64 logits x_full (N, C, H, W)."""
    logp = torch.log_softmax(x_full, dim=1)
    return -logp.gather(1, label_map.clamp(0, x_full.shape[1] - 1).unsqueeze(1)).squeeze(1)


def ce_reference(x_full, target, weight, eps):
    """(loss map, weight sum) of PyTorch's cross-entropy with class weights and label smoothing, float64."""
    c = x_full.shape[1]
    valid = (target != IGNORE) & (target >= 0) & (target < c)
    w = torch.ones(c, dtype=torch.float64) if weight is None else weight.double()
    w_y = torch.where(valid, w[target.clamp(0, c - 1)], 0.0)
    loss = nll_map(x_full, target) * w_y
    if eps:
        logp = torch.log_softmax(x_full, dim=1)
        smooth = -(logp * w.view(1, c, 1, 1)).sum(1)
        loss = (1 - eps) * loss + eps / c * smooth
    return torch.where(valid, loss, 0.0), w_y.sum()


# ---- the resize itself ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("n_in,n_out", [(41, 321), (5, 17), (11, 321), (7, 7), (17, 5), (321, 41), (3, 1), (1, 4),
                                        (13, 64), (97, 769), (6, 40), (2, 3)])
def test_resize_weights_equal_pytorchs_bit_for_bit(n_in, n_out, align_corners):
    """Interpolating the identity basis gives each output's weights exactly: the kernels' tables must be them."""
    i0, i1, l0, l1 = ext.resize_axis(n_in, n_out, align_corners)
    ours = torch.zeros(n_out, n_in)
    for d in range(n_out):
        ours[d, i0[d]] += l0[d]
        ours[d, i1[d]] += l1[d]
    basis = torch.eye(n_in).reshape(n_in, 1, 1, n_in)
    theirs = F.interpolate(basis, size=(1, n_out), mode="bilinear", align_corners=align_corners)[:, 0, 0].T
    assert torch.equal(ours, theirs)


# ---- softmax2d --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("low,full", RESIZES)
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax2d_forward_and_backward(low, full, align_corners, dtype, gen):
    n, c = 2, 5
    x = logits((n, c) + low, dtype, gen)
    y = cpu.softmax2d(x, size=full, align_corners=align_corners)
    assert y.shape == (n, c) + full and y.dtype == dtype
    close(y, torch.softmax(up(x, full, align_corners), dim=1), dtype, "probs")

    # backward, from the kernel's own probabilities: y * (gy - sum_c y gy), then the adjoint of the resize
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)
    gx = cpu.softmax2d_backward(y, gy, low_size=low, align_corners=align_corners)
    assert gx.shape == x.shape and gx.dtype == dtype
    y64, gy64 = y.double(), gy.double()
    g_full = y64 * (gy64 - (y64 * gy64).sum(1, keepdim=True))
    leaf = low_leaf(x)
    want, = torch.autograd.grad(up(leaf, full, align_corners), leaf, g_full)
    close(gx, want, dtype, "grad")


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_softmax2d_layouts(layout, gen):
    x0 = logits((2, 6, 5, 9), torch.float32, gen)
    x = layout_4d(x0, layout)
    y = cpu.softmax2d(x, size=(13, 19), align_corners=True)
    assert torch.equal(y.contiguous(), cpu.softmax2d(x0, size=(13, 19), align_corners=True))
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    gy = layout_4d(torch.randn(y.shape, generator=gen), layout)
    probs = layout_4d(y.contiguous(), layout)
    gx = cpu.softmax2d_backward(probs, gy, low_size=(5, 9), align_corners=True)
    gx0 = cpu.softmax2d_backward(y.contiguous(), gy.contiguous(), low_size=(5, 9), align_corners=True)
    assert torch.equal(gx.contiguous(), gx0)


@pytest.fixture
def stream_bytes():
    yield ext.set_stream_bytes
    ext.set_stream_bytes(0)


@pytest.mark.parametrize("n_c_low_full", [(2, 5, (3, 20), (7, 160)), (1, 3, (5, 9), (9, 64)),
                                          (1, 21, (41, 41), (321, 321))])
def test_softmax2d_streamed_probs_equal_ordinary_stores(n_c_low_full, stream_bytes, gen):
    """Full-resolution probabilities large enough (forced here) are written with streaming stores where the
    build has them: bit-identical to ordinary stores, rows of one block and of several."""
    n, c, low, full = n_c_low_full
    x = logits((n, c) + low, torch.float32, gen)
    stream_bytes(1)
    streamed = cpu.softmax2d(x, size=full, align_corners=True)
    stream_bytes(1 << 62)
    ordinary = cpu.softmax2d(x, size=full, align_corners=True)
    assert torch.equal(streamed, ordinary)
    close(streamed, torch.softmax(up(x, full, True), dim=1), what="probs")


# ---- cross_entropy2d ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("low,full", RESIZES)
@pytest.mark.parametrize("align_corners", [False, True])
def test_cross_entropy2d(low, full, align_corners, gen):
    n, c = 2, 7
    x = logits((n, c) + low, torch.float32, gen)
    t = labels(n, full, c, gen)
    out = cpu.cross_entropy2d(x, t, None, IGNORE, 0.0, "sum", True, size=full, align_corners=align_corners)
    leaf = low_leaf(x)
    loss_map, count = ce_reference(up(leaf, full, align_corners), t, None, 0.0)
    close(out.sums[0], loss_map.sum(), what="loss sum")
    assert out.sums[1].item() == count.item()
    assert out.grad.shape == x.shape and out.scales.item() == 1.0
    want, = torch.autograd.grad(loss_map.sum(), leaf)
    close(out.grad, want, what="grad")
    assert out.bad == (0, 0)

    none = cpu.cross_entropy2d(x, t, None, IGNORE, 0.0, "none", False, size=full, align_corners=align_corners)
    assert none.grad is None
    close(none.loss_map, loss_map, what="loss map")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("options", ["weight", "smoothing", "weight+smoothing", "ignore_index"])
def test_cross_entropy2d_options_layouts_dtypes(dtype, layout, options, gen):
    n, c, low, full = 2, 6, (6, 5), (19, 14)
    x = logits((n, c) + low, dtype, gen, layout)
    ignore = 2 if options == "ignore_index" else IGNORE
    t = labels(n, full, c, gen)
    if options == "ignore_index":
        t[t == IGNORE] = ignore
    weight = torch.rand(c, generator=gen) + 0.5 if "weight" in options else None
    eps = 0.2 if "smoothing" in options else 0.0
    out = cpu.cross_entropy2d(x, t, weight, ignore, eps, "mean", True, size=full, align_corners=False)
    leaf = low_leaf(x)
    x_full = up(leaf, full, False)
    c_ = x_full.shape[1]
    valid = (t != ignore) & (t >= 0) & (t < c_)
    w = torch.ones(c_, dtype=torch.float64) if weight is None else weight.double()
    w_y = torch.where(valid, w[t.clamp(0, c_ - 1)], 0.0)
    logp = torch.log_softmax(x_full, dim=1)
    loss = -logp.gather(1, t.clamp(0, c_ - 1).unsqueeze(1)).squeeze(1) * w_y
    if eps:
        loss = (1 - eps) * loss + eps / c_ * -(logp * w.view(1, c_, 1, 1)).sum(1)
    loss = torch.where(valid, loss, 0.0)
    close(out.sums[0], loss.sum(), dtype, "loss sum")
    close(out.sums[1], w_y.sum(), what="weight sum")
    # a mean's gradient comes pre-scaled by 1 / (weight sum): compare the gradient of the sum
    want, = torch.autograd.grad(loss.sum(), leaf)
    assert out.grad.dtype == dtype and out.grad.shape == x.shape
    close(out.grad.double() / out.scales.item(), want, dtype, "grad")
    close(out.scales[0], 1.0 / w_y.sum(), what="pre-scale")


def test_cross_entropy2d_paper_shape(gen):
    """DeepLab's 1/8 logits (41 x 41) to the 321 x 321 crop, 21 classes."""
    x = logits((1, 21, 41, 41), torch.float32, gen)
    t = labels(1, (321, 321), 21, gen)
    out = cpu.cross_entropy2d(x, t, None, IGNORE, 0.0, "sum", True, size=(321, 321), align_corners=True)
    leaf = low_leaf(x)
    loss_map, _ = ce_reference(up(leaf, (321, 321), True), t, None, 0.0)
    close(out.sums[0], loss_map.sum(), what="loss sum")
    want, = torch.autograd.grad(loss_map.sum(), leaf)
    close(out.grad, want, what="grad")


def test_many_classes_blocks_narrower_than_a_pixel_vector(gen):
    """C = 520: blocks of 8 pixels, less than one pixel vector of the AVX-512 build."""
    x = logits((1, 520, 3, 4), torch.float32, gen)
    t = labels(1, (7, 19), 520, gen)
    out = cpu.cross_entropy2d(x, t, None, IGNORE, 0.0, "sum", True, size=(7, 19), align_corners=False)
    leaf = low_leaf(x)
    loss_map, _ = ce_reference(up(leaf, (7, 19), False), t, None, 0.0)
    close(out.sums[0], loss_map.sum(), what="loss sum")
    want, = torch.autograd.grad(loss_map.sum(), leaf)
    close(out.grad, want, what="grad")


def test_bad_labels_are_reported_at_full_resolution(gen):
    x = logits((2, 4, 3, 5), torch.float32, gen)
    t = labels(2, (7, 9), 4, gen)
    t[1, 5, 6] = 9
    t[1, 6, 0] = -3
    out = cpu.cross_entropy2d(x, t, None, IGNORE, 0.0, "mean", True, size=(7, 9), align_corners=False)
    assert out.bad == (2, 9)


def test_nan_logits_whose_pixels_are_all_ignored_stay_out(gen):
    """A NaN low-resolution logit reaches the full-resolution pixels it is interpolated into; where all of them
    are ignored, loss and gradient stay finite (the kernels select, never multiply by 0)."""
    x = logits((1, 3, 4, 4), torch.float32, gen)
    x[0, 1, 2, 2] = float("nan")
    t = labels(1, (13, 13), 3, gen, ignore_frac=0.0)
    i0, i1, _, _ = ext.resize_axis(4, 13, True)
    reads = [d for d in range(13) if 2 in (i0[d], i1[d])]
    t[0, min(reads):max(reads) + 1, min(reads):max(reads) + 1] = IGNORE
    out = cpu.cross_entropy2d(x, t, None, IGNORE, 0.0, "sum", True, size=(13, 13), align_corners=True)
    assert torch.isfinite(out.sums).all() and torch.isfinite(out.grad).all()
    clean = x.clone()
    clean[0, 1, 2, 2] = 0.0
    leaf = low_leaf(clean)
    loss_map, _ = ce_reference(up(leaf, (13, 13), True), t, None, 0.0)
    close(out.sums[0], loss_map.sum(), what="loss sum")
    want, = torch.autograd.grad(loss_map.sum(), leaf)
    want[0, 1, 2, 2] = 0.0  # (its pixels are all ignored)
    close(out.grad, want, what="grad")


# ---- semi_cross_entropy2d and generator_loss: logits and D at different low resolutions ------------------------

def semi_reference(x_full, z32_full, threshold, mask):
    """(loss map, kept, considered): -log p[argmax] where sigmoid(z) > T (the keep rule on float32 z)."""
    keep = keep_mask(z32_full, threshold)
    considered = keep.numel()
    if mask is not None:
        keep = keep & ~mask
        considered = int((~mask).sum())
    nll = nll_map(x_full, x_full.detach().argmax(1))
    return torch.where(keep, nll, 0.0), int(keep.sum()), considered


@pytest.mark.parametrize("x_low,z_low,full", [((5, 6), (2, 3), (17, 19)), ((4, 4), (4, 4), (9, 9)),
                                              ((9, 9), (3, 5), (9, 9)), ((7, 3), (11, 13), (6, 8))])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_semi_cross_entropy2d(x_low, z_low, full, align_corners, with_mask, gen):
    n, c = 2, 5
    x = logits((n, c) + x_low, torch.float32, gen)
    z = d_map(n, z_low, gen)
    mask = torch.rand((n,) + full, generator=gen) < 0.3 if with_mask else None
    out = cpu.semi_cross_entropy2d(x, z, 0.3, mask, "sum", True, size=full, align_corners=align_corners)
    leaf = low_leaf(x)
    loss_map, kept, considered = semi_reference(up(leaf, full, align_corners), up32(z, full, align_corners), 0.3,
                                                mask)
    assert 0 < kept < n * full[0] * full[1]
    assert (out.sums[1].item(), out.sums[2].item()) == (kept, considered)
    close(out.sums[0], loss_map.sum(), what="loss sum")
    want, = torch.autograd.grad(loss_map.sum(), leaf)
    close(out.grad, want, what="grad")
    mean = cpu.semi_cross_entropy2d(x, z, 0.3, mask, "mean", True, size=full, align_corners=align_corners)
    close(mean.grad.double() / mean.scales.item(), want, what="mean's grad")
    close(mean.scales[0], torch.tensor(1.0 / kept), what="pre-scale")


def adv_reference(z_full, valid):
    """BCE(z, 1) per pixel (float64), 0 where not valid."""
    return torch.where(valid, F.binary_cross_entropy_with_logits(z_full, torch.ones_like(z_full), reduction="none"),
                       0.0)


@pytest.mark.parametrize("x_low,z_low,full", [((5, 6), (2, 3), (17, 19)), ((41, 41), (11, 11), (65, 65)),
                                              ((9, 9), (3, 5), (9, 9)), ((7, 7), (7, 7), (20, 15)),
                                              ((6, 8), (12, 15), (5, 7))])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("labelled", [True, False])
def test_generator_loss(x_low, z_low, full, align_corners, labelled, gen):
    n, c = 2, 5
    x = logits((n, c) + x_low, torch.float32, gen)
    z = d_map(n, z_low, gen)
    t = labels(n, full, c, gen) if labelled else None
    lam_adv, lam_semi, threshold = 0.01, 0.1, 0.2
    out = cpu.generator_loss(x, z, t, lam_adv, lam_semi, threshold, IGNORE, True, True, size=full,
                             align_corners=align_corners)
    assert out.grad.shape == x.shape and out.grad_d.shape == z.shape and out.grad_d.dtype == torch.float32
    leaf, zleaf = low_leaf(x), low_leaf(z)
    x_full, z_full = up(leaf, full, align_corners), up(zleaf, full, align_corners)
    if labelled:
        term, count = ce_reference(x_full, t, None, 0.0)
        adv = adv_reference(z_full, t != IGNORE)
        adv_count = count
        kept = considered = 0
    else:
        term, kept, considered = semi_reference(x_full, up32(z, full, align_corners), threshold, None)
        count = kept
        adv = adv_reference(z_full, torch.ones_like(z_full, dtype=torch.bool))
        adv_count = z_full.numel()
    close(out.sums[0], term.sum(), what="term sum")
    close(out.sums[2], adv.sum(), what="adv sum")
    assert out.sums[1].item() == float(count) and out.sums[3].item() == float(adv_count)
    assert (out.sums[4].item(), out.sums[5].item()) == (float(kept), float(considered))
    gx, = torch.autograd.grad(term.sum(), leaf)
    gz, = torch.autograd.grad(adv.sum(), zleaf)
    close(out.grad.double() / out.scales[0].item(), gx, what="grad of the term")
    close(out.grad_d.double() / out.scales[1].item(), gz, what="grad of the adversarial term")


@pytest.mark.parametrize("store_gx,store_gz", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("labelled", [True, False])
def test_generator_loss_stores_only_the_gradients_asked_for(store_gx, store_gz, labelled, gen):
    x = logits((2, 4, 5, 6), torch.float32, gen)
    z = d_map(2, (3, 2), gen)
    t = labels(2, (13, 17), 4, gen) if labelled else None
    both = cpu.generator_loss(x, z, t, 0.01, 0.1, 0.2, IGNORE, True, True, size=(13, 17), align_corners=False)
    out = cpu.generator_loss(x, z, t, 0.01, 0.1, 0.2, IGNORE, store_gx, store_gz, size=(13, 17),
                             align_corners=False)
    assert torch.equal(out.sums, both.sums)
    assert (out.grad is not None) == store_gx and (out.grad_d is not None) == store_gz
    if store_gx:
        assert torch.equal(out.grad, both.grad)
    if store_gz:
        assert torch.equal(out.grad_d, both.grad_d)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_generator_loss_half_logits_and_layouts(dtype, layout, gen):
    n, c, full = 2, 4, (15, 13)
    x = logits((n, c, 5, 4), dtype, gen, layout)
    z = d_map(n, (3, 2), gen)
    z_view = z.transpose(1, 2).contiguous().transpose(1, 2)  # a non-contiguous (N, h, w) view
    t = labels(n, full, c, gen)
    out = cpu.generator_loss(x, z_view, t, 0.01, 0.1, 0.2, IGNORE, True, True, size=full, align_corners=True)
    assert out.grad.dtype == dtype
    leaf, zleaf = low_leaf(x), low_leaf(z)
    term, _ = ce_reference(up(leaf, full, True), t, None, 0.0)
    adv = adv_reference(up(zleaf, full, True), t != IGNORE)
    close(out.sums[0], term.sum(), dtype, "term sum")
    close(out.sums[2], adv.sum(), what="adv sum")
    gx, = torch.autograd.grad(term.sum(), leaf)
    gz, = torch.autograd.grad(adv.sum(), zleaf)
    close(out.grad.double() / out.scales[0].item(), gx, dtype, "grad of the term")
    close(out.grad_d.double() / out.scales[1].item(), gz, what="grad of the adversarial term")


# ---- D-map losses -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("z_low,full", [((3, 4), (11, 13)), ((11, 11), (321, 321)), ((9, 7), (4, 5)),
                                        ((5, 5), (5, 12))])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("target", ["value", "map"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_bce_with_logits2d(z_low, full, align_corners, target, with_mask, gen):
    n = 2
    z = d_map(n, z_low, gen)
    mask = torch.rand((n,) + full, generator=gen) < 0.3 if with_mask else None
    tmap = torch.rand((n,) + full, generator=gen) if target == "map" else None
    out = cpu.bce_with_logits2d(z, tmap, 0.7, mask, "sum", True, size=full, align_corners=align_corners)
    zleaf = low_leaf(z)
    z_full = up(zleaf, full, align_corners)
    t = torch.full_like(z_full, 0.7) if tmap is None else tmap.double()
    loss = F.binary_cross_entropy_with_logits(z_full, t, reduction="none")
    if mask is not None:
        loss = torch.where(mask, 0.0, loss)
    count = z_full.numel() - (0 if mask is None else int(mask.sum()))
    close(out.sums[0], loss.sum(), what="loss sum")
    assert out.sums[1].item() == count
    want, = torch.autograd.grad(loss.sum(), zleaf)
    assert out.grad.shape == z.shape
    close(out.grad, want, what="grad")
    none = cpu.bce_with_logits2d(z, tmap, 0.7, mask, "none", False, size=full, align_corners=align_corners)
    close(none.loss_map, loss, what="loss map")
    mean = cpu.bce_with_logits2d(z, tmap, 0.7, mask, "mean", True, size=full, align_corners=align_corners)
    close(mean.grad.double() / mean.scales.item(), want, what="mean's grad")


@pytest.mark.parametrize("align_corners", [False, True])
def test_discriminator_loss_maps_at_different_resolutions(align_corners, gen):
    full = (17, 21)
    fake, real = d_map(2, (3, 4), gen), d_map(3, (6, 5), gen)
    mask_fake = torch.rand((2,) + full, generator=gen) < 0.25
    mask_real = torch.rand((3,) + full, generator=gen) < 0.25
    out = cpu.discriminator_loss(fake, real, mask_fake, mask_real, True, True, size=full,
                                 align_corners=align_corners)
    sums = []
    for z, target, mask, grad, pre in ((fake, 0.0, mask_fake, out.grad_fake, out.scales[0]),
                                       (real, 1.0, mask_real, out.grad_real, out.scales[1])):
        zleaf = low_leaf(z)
        z_full = up(zleaf, full, align_corners)
        loss = torch.where(mask, 0.0, F.binary_cross_entropy_with_logits(z_full, torch.full_like(z_full, target),
                                                                         reduction="none"))
        sums += [loss.sum(), int((~mask).sum())]
        want, = torch.autograd.grad(loss.sum(), zleaf)
        close(grad.double() / pre.item(), want, what=f"grad (target {target})")
    close(out.sums[0], sums[0], what="fake sum")
    close(out.sums[2], sums[2], what="real sum")
    assert (out.sums[1].item(), out.sums[3].item()) == (sums[1], sums[3])


# ---- identity, empty, determinism -------------------------------------------------------------------------------

def _bits(t):
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _all_launches(x, z, t, zt, mask, size, align_corners=False, fake=None, real=None):
    """Every launch with size (None: the plain op), as a flat list of tensors."""
    kw = {} if size is None else dict(size=size, align_corners=align_corners)
    out = []
    y = cpu.softmax2d(x, **kw)
    out += [y, cpu.softmax2d_backward(y, y * 0.5, **({} if size is None else dict(low_size=tuple(x.shape[-2:]),
                                                                            align_corners=align_corners)))]
    for reduction in ("mean", "none"):
        r = cpu.cross_entropy2d(x, t, None, IGNORE, 0.1, reduction, True, **kw)
        out += [r.sums, r.grad] + ([r.loss_map] if r.loss_map is not None else [])
    r = cpu.semi_cross_entropy2d(x, z, 0.3, mask, "mean", True, **kw)
    out += [r.sums, r.grad]
    for target in (t, None):
        r = cpu.generator_loss(x, z, target, 0.01, 0.1, 0.2, IGNORE, True, True, **kw)
        out += [r.sums, r.grad, r.grad_d]
    r = cpu.bce_with_logits2d(zt, None, 1.0, mask, "none", True, **kw)
    out += [r.sums, r.loss_map, r.grad]
    r = cpu.discriminator_loss(fake if fake is not None else zt, real if real is not None else zt, mask, None,
                               True, True, **kw)
    out += [r.sums, r.grad_fake, r.grad_real]
    return out


def _assert_identical(a, b):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.shape == v.shape and torch.equal(_bits(u), _bits(v)), f"result {i} differs"


def test_input_already_at_size_is_the_plain_op_bit_for_bit(gen):
    n, c, full = 2, 5, (9, 11)
    x = logits((n, c) + full, torch.float32, gen)
    z = d_map(n, full, gen)
    t = labels(n, full, c, gen)
    mask = torch.rand((n,) + full, generator=gen) < 0.2
    _assert_identical(_all_launches(x, z, t, z, mask, full), _all_launches(x, z, t, z, mask, None))


def test_empty_batch(gen):
    x = torch.zeros((0, 4, 3, 3))
    z = torch.zeros((0, 2, 2))
    t = torch.zeros((0, 7, 7), dtype=torch.int64)
    out = cpu.cross_entropy2d(x, t, None, IGNORE, 0.0, "mean", True, size=(7, 7), align_corners=False)
    assert out.grad.shape == x.shape and out.sums.tolist() == [0.0, 0.0]
    out = cpu.generator_loss(x, z, None, 0.01, 0.1, 0.2, IGNORE, True, True, size=(7, 7), align_corners=True)
    assert out.grad_d.shape == z.shape and out.sums.abs().sum() == 0
    assert cpu.softmax2d(x, size=(7, 7)).shape == (0, 4, 7, 7)
    out = cpu.bce_with_logits2d(z, None, 1.0, None, "none", True, size=(7, 7))
    assert out.loss_map.shape == (0, 7, 7) and out.grad.shape == z.shape


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("align_corners", [False, True])
def test_bit_identical_across_runs_and_thread_counts(align_corners, gen, threads):
    """Large enough that the kernels run on several threads (chunks of rows spread over them)."""
    n, c, full = 2, 5, (97, 101)
    x = logits((n, c, 13, 17), torch.float32, gen)
    z = d_map(n, (5, 7), gen)
    t = labels(n, full, c, gen)
    mask = torch.rand((n,) + full, generator=gen) < 0.2
    args = (x, z, t, z, mask, full, align_corners, d_map(n, (9, 4), gen), d_map(n, (31, 30), gen))
    torch.set_num_threads(2)
    first = _all_launches(*args)
    _assert_identical(first, _all_launches(*args))
    torch.set_num_threads(1)
    _assert_identical(first, _all_launches(*args))


# ---- the native boundary -----------------------------------------------------------------------------------------

def test_native_boundary_checks_the_resize_arguments(gen):
    x = logits((2, 3, 4, 5), torch.float32, gen)
    t = labels(2, (9, 11), 3, gen)
    z = d_map(2, (2, 3), gen)
    with pytest.raises(ValueError, match=r"size must be two positive sizes"):
        cpu.cross_entropy2d(x, t, None, IGNORE, 0.0, "sum", False, size=(0, 11))
    with pytest.raises(ValueError, match=r"target \(2, 4, 5\) does not match"):
        cpu.cross_entropy2d(x, labels(2, (4, 5), 3, gen), None, IGNORE, 0.0, "sum", False, size=(9, 11))
    with pytest.raises(ValueError, match=r"ignore_mask \(2, 2, 3\) does not match"):
        cpu.semi_cross_entropy2d(x, z, 0.2, torch.zeros((2, 2, 3), dtype=torch.bool), "sum", False, size=(9, 11))
    with pytest.raises(ValueError, match=r"d_logits \(3, 2, 3\) does not match the logits' N"):
        cpu.generator_loss(x, d_map(3, (2, 3), gen), t, 0.01, 0.1, 0.2, IGNORE, True, True, size=(9, 11))
    with pytest.raises(ValueError, match=r"grad_d_logits \(2, 9, 11\) does not match d_logits"):
        ext.fused_loss((2, 3, 4, 5), x, None, 1.0, t, IGNORE, None, z, None, 0, 0.0, 1, None,
                       torch.zeros((2, 9, 11)), 1.0, False, 1, size=(9, 11))
    with pytest.raises(ValueError, match=r"grad \(2, 3, 9, 11\) does not match logits"):
        ext.fused_loss((2, 3, 4, 5), x, torch.zeros((2, 3, 9, 11)), 1.0, t, IGNORE, None, None, None, 0, 0.0, 0,
                       None, None, 1.0, False, 1, size=(9, 11))
    with pytest.raises(ValueError, match=r"loss_map \(2, 4, 5\) does not match"):
        ext.fused_loss((2, 3, 4, 5), x, None, 1.0, t, IGNORE, None, None, None, 0, 0.0, 0,
                       torch.zeros((2, 4, 5)), None, 1.0, False, 1, size=(9, 11))
    with pytest.raises(ValueError, match=r"out \(2, 3, 4, 5\) does not match"):
        ext.softmax_forward(x, torch.empty_like(x), 1, size=(9, 11))
    y = cpu.softmax2d(x, size=(9, 11))
    with pytest.raises(ValueError, match=r"grad_logits \(2, 3, 9, 11\) does not match"):
        ext.softmax_backward(y, y, torch.empty_like(y), 1, low_size=(4, 5))
    with pytest.raises(TypeError, match=r"grad_logits must have the dtype of probs"):
        ext.softmax_backward(y, y, torch.empty((2, 3, 4, 5), dtype=torch.float16), 1, low_size=(4, 5))
    with pytest.raises(ValueError, match=r"grad \(2, 9, 11\) does not match d_logits"):
        ext.bce_maps([(z, None, 1.0, None, None, torch.zeros((2, 9, 11)), 1.0)], 1, size=(9, 11))
    with pytest.raises(ValueError, match=r"target \(2, 2, 3\) does not match"):
        ext.bce_maps([(z, torch.zeros((2, 2, 3)), 1.0, None, None, None, 1.0)], 1, size=(9, 11))
    with pytest.raises(ValueError, match=r"has no pixel to resize"):
        cpu.softmax2d(torch.zeros((1, 3, 0, 4)), size=(5, 5))
    with pytest.raises(TypeError, match=r"size must be None or two ints"):
        ext.softmax_forward(x, y, 1, size="big")


# ---- every kernel build ------------------------------------------------------------------------------------------

_ISA_CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[1])
    from fastadvseg import _C_cpu
    import test_upsample_cpu as T
    gen = lambda: torch.Generator().manual_seed(1234)
    for low, full in T.RESIZES:
        for ac in (False, True):
            T.test_cross_entropy2d(low, full, ac, gen())
            T.test_softmax2d_forward_and_backward(low, full, ac, torch.bfloat16, gen())
    T.test_cross_entropy2d_options_layouts_dtypes(torch.float16, "sliced", "weight+smoothing", gen())
    T.test_generator_loss((5, 6), (2, 3), (17, 19), True, False, gen())
    T.test_generator_loss((41, 41), (11, 11), (65, 65), False, True, gen())
    T.test_bce_with_logits2d((9, 7), (4, 5), True, "map", True, gen())
    T.test_many_classes_blocks_narrower_than_a_pixel_vector(gen())
    print(_C_cpu.isa())
""")


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_every_kernel_build(isa):
    """Each build the CPU can run (FASTADVSEG_CPU_ISA caps the choice), in a child process."""
    env = dict(os.environ, FASTADVSEG_CPU_ISA=isa)
    proc = subprocess.run([sys.executable, "-c", _ISA_CHILD, os.path.dirname(os.path.abspath(__file__))], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = proc.stdout.split()[-1]
    if got != isa:
        pytest.skip(f"this CPU does not run the {isa} build (got {got})")
