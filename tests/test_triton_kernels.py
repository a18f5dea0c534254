"""Triton-specific tests: what the shared suite may not reach.

Tile edges (H·W = BLOCK_P ± 1), C = 256 and a C large enough for BLOCK_P = 1, every layout against the reference
backend, fp16/bf16 against float64, a view with a large storage offset, logits feeding two losses (no in-place
corruption), each GeneratorLossOutput field's gradient on its own, backward twice with retain_graph, gradients stored
only when needed. (The compile of every kernel for sm_90 through Triton's real compiler, the path the interpreter
does not run, is tests/test_kernel_resources.py.)

Runs on CUDA, or on CPU under TRITON_INTERPRET=1 (the shared conftest sets it when there is no GPU). Shapes are
small: the interpreter runs each program in numpy.
"""
import os

import pytest
import torch

pytest.importorskip("triton")

import fastadvseg as fas  # noqa: E402
import oracle  # noqa: E402
from helpers import assert_close, make_d_logits, make_logits, make_target  # noqa: E402

if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from fastadvseg.kernels.triton.common import tile_shape  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
T = "triton"


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(20260)


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _both(fn, *tensors):
    """Run ``fn(backend, *leaf copies)`` on triton and on reference; returns both (output, input grads)."""
    results = []
    for backend in (T, "reference"):
        leaves = [_leaf(t) if t.is_floating_point() else t for t in tensors]
        out = fn(backend, *leaves)
        loss = out if out.dim() == 0 else (out * torch.linspace(0.5, 1.5, out.numel()).view(out.shape)).sum()
        loss.backward()
        results.append((out, [t.grad for t in leaves if t.is_floating_point()]))
    return results


def _check_against_reference(fn, dtype, *tensors, what=""):
    (ours, g_ours), (ref, g_ref) = _both(fn, *tensors)
    assert_close(ours, ref, dtype, what)
    for a, b in zip(g_ours, g_ref):
        assert a is not None and a.dtype == b.dtype, what
        assert_close(a, b, dtype, what + " (grad)")


# ------------------------------------------------------------------------------------------------ tile geometry

def _pixels_for(c, delta):
    """(H, W) with H·W = BLOCK_P + delta for C channels (BLOCK_P of the tile heuristic)."""
    _, block_p, _ = tile_shape(c, 1 << 20)
    hw = block_p + delta
    return (1, hw) if hw < 3 or hw % 3 else (3, hw // 3)


@pytest.mark.parametrize("c,delta", [(19, -1), (19, 1), (21, 0), (256, -1), (256, 1), (4100, 0)])
def test_tile_edges_and_large_c(c, delta, gen):
    h, w = _pixels_for(c, delta) if c < 4096 else (2, 3)
    if c >= 4096:
        assert tile_shape(c, h * w)[1] == 1  # one pixel per program: the tile is all channels of one pixel
    shape = (2, c, h, w)
    x = make_logits(shape, torch.float32, "contiguous", DEVICE, generator=gen)
    t = make_target(shape, DEVICE, generator=gen)
    d = make_d_logits((2, h, w), torch.float32, DEVICE, generator=gen)
    wt = torch.rand(c, generator=gen).to(DEVICE) + 0.5
    _check_against_reference(lambda b, x: fas.cross_entropy2d(x, t, weight=wt, backend=b), torch.float32, x,
                             what=f"ce C={c}")
    _check_against_reference(lambda b, x: fas.softmax2d(x, backend=b), torch.float32, x, what=f"softmax C={c}")
    _check_against_reference(lambda b, x: fas.semi_cross_entropy2d(x, d.detach(), reduction="none", backend=b),
                             torch.float32, x, what=f"semi C={c}")
    for target in (t, None):
        _check_against_reference(
            lambda b, x, d: fas.generator_loss(x, d, target, lambda_adv=0.1, lambda_semi=0.5, backend=b).total,
            torch.float32, x, d, what=f"generator C={c} labelled={target is not None}")
    assert torch.equal(fas.one_hot2d(t, c, backend=T), fas.one_hot2d(t, c, backend="reference"))


# ------------------------------------------------------------------------------------------------------ layouts

def _views(x):
    """The same logits as channels_last, as a sliced view, and at a large storage offset."""
    n, c, h, w = x.shape
    big = torch.zeros((n, c + 1, 2 * h, w + 1), dtype=x.dtype, device=x.device)
    sliced = big[:, 1:, ::2, 1:]
    sliced.copy_(x)
    far = torch.zeros(200_003 + x.numel(), dtype=x.dtype, device=x.device)[200_003:].view(x.shape)
    far.copy_(x)
    assert far.storage_offset() == 200_003 and not sliced.is_contiguous()
    return {"channels_last": x.contiguous(memory_format=torch.channels_last), "sliced": sliced, "offset": far}


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "offset"])
def test_layouts_match_reference(layout, gen):
    shape = (2, 21, 5, 3)
    x = _views(torch.randn(shape, generator=gen).to(DEVICE) * 3)[layout]
    t = make_target(shape, DEVICE, generator=gen)[:, :, :]  # labels and maps stay strided too
    d = make_d_logits((2, 5, 3), torch.float32, DEVICE, layout="sliced", generator=gen)
    mask = torch.rand((2, 1, 10, 3), generator=gen).to(DEVICE)[:, :, ::2] < 0.3
    ops = {
        "softmax": lambda b, x: fas.softmax2d(x, backend=b),
        "ce": lambda b, x: fas.cross_entropy2d(x, t, reduction="none", backend=b),
        "semi": lambda b, x: fas.semi_cross_entropy2d(x, d.detach(), ignore_mask=mask, backend=b),
        "gen": lambda b, x: fas.generator_loss(x, d.detach(), t, lambda_adv=0.2, backend=b).total,
        "gen_unlabelled": lambda b, x: fas.generator_loss(x, d.detach(), None, lambda_adv=0.2, backend=b).total,
    }
    for name, fn in ops.items():
        _check_against_reference(fn, torch.float32, x, what=f"{name} {layout}")
    # gradients get the logits' layout when it is dense (channels_last), are contiguous otherwise
    y = _leaf(x)
    fas.cross_entropy2d(y, t, backend=T).backward()
    if layout == "channels_last":
        assert y.grad.is_contiguous(memory_format=torch.channels_last)
    p = fas.softmax2d(x, backend=T)
    assert p.stride() == x.stride() if layout == "channels_last" else p.is_contiguous()


