"""The triton backend's launches with ``size``: inputs read bilinearly upsampled inside the kernels.

Each launch of ``fastadvseg.backends.triton`` is called directly with logits (N, C, h, w) and D maps (N, hd, wd)
and compared with the float64 math of the same op on ``F.interpolate(x.float(), size, mode="bilinear",
align_corners=a)`` (float32 interpolation, as the kernels do; PyTorch's own ``F.cross_entropy``,
``F.binary_cross_entropy_with_logits`` and ``torch.softmax`` where they define the op, the exact keep rule of
``fastadvseg/_keep.py`` for L_semi): sums, counts and (N, H, W) loss maps, and the low-resolution gradients against
the float64 adjoint of the interpolation (autograd through ``F.interpolate`` in float64). Both align_corners,
non-integer factors (5 -> 17), both reduction orders of the gradient, one axis resampled, downsampling, a source
or destination axis of 1 pixel, the size of the input itself (bit-identical to no size), channels_last and sliced
logits, float32 / float16 / bfloat16, masks and target maps, logits and D at different resolutions, several
programs per pass (C = 150), determinism, bad sizes and empty batches.

Runs on CUDA, or on CPU under TRITON_INTERPRET=1 (set below if unset, before triton is imported). Shapes are tiny:
the interpreter runs each program in numpy.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("the triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastadvseg._keep import keep_mask  # noqa: E402
from fastadvseg.backends import triton as B  # noqa: E402
from fastadvseg.kernels.triton import bilinear  # noqa: E402
from fastadvseg.kernels.triton.common import TRITON_VERSION, tile_shape  # noqa: E402
from helpers import layout_3d, layout_4d  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32: the spec's 1e-5 relative; the half dtypes: their stored gradients' rounding (bfloat16 casts truncate
# under the interpreter)
RTOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(4242)


# --------------------------------------------------------------------------------------------------- the oracle

def _hw(t):
    return tuple(t.shape[-2:])


def up32(t, size, align):
    """The op's input: ``t`` upsampled in float32 (as F.interpolate(t.float(), ...)), as float64; ``t`` itself
    (in float64) where it is already at ``size``."""
    if _hw(t) == tuple(size):
        return t.detach().double()
    x = t.detach().float()
    x = x if x.dim() == 4 else x.unsqueeze(1)
    u = F.interpolate(x, size=size, mode="bilinear", align_corners=align)
    return (u if t.dim() == 4 else u[:, 0]).double()


def adjoint(t, size, align, grad_full):
    """The float64 gradient w.r.t. the low-resolution ``t`` of a loss whose gradient w.r.t. the upsampled tensor is
    ``grad_full``: autograd through F.interpolate in float64."""
    if _hw(t) == tuple(size):
        return grad_full
    x = torch.zeros(t.shape, dtype=torch.float64, device=t.device, requires_grad=True)
    u = F.interpolate(x if t.dim() == 4 else x.unsqueeze(1), size=size, mode="bilinear", align_corners=align)
    (g,) = torch.autograd.grad(u if t.dim() == 4 else u[:, 0], x, grad_full)
    return g


def close(actual, expected, rtol, what, scale=None):
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: {tuple(actual.shape)} != {tuple(expected.shape)}"
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-6), equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def check_sums(sums, expected, maps_abs_sum, rtol, what):
    """Loss sums accumulate in float32 over many pixels: scaled by the sum of the per-pixel magnitudes."""
    close(sums[0], expected[0], max(rtol, 1e-5), what + " loss sum", scale=maps_abs_sum)
    for i in range(1, len(expected)):
        assert sums[i].item() == expected[i].item(), f"{what}: count {i}: {sums[i].item()} != {expected[i].item()}"


def threshold_away_from(z_full):
    """A threshold T whose logit is at least 1e-3 from every upsampled z: the keep mask cannot depend on rounding."""
    for t in (0.2, 0.23, 0.17, 0.3, 0.12, 0.4, 0.5, 0.6):
        if (z_full - math.log(t / (1 - t))).abs().min().item() > 1e-3:
            return t
    raise AssertionError("no threshold away from the upsampled z")


# ------------------------------------------------------------------------------------------------------ inputs

def logits(shape, dtype, layout, gen, scale=3.0):
    base = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return layout_4d(base, layout).to(DEVICE)


def dmap(shape, dtype, gen, layout="contiguous"):
    base = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2).to(dtype)
    return layout_3d(base, layout).to(DEVICE)


def labels(n, c, size, gen, ignore_frac=0.2):
    y = torch.randint(0, c, (n, *size), generator=gen)
    y[torch.rand((n, *size), generator=gen) < ignore_frac] = 255
    return y.to(DEVICE)


def mask(n, size, gen, frac=0.3):
    return (torch.rand((n, *size), generator=gen) < frac).to(DEVICE)


# (low (h, w), size (H, W)): non-integer factors, both reduction orders of the gradient (H·w vs h·W), one axis
# resampled (one pass), downsampling, axes of one pixel, and a size equal to the input's
GEOMETRIES = {
    "3x4_7x9": ((3, 4), (7, 9)),  # H·w = 28 > h·W = 27: the gradient reduces H first
    "4x3_9x7": ((4, 3), (9, 7)),  # W first
    "5x2_17x5": ((5, 2), (17, 5)),  # 5 -> 17
    "3x9_7x9": ((3, 9), (7, 9)),  # only H resampled
    "7x4_7x9": ((7, 4), (7, 9)),  # only W resampled
    "7x9_3x5": ((7, 9), (3, 5)),  # downsampling
    "1x4_5x9": ((1, 4), (5, 9)),  # a source axis of one pixel
    "3x4_1x6": ((3, 4), (1, 6)),  # a destination axis of one pixel
}


# ----------------------------------------------------------------------------------------------- cross-entropy

def ce_oracle(x, y, weight, eps, size, align):
    xu = up32(x, size, align).requires_grad_(True)
    wd = None if weight is None else weight.double()
    loss_map = F.cross_entropy(xu, y, weight=wd, ignore_index=255, label_smoothing=eps, reduction="none")
    (g_full,) = torch.autograd.grad(loss_map.sum(), xu)
    counted = y != 255
    w_y = torch.ones_like(loss_map) if wd is None else wd[torch.where(counted, y, 0)]
    return loss_map.detach(), torch.stack([loss_map.sum(), torch.where(counted, w_y, 0.0).sum()]), \
        adjoint(x, size, align, g_full)


CE_CASES = [
    # geometry, align, dtype, layout, eps, weighted
    ("3x4_7x9", False, torch.float32, "contiguous", 0.0, False),
    ("3x4_7x9", True, torch.float32, "channels_last", 0.1, True),
    ("4x3_9x7", True, torch.float16, "sliced", 0.0, True),
    ("4x3_9x7", False, torch.bfloat16, "channels_last", 0.1, False),
    ("5x2_17x5", False, torch.float32, "sliced", 0.0, False),
    ("5x2_17x5", True, torch.bfloat16, "contiguous", 0.0, True),
    ("3x9_7x9", False, torch.float32, "channels_last", 0.0, True),
    ("7x4_7x9", True, torch.float16, "contiguous", 0.1, False),
    ("7x9_3x5", False, torch.float32, "contiguous", 0.0, False),
    ("7x9_3x5", True, torch.float32, "sliced", 0.1, True),
    ("1x4_5x9", False, torch.float32, "contiguous", 0.0, False),
    ("3x4_1x6", True, torch.float32, "channels_last", 0.0, False),
]


@pytest.mark.parametrize("geo,align,dtype,layout,eps,weighted", CE_CASES,
                         ids=[f"{g}-ac{int(a)}-{str(d)[6:]}-{lay}-eps{e}-w{int(w)}" for g, a, d, lay, e, w in CE_CASES])
def test_cross_entropy_matches_float64_reference(geo, align, dtype, layout, eps, weighted, gen):
    (h, w), size = GEOMETRIES[geo]
    n, c = 2, 5
    x = logits((n, c, h, w), dtype, layout, gen)
    y = labels(n, c, size, gen)
    weight = (torch.rand(c, generator=gen) + 0.5).to(DEVICE) if weighted else None
    out = B.cross_entropy2d(x, y, weight, 255, eps, "none", True, size=size, align_corners=align)
    ref_map, ref_sums, ref_grad = ce_oracle(x, y, weight, eps, size, align)
    rtol = RTOL[dtype]
    assert out.loss_map.shape == (n, *size) and out.loss_map.dtype == torch.float32
    assert out.grad.shape == x.shape and out.grad.dtype == dtype and out.grad.device == x.device
    close(out.loss_map, ref_map, max(rtol, 1e-5), "loss map")
    close(out.sums[0], ref_sums[0], max(rtol, 1e-5), "loss sum", scale=ref_map.abs().sum().item())
    close(out.sums[1], ref_sums[1], 1e-6, "weight sum")
    close(out.grad, ref_grad, rtol, "low-resolution gradient")
    assert out.bad.tolist() == [0, 0]
    if layout == "channels_last":  # the gradient keeps a dense input's layout, as without a size
        assert out.grad.stride() == x.stride()


def test_cross_entropy_bad_labels_are_reported_and_ignored(gen):
    (h, w), size = GEOMETRIES["3x4_7x9"]
    x = logits((2, 4, h, w), torch.float32, "contiguous", gen)
    y = labels(2, 4, size, gen)
    y[1, 2, 3], y[0, 6, 8] = 9, -2  # in pixel order: (0, 6, 8) first
    out = B.cross_entropy2d(x, y, None, 255, 0.0, "none", True, size=size, align_corners=False)
    assert out.bad.tolist() == [2, -2]
    clean = torch.where((y < 0) | (y >= 4), 255, y)
    ref_map, ref_sums, ref_grad = ce_oracle(x, clean, None, 0.0, size, False)
    close(out.loss_map, ref_map, 1e-5, "loss map")
    assert out.sums[1].item() == ref_sums[1].item()
    close(out.grad, ref_grad, 1e-5, "gradient")


# ---------------------------------------------------------------------------------------- L_semi and generator

def semi_oracle(x, d, threshold, ignore, size, align):
    """([loss sum, kept, considered], loss map, low-resolution gradient) of L_semi on the upsampled inputs."""
    xu = up32(x, size, align).requires_grad_(True)
    keep = keep_mask(up32(d, size, align).float(), threshold)
    if ignore is not None:
        keep = keep & ~ignore
    pseudo = xu.detach().argmax(1)
    nll = torch.logsumexp(xu, 1) - xu.gather(1, pseudo.unsqueeze(1)).squeeze(1)
    loss_map = torch.where(keep, nll, 0.0)
    (g_full,) = torch.autograd.grad(loss_map.sum(), xu)
    considered = keep.numel() if ignore is None else int((~ignore).sum())
    sums = torch.tensor([loss_map.sum().item(), keep.sum().item(), considered], dtype=torch.float64)
    return sums, loss_map.detach(), adjoint(x, size, align, g_full)


# (x low, d low, size): logits and D at different resolutions, each or neither at full resolution
SEMI_CASES = [
    ((3, 4), (2, 3), (7, 9), False, torch.float32, "sliced"),
    ((3, 4), (2, 3), (7, 9), True, torch.bfloat16, "channels_last"),
    ((4, 3), (7, 9), (7, 9), False, torch.float16, "contiguous"),  # D at full resolution
    ((7, 9), (3, 2), (7, 9), True, torch.float32, "channels_last"),  # logits at full resolution
]


@pytest.mark.parametrize("x_low,d_low,size,align,dtype,layout", SEMI_CASES,
                         ids=["x-d-lower", "x-d-lower-ac1", "d-full", "x-full"])
def test_semi_cross_entropy_matches_float64_reference(x_low, d_low, size, align, dtype, layout, gen):
    n, c = 2, 4
    x = logits((n, c, *x_low), dtype, layout, gen)
    d = dmap((n, *d_low), dtype, gen, layout="sliced")
    ignore = mask(n, size, gen)
    threshold = threshold_away_from(up32(d, size, align))
    out = B.semi_cross_entropy2d(x, d, threshold, ignore, "none", True, size=size, align_corners=align)
    sums, ref_map, ref_grad = semi_oracle(x, d, threshold, ignore, size, align)
    rtol = RTOL[dtype]
    check_sums(out.sums, sums, ref_map.abs().sum().item(), rtol, "semi")
    assert 0 < sums[1] < sums[2]  # some pixels kept, some not
    close(out.loss_map, ref_map, max(rtol, 1e-5), "semi loss map")
    close(out.grad, ref_grad, rtol, "semi gradient")
    assert out.grad.shape == x.shape and out.grad.dtype == dtype


def generator_oracle(x, d, y, threshold, size, align):
    """[term sum, term count, adv sum, adv count, kept, considered], gx, gz in float64."""
    zu = up32(d, size, align).requires_grad_(True)
    if y is not None:
        _, ce_sums, gx = ce_oracle(x, y, None, 0.0, size, align)
        counted = y != 255
        adv_map = torch.where(counted, F.binary_cross_entropy_with_logits(zu, torch.ones_like(zu), reduction="none"),
                              0.0)
        (gz_full,) = torch.autograd.grad(adv_map.sum(), zu)
        sums = [ce_sums[0].item(), ce_sums[1].item(), adv_map.sum().item(), counted.sum().item(), 0, 0]
        scale = ce_sums[0].item()
    else:
        semi, semi_map, gx = semi_oracle(x, d, threshold, None, size, align)
        adv_map = F.binary_cross_entropy_with_logits(zu, torch.ones_like(zu), reduction="none")
        (gz_full,) = torch.autograd.grad(adv_map.sum(), zu)
        sums = [semi[0].item(), semi[1].item(), adv_map.sum().item(), adv_map.numel(), semi[1].item(),
                semi[2].item()]
        scale = semi_map.abs().sum().item()
    return torch.tensor(sums, dtype=torch.float64), gx, adjoint(d, size, align, gz_full), scale, adv_map


GEN_CASES = [
    # x low, d low, size, align, dtype, layout, labelled
    ((3, 4), (2, 2), (7, 9), False, torch.float32, "contiguous", True),
    ((3, 4), (2, 2), (7, 9), True, torch.float32, "sliced", False),
    ((4, 3), (3, 5), (9, 7), True, torch.bfloat16, "channels_last", True),
    ((4, 3), (3, 5), (9, 7), False, torch.float16, "sliced", False),
    ((7, 9), (2, 3), (7, 9), False, torch.float32, "channels_last", False),  # logits at full resolution
    ((3, 4), (7, 9), (7, 9), True, torch.float32, "contiguous", True),  # D at full resolution
]


@pytest.mark.parametrize("x_low,d_low,size,align,dtype,layout,labelled", GEN_CASES)
def test_generator_loss_matches_float64_reference(x_low, d_low, size, align, dtype, layout, labelled, gen):
    n, c = 2, 5
    x = logits((n, c, *x_low), dtype, layout, gen)
    d = dmap((n, *d_low), dtype, gen, layout="channels_last")
    y = labels(n, c, size, gen) if labelled else None
    threshold = threshold_away_from(up32(d, size, align))
    out = B.generator_loss(x, d, y, 0.01, 0.1, threshold, 255, True, True, size=size, align_corners=align)
    sums, gx, gz, scale, adv_map = generator_oracle(x, d, y, threshold, size, align)
    rtol = RTOL[dtype]
    close(out.sums[0], sums[0], max(rtol, 1e-5), "term sum", scale=scale)
    close(out.sums[2], sums[2], max(rtol, 1e-5), "adv sum", scale=adv_map.abs().sum().item())
    assert [out.sums[i].item() for i in (1, 3, 4, 5)] == [sums[i].item() for i in (1, 3, 4, 5)]
    assert out.grad.shape == x.shape and out.grad_d.shape == d.shape
    assert out.grad.dtype == out.grad_d.dtype == dtype
    close(out.grad, gx, rtol, "logits gradient")
    close(out.grad_d, gz, rtol, "D gradient")
    assert out.bad.tolist() == [0, 0]


# ------------------------------------------------------------------------------------------------- the D maps

@pytest.mark.parametrize("geo,align,dtype,target_kind,masked", [
    ("3x4_7x9", False, torch.float32, "map", True),
    ("4x3_9x7", True, torch.bfloat16, "value", False),
    ("5x2_17x5", True, torch.float16, "map", False),
    ("7x4_7x9", False, torch.float32, "value", True),
    ("7x9_3x5", True, torch.float32, "map", True),
])
def test_bce_matches_float64_reference(geo, align, dtype, target_kind, masked, gen):
    (h, w), size = GEOMETRIES[geo]
    n = 2
    d = dmap((n, h, w), dtype, gen, layout="sliced")
    target = layout_3d(torch.rand((n, *size), generator=gen), "sliced").to(DEVICE) if target_kind == "map" else None
    ignore = mask(n, size, gen) if masked else None
    out = B.bce_with_logits2d(d, target, 0.3, ignore, "none", True, size=size, align_corners=align)
    zu = up32(d, size, align).requires_grad_(True)
    t = torch.full_like(zu, 0.3) if target is None else target.double()
    loss_map = F.binary_cross_entropy_with_logits(zu, t, reduction="none")
    if ignore is not None:
        loss_map = torch.where(ignore, 0.0, loss_map)
    (g_full,) = torch.autograd.grad(loss_map.sum(), zu)
    rtol = RTOL[dtype]
    close(out.loss_map, loss_map, max(rtol, 1e-5), "bce loss map")
    close(out.sums[0], loss_map.sum(), max(rtol, 1e-5), "bce sum", scale=loss_map.abs().sum().item())
    assert out.sums[1].item() == (loss_map.numel() if ignore is None else (~ignore).sum().item())
    assert out.grad.shape == d.shape and out.grad.dtype == dtype
    close(out.grad, adjoint(d, size, align, g_full), rtol, "bce gradient")


@pytest.mark.parametrize("align", [False, True])
def test_discriminator_loss_matches_float64_reference(align, gen):
    size = (9, 7)
    fake = dmap((2, 3, 2), torch.float32, gen, layout="channels_last")
    real = dmap((1, 4, 5), torch.bfloat16, gen)
    mask_fake, mask_real = mask(2, size, gen), mask(1, size, gen)
    out = B.discriminator_loss(fake, real, mask_fake, mask_real, True, True, size=size, align_corners=align)
    for i, (d, m, t, grad, dtype) in enumerate(((fake, mask_fake, 0.0, out.grad_fake, torch.float32),
                                                (real, mask_real, 1.0, out.grad_real, torch.bfloat16))):
        zu = up32(d, size, align).requires_grad_(True)
        loss_map = torch.where(m, 0.0, F.binary_cross_entropy_with_logits(zu, torch.full_like(zu, t),
                                                                          reduction="none"))
        (g_full,) = torch.autograd.grad(loss_map.sum(), zu)
        close(out.sums[2 * i], loss_map.sum(), 1e-5, f"map {i} sum", scale=loss_map.abs().sum().item())
        assert out.sums[2 * i + 1].item() == (~m).sum().item()
        assert grad.shape == d.shape and grad.dtype == dtype
        close(grad, adjoint(d, size, align, g_full), RTOL[dtype], f"map {i} gradient")


# ---------------------------------------------------------------------------------------------------- softmax

@pytest.mark.parametrize("geo,align,dtype,layout", [
    ("3x4_7x9", False, torch.float32, "sliced"),
    ("4x3_9x7", True, torch.float32, "channels_last"),
    ("5x2_17x5", False, torch.bfloat16, "contiguous"),
    ("3x9_7x9", True, torch.float16, "channels_last"),
    ("7x9_3x5", False, torch.float32, "contiguous"),
])
def test_softmax_forward_and_backward_match_float64_reference(geo, align, dtype, layout, gen):
    (h, w), size = GEOMETRIES[geo]
    x = logits((2, 5, h, w), dtype, layout, gen)
    p = B.softmax2d(x, size=size, align_corners=align)
    xu = up32(x, size, align).requires_grad_(True)
    ref = torch.softmax(xu, 1)
    assert p.shape == (2, 5, *size) and p.dtype == dtype
    if layout == "channels_last":
        assert p.is_contiguous(memory_format=torch.channels_last)
    close(p, ref, RTOL[dtype], "probabilities")
    g = torch.randn(p.shape, generator=gen).to(dtype).to(DEVICE)
    dx = B.softmax2d_backward(p, g, low_size=(h, w), align_corners=align)
    # the backward of the stored probabilities (as the kernel reads them) and the incoming gradient
    pd = p.double()
    g_full = pd * (g.double() - (g.double() * pd).sum(1, keepdim=True))
    assert dx.shape == x.shape and dx.dtype == dtype
    close(dx, adjoint(x, size, align, g_full), RTOL[dtype], "softmax gradient")


# ---------------------------------------------------------------------------- identity, programs, determinism

def _all_ops(x, d, y, m, size, align):
    """Every launch with gradients, in one list of tensors."""
    out = []
    kw = dict(size=size, align_corners=align)
    p = B.softmax2d(x, **kw)
    out += [p, B.softmax2d_backward(p, torch.ones_like(p), low_size=None if size is None else _hw(x),
                                    align_corners=align)]
    out += list(B.cross_entropy2d(x, y, None, 255, 0.1, "none", True, **kw)[:3])
    out += list(B.semi_cross_entropy2d(x, d, 0.3, m, "none", True, **kw)[:3])
    out += list(B.generator_loss(x, d, y, 0.01, 0.1, 0.3, 255, True, True, **kw)[:3])
    out += list(B.generator_loss(x, d, None, 0.01, 0.1, 0.3, 255, True, True, **kw)[:3])
    out += list(B.bce_with_logits2d(d, None, 1.0, m, "none", True, **kw)[:3])
    out += list(B.discriminator_loss(d, d[:1], m, None, True, True, **kw)[:3])
    return out


@pytest.mark.parametrize("align", [False, True])
def test_size_equal_to_the_inputs_is_bit_identical_to_no_size(align, gen):
    x = logits((2, 4, 5, 6), torch.float32, "sliced", gen)
    d = dmap((2, 5, 6), torch.float32, gen)
    y, m = labels(2, 4, (5, 6), gen), mask(2, (5, 6), gen)
    plain, sized = _all_ops(x, d, y, m, None, align), _all_ops(x, d, y, m, (5, 6), align)
    for i, (a, b) in enumerate(zip(plain, sized)):
        assert a.shape == b.shape and torch.equal(a, b), i


def test_several_programs_per_pass_and_bit_identical_reruns(gen):
    """C = 150: a pass-1 program holds a few lanes only, so every pass runs several programs per image."""
    (h, w), size = (2, 3), (5, 7)
    x = logits((2, 150, h, w), torch.float32, "channels_last", gen)
    y = labels(2, 150, size, gen)
    _, block_p, _ = tile_shape(150, size[0] * w, bilinear.GATHER_TILE_ELEMS)
    assert block_p < size[0] * w
    first = B.cross_entropy2d(x, y, None, 255, 0.1, "none", True, size=size, align_corners=True)
    ref_map, _, ref_grad = ce_oracle(x, y, None, 0.1, size, True)
    close(first.loss_map, ref_map, 1e-5, "loss map")
    close(first.grad, ref_grad, 1e-5, "gradient")
    again = B.cross_entropy2d(x, y, None, 255, 0.1, "none", True, size=size, align_corners=True)
    assert torch.equal(first.grad, again.grad) and torch.equal(first.sums, again.sums)


def test_gradients_are_bit_identical_across_runs(gen):
    x = logits((2, 3, 3, 4), torch.bfloat16, "sliced", gen)
    d = dmap((2, 2, 3), torch.float32, gen)
    y, m = labels(2, 3, (7, 9), gen), mask(2, (7, 9), gen)
    first, second = _all_ops(x, d, y, m, (7, 9), False), _all_ops(x, d, y, m, (7, 9), False)
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), i


# ------------------------------------------------------------------------------------- the adjoint's windows

def test_adjoint_windows_cover_every_source_index():
    """Every full-resolution index d that feeds low-resolution index j (i0(d) or i1(d) == j, PyTorch's weights)
    lies in the window [start(j), start(j) + span) of the plan, for sizes up to 4x beyond the tests' and for the
    factors of real images; the weights are PyTorch's (the interpolation matrix of F.interpolate in float32)."""
    sizes = [(low, full) for low in (1, 2, 3, 5, 7, 41) for full in (1, 2, 5, 9, 17, 33, 321)] + \
        [(65, 513), (129, 1025), (11, 321), (321, 41), (1024, 2048)]
    for low, full in sizes:
        for align in (False, True):
            plan = bilinear.axis_plan(low, full, align)
            # PyTorch's weights: F.interpolate of the identity along one axis, (full, low)
            eye = torch.eye(low, dtype=torch.float32).view(1, low, low, 1)
            weights = F.interpolate(eye, size=(full, 1), mode="bilinear", align_corners=align)[0, :, :, 0].T
            fed = weights.numpy() != 0
            if align:
                first_est = (np.arange(low, dtype=np.float32) - np.float32(1)) * np.float32(plan.inv_scale)
            else:
                first_est = (np.arange(low, dtype=np.float32) - np.float32(0.5)) * np.float32(plan.inv_scale) \
                    - np.float32(0.5)
            start = np.where(np.arange(low) > 1, np.maximum(first_est.astype(np.int32) - 2, 0), 0)
            for j in range(low):
                ds = np.nonzero(fed[:, j])[0]
                if len(ds):
                    assert start[j] <= ds[0] and ds[-1] < start[j] + plan.span, (low, full, align, j)
            # two source intervals per window, 2.5 where the clamped start (src = 0) widens the first one
            factor = (full - 1) / (low - 1) if align and low > 1 else full / low
            assert plan.span <= math.ceil((2.0 if align else 2.5) * factor) + 5 or low == 1, (low, full, plan.span)


# ------------------------------------------------------------------------------------- the interpolated values

@triton.jit
def _upsample_map_kernel(d_ptr, out_ptr, in_h, in_w, out_h, out_w, scale_h, scale_w, s_n, s_h, s_w, total,
                         BLOCK: tl.constexpr, ALIGN_CORNERS: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    n = offs // (out_h * out_w)
    r = offs - n * (out_h * out_w)
    h = r // out_w
    z = bilinear.upsampled_map(d_ptr, n.to(tl.int64), h, r - h * out_w, in_h, in_w, out_h, out_w, scale_h, scale_w,
                               s_n, s_h, s_w, mask, ALIGN_CORNERS)
    tl.store(out_ptr + offs, z, mask=mask)


# PyTorch's CPU kernel for contiguous inputs with H + W > 128 (the sizes of real images): the generic one
LARGE_GEOMETRIES = {"9x5_65x70": ((9, 5), (65, 70)), "5x7_70x61": ((5, 7), (70, 61)),
                    "41x30_17x125": ((41, 30), (17, 125)), "1x4_99x33": ((1, 4), (99, 33))}


@pytest.mark.parametrize("geo", list(LARGE_GEOMETRIES))
@pytest.mark.parametrize("align", [False, True])
def test_interpolated_values_are_pytorchs_to_the_bit(geo, align, gen):
    """The kernels' bilinear value of a map is F.interpolate's in float32 to the bit (the same source indices and
    weights, the same roundings), where PyTorch's CPU kernel is its generic one; a GPU compiles the same fused
    multiply-adds. (Triton 3.6's interpreter rounds its fma twice: a source index an ulp off there.)"""
    (h, w), size = LARGE_GEOMETRIES[geo]
    d = layout_3d(torch.randn((2, h, w), generator=gen) * 3, "sliced").to(DEVICE)
    g = bilinear.geometry((h, w), size, align)
    out = torch.empty((2, *size), dtype=torch.float32, device=DEVICE)
    _upsample_map_kernel[(triton.cdiv(out.numel(), 1024),)](
        d, out, h, w, *size, g.h.scale, g.w.scale, *d.stride(), out.numel(), BLOCK=1024, ALIGN_CORNERS=align)
    ref = F.interpolate(d.cpu().contiguous().unsqueeze(1), size=size, mode="bilinear", align_corners=align)[:, 0]
    if TRITON_VERSION >= (3, 9) or DEVICE == "cuda":
        assert torch.equal(out.cpu(), ref), (out.cpu() - ref).abs().max()
    else:  # an ulp of a source index moves a weight by about 1e-7 * in
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


# ---------------------------------------------------------------------------------------------- bad input, empty

def test_bad_sizes_and_shapes_raise_one_line_errors(gen):
    x = logits((2, 3, 3, 4), torch.float32, "contiguous", gen)
    y = labels(2, 3, (7, 9), gen)
    for size in ((0, 9), (7, -1), (7, 9, 1)):
        with pytest.raises(ValueError, match="size"):
            B.cross_entropy2d(x, y, None, 255, 0.0, "mean", True, size=size)
    with pytest.raises(ValueError, match=r"target of shape \(2, 7, 9\) .* \(2, 8, 9\)"):
        B.cross_entropy2d(x, y, None, 255, 0.0, "mean", True, size=(8, 9))
    with pytest.raises(ValueError, match=r"ignore_mask of shape"):
        B.bce_with_logits2d(x[:, 0], None, 1.0, mask(2, (7, 8), gen), "mean", True, size=(7, 9))
    with pytest.raises(ValueError, match=r"d_logits has batch size 1"):
        B.semi_cross_entropy2d(x, x[:1, 0], 0.2, None, "mean", True, size=(7, 9))
    with pytest.raises(ValueError, match="no pixels"):
        B.softmax2d(x[:, :, :, :0], size=(7, 9))
    with pytest.raises(ValueError, match="low_size"):
        B.softmax2d_backward(torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 3, 3), low_size=(0, 2))


def test_empty_batches_give_zero_sums_and_empty_buffers(gen):
    x = torch.zeros((0, 3, 3, 4), device=DEVICE)
    d = torch.zeros((0, 2, 2), device=DEVICE)
    y = torch.zeros((0, 7, 9), dtype=torch.int64, device=DEVICE)
    ce = B.cross_entropy2d(x, y, None, 255, 0.0, "none", True, size=(7, 9))
    assert ce.sums.tolist() == [0.0, 0.0] and ce.loss_map.shape == (0, 7, 9) and ce.grad.shape == x.shape
    g = B.generator_loss(x, d, None, 0.01, 0.1, 0.2, 255, True, True, size=(7, 9))
    assert g.sums.tolist() == [0.0] * 6 and g.grad.shape == x.shape and g.grad_d.shape == d.shape
    b = B.discriminator_loss(d, torch.zeros((1, 2, 2), device=DEVICE), None, None, True, True, size=(7, 9))
    assert b.sums[:2].tolist() == [0.0, 0.0] and b.sums[3].item() == 63.0
    assert B.softmax2d(x, size=(7, 9)).shape == (0, 3, 7, 9)