def test_maps_with_other_dtypes_and_strides(gen):
    """d_logits in another float dtype than the logits, BCE targets as strided maps of another dtype."""
    x = make_logits((1, 3, 4, 5), torch.bfloat16, "contiguous", DEVICE, generator=gen)
    d16 = make_d_logits((1, 4, 5), torch.float32, DEVICE, generator=gen).detach().half()
    target = torch.rand((1, 8, 5), generator=gen).to(DEVICE).double()[:, ::2]
    _check_against_reference(lambda b, d: fas.bce_with_logits2d(d, target, reduction="sum", backend=b),
                             torch.float16, d16, what="bce with a float64 strided target")
    ours = fas.generator_loss(x, _leaf(d16), None, lambda_adv=0.3, backend=T)
    ref = fas.generator_loss(x, _leaf(d16), None, lambda_adv=0.3, backend="reference")
    for a, b in zip(ours, ref):
        assert_close(a, b, torch.bfloat16, "generator with a float16 d_logits")


# ----------------------------------------------------------------------------------------------- low precision

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_against_float64(dtype, gen):
    shape = (2, 19, 3, 7)
    x = make_logits(shape, dtype, "channels_last", DEVICE, generator=gen)
    t = make_target(shape, DEVICE, generator=gen)
    d = make_d_logits((2, 3, 7), dtype, DEVICE, generator=gen)
    x64, d64 = x.detach().double().cpu(), d.detach().double().cpu()

    loss = fas.cross_entropy2d(x, t, backend=T)
    assert loss.dtype == torch.float32
    loss.backward()
    assert x.grad.dtype == dtype
    ref = oracle.cross_entropy2d(_leaf(x64), t.cpu())
    assert_close(loss, ref, dtype, "ce")
    x64l = _leaf(x64)
    oracle.cross_entropy2d(x64l, t.cpu()).backward()
    assert_close(x.grad, x64l.grad, dtype, "ce grad")

    p = fas.softmax2d(x, backend=T)
    assert p.dtype == dtype
    assert_close(p, oracle.softmax2d(x64), dtype, "softmax")

    g = fas.generator_loss(x, d, None, lambda_adv=0.1, lambda_semi=1.0, backend=T)
    g_ref = oracle.generator_loss(x64, d64, None, 0.1, 1.0)
    for field, a, b in zip(g._fields, g, g_ref):
        assert_close(a, b, dtype, f"generator {field}")


# ---------------------------------------------------------------------------------------------------- autograd

def test_logits_feeding_two_losses_are_not_corrupted(gen):
    """The same logits feed generator_loss and, through softmax2d, a second loss: gradients add up correctly
    and the logits are unchanged (a kernel writing its gradient into the logits would break both)."""
    shape = (2, 5, 4, 3)
    x0 = make_logits(shape, torch.float32, "contiguous", DEVICE, generator=gen).detach()
    t = make_target(shape, DEVICE, generator=gen)
    disc = torch.nn.Conv2d(5, 1, 1).to(DEVICE)
    grads = {}
    for backend in (T, "reference"):
        x = _leaf(x0)
        p = fas.softmax2d(x, backend=backend)
        d = disc(p)
        out = fas.generator_loss(x, d, t, lambda_adv=0.5, backend=backend)
        extra = fas.cross_entropy2d(x, t, reduction="sum", backend=backend)
        (out.total + 0.1 * extra).backward()
        assert torch.equal(x.detach(), x0), "the logits were written to"
        grads[backend] = x.grad
    assert_close(grads[T], grads["reference"], torch.float32, "two losses on the same logits")


@pytest.mark.parametrize("labelled", [True, False])
def test_each_generator_field_has_its_own_gradient(labelled, gen):
    shape = (2, 4, 3, 5)
    x0 = make_logits(shape, torch.float32, "contiguous", DEVICE, generator=gen).detach()
    d0 = make_d_logits((2, 3, 5), torch.float32, DEVICE, generator=gen).detach()
    t = make_target(shape, DEVICE, generator=gen) if labelled else None
    fields = ["total", "adv", "ce" if labelled else "semi"]
    weights = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.7, -2.0, 3.0)]
    for wts in weights:
        grads = {}
        for backend in (T, "reference"):
            x, d = _leaf(x0), _leaf(d0)
            out = fas.generator_loss(x, d, t, lambda_adv=0.3, lambda_semi=0.6, backend=backend)
            assert not out.semi_ratio.requires_grad
            sum(w * getattr(out, f) for w, f in zip(wts, fields)).backward()
            grads[backend] = (x.grad if x.grad is not None else torch.zeros_like(x),
                              d.grad if d.grad is not None else torch.zeros_like(d))
        for a, b, name in zip(grads[T], grads["reference"], ("logits", "d_logits")):
            assert_close(a, b, torch.float32, f"{dict(zip(fields, wts))} -> {name}")


def test_backward_twice_with_retain_graph(gen):
    shape = (1, 6, 3, 4)
    x = make_logits(shape, torch.float32, "sliced", DEVICE, generator=gen)
    d = make_d_logits((1, 3, 4), torch.float32, DEVICE, generator=gen)
    t = make_target(shape, DEVICE, generator=gen)
    losses = [
        fas.generator_loss(x, d, t, lambda_adv=0.2, backend=T).total,
        fas.generator_loss(x, d, None, lambda_adv=0.2, backend=T).total,
        fas.cross_entropy2d(x, t, backend=T),
        fas.semi_cross_entropy2d(x, d, backend=T),
        fas.softmax2d(x, backend=T)[:, 1].sum(),
        fas.discriminator_loss(d, d * 2, backend=T),
    ]
    for loss in losses:
        x.grad = d.grad = None
        loss.backward(retain_graph=True)
        once = [g.clone() for g in (x.grad, d.grad) if g is not None]
        loss.backward()
        twice = [g for g in (x.grad, d.grad) if g is not None]
        for a, b in zip(once, twice):
            torch.testing.assert_close(b, 2 * a)


def test_no_gradient_work_without_grad(gen, monkeypatch):
    """No gradient buffer is stored (STORE_GRAD off) when the input needs none or grad mode is off."""
    from fastadvseg.kernels.triton import cross_entropy as ce_kernels
    from fastadvseg.kernels.triton import generator_loss as gen_kernels

    seen = []
    real_ce, real_gen = ce_kernels.cross_entropy_forward, gen_kernels.generator_forward

    def spy_ce(*args, **kwargs):
        seen.append(("ce", kwargs["store_grad"]))
        return real_ce(*args, **kwargs)

    def spy_gen(*args, **kwargs):
        seen.append(("gen", kwargs["store_gx"], kwargs["store_gz"]))
        return real_gen(*args, **kwargs)

    monkeypatch.setattr(ce_kernels, "cross_entropy_forward", spy_ce)
    monkeypatch.setattr(gen_kernels, "generator_forward", spy_gen)
    shape = (1, 3, 2, 3)
    x = make_logits(shape, torch.float32, "contiguous", DEVICE, generator=gen)
    t = make_target(shape, DEVICE, generator=gen)
    d = make_d_logits((1, 2, 3), torch.float32, DEVICE, generator=gen).detach()
    with torch.no_grad():
        assert not fas.cross_entropy2d(x, t, backend=T).requires_grad
    assert not fas.cross_entropy2d(x.detach(), t, backend=T).requires_grad
    assert fas.cross_entropy2d(x, t, backend=T).requires_grad
    fas.generator_loss(x, d, t, lambda_adv=0.1, backend=T)
    assert seen == [("ce", False), ("ce", False), ("ce", True), ("gen", True, False)]


def test_empty_masks_give_zero_not_nan(gen):
    shape = (1, 3, 2, 3)
    x = make_logits(shape, torch.float32, "contiguous", DEVICE, generator=gen)
    d = make_d_logits((1, 2, 3), torch.float32, DEVICE, generator=gen)
    everything = torch.ones((1, 2, 3), dtype=torch.bool, device=DEVICE)
    t = torch.full((1, 2, 3), 255, device=DEVICE)
    g = fas.generator_loss(x, d, t, lambda_adv=0.5, backend=T)
    loss, ratio = fas.semi_cross_entropy2d(x, d, ignore_mask=everything, return_ratio=True, backend=T)
    disc = fas.discriminator_loss(d, d[:, :0], ignore_mask_fake=everything, backend=T)
    (g.total + loss + disc).backward()
    for value in (*g, loss, ratio, disc):
        assert float(value.detach()) == 0.0
    assert torch.count_nonzero(x.grad) == 0 and torch.count_nonzero(d.grad) == 0


def test_discriminator_maps_of_different_shapes_and_layouts(gen):
    fake = make_d_logits((2, 3, 5), torch.float32, DEVICE, layout="channels_last", generator=gen)
    real = make_d_logits((1, 7, 2), torch.float32, DEVICE, layout="sliced", generator=gen)
    mask_real = torch.rand((1, 7, 2), generator=gen).to(DEVICE) < 0.3
    _check_against_reference(
        lambda b, f, r: fas.discriminator_loss(f, r, ignore_mask_real=mask_real, backend=b), torch.float32,
        fake, real, what="discriminator")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.bool, torch.int64, torch.uint8])
def test_one_hot_dtypes(dtype, gen):
    t = make_target((2, 5, 3, 4), DEVICE, generator=gen)[:, ::2]  # strided labels
    ours = fas.one_hot2d(t, 5, dtype=dtype, backend=T)
    assert ours.dtype == dtype and ours.shape == (2, 5, 2, 4)
    assert torch.equal(ours, fas.one_hot2d(t, 5, dtype=dtype, backend="reference"))


def test_supports_device(monkeypatch):
    from fastadvseg.backends import triton as backend

    assert backend.DTYPES == (torch.float32, torch.float16, torch.bfloat16)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.supports_device(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not backend.supports_device("cpu")
    assert backend.supports_device("cuda") == torch.cuda.is_available()


def test_labels_beyond_int32_are_ignored_not_truncated(gen):
    """With validation off, 2**32 + 1 must not alias class 1 (a kernel narrowing labels to int32 would)."""
    shape = (1, 4, 2, 3)
    x = make_logits(shape, torch.float32, "contiguous", DEVICE, generator=gen)
    d = make_d_logits((1, 2, 3), torch.float32, DEVICE, generator=gen)
    t = make_target(shape, DEVICE, ignore_frac=0.0, generator=gen)
    bad = t.clone()
    bad[0, 0, :2] = torch.tensor([2 ** 32 + 1, -(2 ** 32) + 2])
    clean = bad.clone()
    clean[0, 0, :2] = 255
    labels = {T: bad, "reference": clean}
    with fas.label_validation(False):
        _check_against_reference(
            lambda b, x, d: fas.generator_loss(x, d, labels[b], lambda_adv=0.3, backend=b).total,
            torch.float32, x, d, what="generator")
        _check_against_reference(lambda b, x: fas.cross_entropy2d(x, labels[b], reduction="none", backend=b),
                                 torch.float32, x, what="ce")
        assert torch.equal(fas.one_hot2d(bad, 4, backend=T), fas.one_hot2d(clean, 4, backend="reference"))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_target_that_needs_a_gradient(reduction, gen):
    """A soft-label target map that is itself trained gets its gradient (-z at counted pixels), like PyTorch's."""
    d = make_d_logits((2, 3, 4), torch.float32, DEVICE, generator=gen)
    target = torch.rand((2, 1, 3, 4), generator=gen).to(DEVICE)
    mask = torch.rand((2, 3, 4), generator=gen).to(DEVICE) < 0.3
    _check_against_reference(
        lambda b, d, t: fas.bce_with_logits2d(d, t, ignore_mask=mask, reduction=reduction, backend=b),
        torch.float32, d, target, what=f"bce soft target {reduction}")
    _check_against_reference(lambda b, d, t: fas.bce_with_logits2d(d, t, reduction=reduction, backend=b),
                             torch.float32, d, torch.tensor(0.7, device=DEVICE), what="bce 0-dim target")
