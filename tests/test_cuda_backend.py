"""The ``cuda`` backend (CUDA C++ kernels of fastadvseg/kernels/cuda/) against the reference backend.

Each op test runs twice (the ``device`` fixture):
* ``cuda``: the real kernels on a GPU; skipped without CUDA or without the built extension
  (``pip install -e . --no-build-isolation`` on a machine with a CUDA build of torch and the CUDA toolkit);
* ``emulated``: on any machine with g++ and the CUDA headers, the kernels' per-pixel code
  (fastadvseg/kernels/cuda/pixel_ops.cuh) compiled for the host and run over CPU tensors behind a stand-in of the binding
  (tests/cuda_emulation), with the backend's real autograd layer (fastadvseg/backends/cuda.py).
The reference backend runs on the same tensors, so both see identical inputs; values are compared in float32,
gradients in the input dtype. The launches with ``size`` (fused bilinear upsampling) are compared with the reference
backend on F.interpolate(x.float(), size) and checked for their argument errors. Determinism, streams, >2**31
elements, the memory of the upsampled ops and the triton comparison need the GPU.

``test_nvcc_compiles_cuda_kernels`` runs on any machine with nvcc: it compiles every fastadvseg/kernels/cuda/*.cu for sm_80
and sm_90 and syntax-checks the binding (``.ci/nvcc_check.sh``), so a syntax error cannot land unseen. Deselect it
with ``-k "not nvcc"`` or FASTADVSEG_SKIP_NVCC_TEST=1 (CI runs the script itself).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import fastadvseg as fas
from fastadvseg import _dispatch

from cuda_emulation import inputs
from cuda_emulation.emulated_ext import load_emulated_backend

ROOT = Path(__file__).resolve().parents[1]

HAS_CUDA_BACKEND = torch.cuda.is_available() and "cuda" in fas.available_backends("cuda")
requires_cuda = pytest.mark.skipif(
    not HAS_CUDA_BACKEND,
    reason="needs a GPU and the built cuda backend: "
    + (_dispatch.unavailable_reason("cuda") or "no CUDA device visible"),
)
HAS_TRITON = torch.cuda.is_available() and "triton" in fas.available_backends("cuda")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "sliced"]
# odd shapes: N=1, C=1, C not a power of two, H*W prime, W=1, C=150, more pixels than one block
SHAPES = [(2, 5, 7, 9), (1, 1, 3, 5), (3, 21, 13, 1), (1, 150, 3, 5), (2, 19, 37, 29)]
# tolerances: losses are float32 from identical inputs; gradients are stored in the input dtype
LOSS_TOL = dict(rtol=1e-4, atol=1e-5)
GRAD_TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-6),
    torch.float16: dict(rtol=4e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=3e-2, atol=1e-4),
    torch.float64: dict(rtol=1e-4, atol=1e-6),
}


# ------------------------------------------------------------------------------------------------------- inputs

_rand = inputs.rand


def _with_layout(base: torch.Tensor, layout: str, device="cuda") -> torch.Tensor:
    return inputs.with_layout(base, layout, device)


def _logits(shape, dtype, layout, gen, scale=3.0, device="cuda"):
    return _with_layout(_rand(shape, gen, scale).to(dtype), layout, device=device).requires_grad_(True)


def _target(shape, gen, ignore_frac=0.25, ignore_index=255, layout="contiguous", device="cuda"):
    return inputs.target(shape, gen, ignore_frac, ignore_index, layout, device)


def _mask(shape_nhw, gen, frac=0.3, layout="contiguous", device="cuda"):
    return inputs.mask(shape_nhw, gen, frac, layout, device)


def _twin(t: torch.Tensor) -> torch.Tensor:
    """An independent leaf with the same values and strides (for the reference side)."""
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
    out.copy_(t.detach())
    return out.requires_grad_(t.requires_grad)


def _close(actual, expected, **tol):
    torch.testing.assert_close(actual, expected, equal_nan=True, **tol)


def _backward_both(out, ref, gen, scalar_grad):
    """Backward through both results with the same upstream gradient: a random map for reduction='none'."""
    if out.dim() > 0:
        g = _rand(out.shape, gen, 1.0).float().to(out.device)
    else:
        g = torch.tensor(scalar_grad, device=out.device)
    out.backward(g)
    ref.backward(g)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(20180723)


@pytest.fixture(params=["cuda", "emulated"])
def device(request, monkeypatch):
    """Where backend="cuda" runs: the real kernels on a GPU, or their per-pixel code emulated on the CPU.

    For "emulated", the dispatch table's "cuda" entry is, for this test only, fastadvseg/backends/cuda.py loaded
    with the CPU stand-in of its extension, accepting CPU tensors.
    """
    if request.param == "cuda":
        if not HAS_CUDA_BACKEND:
            pytest.skip("needs a GPU and the built cuda backend: "
                        + (_dispatch.unavailable_reason("cuda") or "no CUDA device visible"))
        return "cuda"
    module = load_emulated_backend(request.getfixturevalue("emulated_ext"), monkeypatch)
    monkeypatch.setattr(module, "supports_device", lambda d: True)
    monkeypatch.setitem(_dispatch._modules, "cuda", module)
    monkeypatch.setattr(_dispatch, "_resolved", {})
    return "cpu"


# -------------------------------------------------------------------------------------------------------- tests

@requires_cuda
def test_cuda_backend_is_listed_and_contract():
    from fastadvseg.backends import cuda as backend
    assert backend.DTYPES == (torch.float32, torch.float16, torch.bfloat16)
    assert backend.supports_device(torch.device("cuda"))
    assert not backend.supports_device(torch.device("cpu"))
    assert "cuda" in fas.available_backends("cuda")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_softmax2d(shape, dtype, layout, gen, device):
    x = _logits(shape, dtype, layout, gen, device=device)
    xr = _twin(x)
    y = fas.softmax2d(x, backend="cuda")
    yr = fas.softmax2d(xr, backend="reference")
    assert y.dtype == dtype and y.shape == x.shape
    _close(y.float(), yr.float(), **GRAD_TOL[dtype])
    gy = _rand(shape, gen, 1.0).to(dtype).to(device)
    (y * gy).sum().backward()
    (yr * gy).sum().backward()
    # backward from the stored probabilities (in the logits' dtype, like every kernel backend): for 16-bit types
    # the error is relative to the gradient's scale, not to each element
    scaled = dict(rtol=GRAD_TOL[dtype]["rtol"], atol=GRAD_TOL[dtype]["rtol"] * float(xr.grad.abs().max()))
    _close(x.grad.float(), xr.grad.float(), **(GRAD_TOL[dtype] if dtype == torch.float32 else scaled))
    # an expanded (all strides 0) upstream gradient, as .sum() produces
    x.grad = xr.grad = None
    fas.softmax2d(x, backend="cuda").sum().backward()
    fas.softmax2d(xr, backend="reference").sum().backward()
    unit = dict(rtol=GRAD_TOL[dtype]["rtol"], atol=GRAD_TOL[dtype]["rtol"])  # the exact gradient is 0 here
    _close(x.grad.float(), xr.grad.float(), **(GRAD_TOL[dtype] if dtype == torch.float32 else unit))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cross_entropy2d(shape, dtype, layout, reduction, weighted, gen, device):
    x = _logits(shape, dtype, layout, gen, device=device)
    xr = _twin(x)
    t = _target(shape, gen, layout=layout, device=device)
    w = (torch.rand(shape[1], generator=gen) + 0.5).to(device) if weighted else None
    out = fas.cross_entropy2d(x, t, weight=w, reduction=reduction, backend="cuda")
    ref = fas.cross_entropy2d(xr, t, weight=w, reduction=reduction, backend="reference")
    assert out.dtype == torch.float32 and out.shape == ref.shape
    _close(out, ref, **LOSS_TOL)
    _backward_both(out, ref, gen, 1.7)
    assert x.grad.dtype == dtype
    _close(x.grad.float(), xr.grad.float(), **GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy2d_matches_torch(dtype, gen, device):
    shape = (2, 21, 17, 23)
    x = _logits(shape, dtype, "contiguous", gen, device=device)
    xr = _twin(x)
    t = _target(shape, gen, device=device)
    w = (torch.rand(21, generator=gen) + 0.5).to(device)
    out = fas.cross_entropy2d(x, t, weight=w, backend="cuda")
    ref = torch.nn.functional.cross_entropy(xr.float(), t, weight=w, ignore_index=255)
    _close(out, ref, **LOSS_TOL)
    out.backward()
    ref.backward()
    _close(x.grad.float(), xr.grad.float(), **GRAD_TOL[dtype])


def test_cross_entropy2d_all_ignored_and_nan_at_ignored_pixels(gen, device):
    shape = (2, 4, 5, 6)
    x = _logits(shape, torch.float32, "contiguous", gen, device=device)
    t = torch.full((2, 5, 6), 255, device=device)
    loss = fas.cross_entropy2d(x, t, backend="cuda")
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(x.grad) == 0
    # a NaN logit at an ignored pixel never reaches the loss; at a counted pixel it does
    x2 = _rand(shape, gen).float().to(device)
    x2[0, :, 0, 0] = float("nan")
    t2 = _target(shape, gen, ignore_frac=0.0, device=device)
    t2[0, 0, 0] = 255
    x2.requires_grad_(True)
    loss = fas.cross_entropy2d(x2, t2, backend="cuda")
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x2.grad).all()
    t2[0, 0, 0] = 1
    assert torch.isnan(fas.cross_entropy2d(x2.detach(), t2, backend="cuda"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_logits_propagate_like_pytorch(dtype, device):
    inf, nan = float("inf"), float("nan")
    rows = [[inf, 1.0, 2.0, 0.0], [-inf, -inf, 3.0, 1.0], [-inf, -inf, -inf, -inf], [inf, inf, 0.0, 0.0],
            [nan, 1.0, 2.0, 3.0], [0.5, -inf, 2.0, -inf], [1.0, 2.0, 3.0, 4.0]]
    x = torch.tensor(rows, dtype=torch.float64).T.reshape(1, 4, 1, len(rows)).to(dtype).to(device)
    for label in range(4):
        t = torch.full((1, 1, len(rows)), label, device=device)
        out = fas.cross_entropy2d(x, t, reduction="none", backend="cuda")
        ref = fas.cross_entropy2d(x, t, reduction="none", backend="reference")
        _close(out, ref, **LOSS_TOL)
    _close(fas.softmax2d(x, backend="cuda").float(), fas.softmax2d(x, backend="reference").float(),
           **GRAD_TOL[dtype])
    d = torch.full((1, 1, len(rows)), 2.0, device=device)
    _close(fas.semi_cross_entropy2d(x, d, reduction="none", backend="cuda"),
           fas.semi_cross_entropy2d(x, d, reduction="none", backend="reference"), **LOSS_TOL)


def test_cross_entropy2d_out_of_range_labels_are_ignored_without_validation(gen, device):
    shape = (2, 6, 9, 7)
    x = _logits(shape, torch.float32, "contiguous", gen, device=device)
    xr = _twin(x)
    t = _target(shape, gen, device=device)
    t[0, 0, :4] = torch.tensor([6, -1, 1000, -7], device=device)
    with fas.label_validation(False):
        for reduction in ("mean", "sum", "none"):
            out = fas.cross_entropy2d(x, t, reduction=reduction, backend="cuda")
            ref = fas.cross_entropy2d(xr, t, reduction=reduction, backend="reference")
            _close(out, ref, **LOSS_TOL)
        out.sum().backward()
        ref.sum().backward()
        _close(x.grad, xr.grad, **GRAD_TOL[torch.float32])
        one = fas.one_hot2d(t, 6, backend="cuda")
        _close(one, fas.one_hot2d(t, 6, backend="reference"), rtol=0, atol=0)


@pytest.mark.parametrize("target_kind", ["zero", "one", "soft", "map", "scalar_tensor"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bce_with_logits2d(dtype, layout, masked, reduction, target_kind, gen, device):
    nhw = (3, 11, 13)
    d = _with_layout(_rand(nhw, gen).to(dtype), layout, device=device).requires_grad_(True)
    dr = _twin(d)
    target = {"zero": 0.0, "one": 1.0, "soft": 0.3}.get(target_kind)
    target_r = target
    if target_kind == "map":
        target = _with_layout(torch.rand(nhw, generator=gen), layout, device=device).requires_grad_(True)
        target_r = _twin(target)
    elif target_kind == "scalar_tensor":
        target = torch.tensor(0.8, device=device)
        target_r = target
    mask = _mask(nhw, gen, layout=layout, device=device) if masked else None
    out = fas.bce_with_logits2d(d, target, ignore_mask=mask, reduction=reduction, backend="cuda")
    ref = fas.bce_with_logits2d(dr, target_r, ignore_mask=mask, reduction=reduction, backend="reference")
    assert out.dtype == torch.float32 and out.shape == ref.shape
    _close(out, ref, **LOSS_TOL)
    _backward_both(out, ref, gen, 0.9)
    _close(d.grad.float(), dr.grad.float(), **GRAD_TOL[dtype])
    if target_kind == "map":
        _close(target.grad, target_r.grad, **GRAD_TOL[torch.float32])


def test_bce_with_logits2d_4d_map_and_infinities(gen, device):
    d = _rand((2, 1, 5, 7), gen).float().to(device)
    d[0, 0, 0, :4] = torch.tensor([float("inf"), -float("inf"), 80.0, -80.0])
    for target in (0.0, 1.0):
        for reduction in ("none", "sum"):
            out = fas.bce_with_logits2d(d, target, reduction=reduction, backend="cuda")
            ref = fas.bce_with_logits2d(d, target, reduction=reduction, backend="reference")
            assert out.shape == ref.shape
            _close(out, ref, **LOSS_TOL)


@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.7])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_semi_cross_entropy2d(dtype, layout, masked, reduction, threshold, gen, device):
    shape = (2, 7, 9, 11)
    x = _logits(shape, dtype, layout, gen, device=device)
    xr = _twin(x)
    d = _with_layout(_rand((2, 9, 11), gen, 2.0).to(torch.float16), layout, device=device).requires_grad_(True)
    mask = _mask((2, 9, 11), gen, layout=layout, device=device) if masked else None
    out, ratio = fas.semi_cross_entropy2d(x, d, threshold=threshold, ignore_mask=mask, reduction=reduction,
                                          return_ratio=True, backend="cuda")
    ref, ratio_r = fas.semi_cross_entropy2d(xr, d, threshold=threshold, ignore_mask=mask, reduction=reduction,
                                            return_ratio=True, backend="reference")
    _close(out, ref, **LOSS_TOL)
    _close(ratio, ratio_r.float(), rtol=1e-6, atol=1e-7)
    assert not ratio.requires_grad
    _backward_both(out, ref, gen, 1.3)
    _close(x.grad.float(), xr.grad.float(), **GRAD_TOL[dtype])
    assert d.grad is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_semi_argmax_ties_take_the_first_maximum(dtype, device):
    # integer logits: exact in every dtype, many ties
    x = torch.tensor([[3, 5, 5, 1], [2, 2, 2, 2], [-1, 4, 0, 4]], dtype=torch.float64).T.reshape(1, 4, 1, 3)
    x = x.to(dtype).to(device).requires_grad_(True)
    xr = _twin(x)
    d = torch.full((1, 1, 1, 3), 3.0, device=device)
    out = fas.semi_cross_entropy2d(x, d, reduction="sum", backend="cuda")
    ref = fas.semi_cross_entropy2d(xr, d, reduction="sum", backend="reference")
    _close(out, ref, **LOSS_TOL)
    out.backward()
    ref.backward()
    _close(x.grad.float(), xr.grad.float(), **GRAD_TOL[dtype])
    # the pseudo-label (the -1 entry of the gradient of the sum) is the first maximum
    assert (x.grad.float()[0, :, 0, :].argmin(dim=0).cpu() == torch.tensor([1, 0, 1])).all()


def _tau_clear_of(teacher, want):
    """A tau near `want` at least 1e-4 from the float64 confidence of every pixel of these teacher logits (the
    kernels decide conf >= tau in float32: no pixel may sit at the boundary)."""
    t = teacher.detach().double().cpu()
    conf = 1.0 / torch.exp(t - t.max(dim=1, keepdim=True).values).sum(dim=1)
    for k in range(5000):
        for tau in (want + k * 1e-4, want - k * 1e-4):
            if float((conf - tau).abs().min()) > 1e-4:
                return tau
    raise AssertionError("no tau clear of the confidences")


@pytest.mark.parametrize("with_d", [False, True])
@pytest.mark.parametrize("teacher_kind", ["none", "separate", "same"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pseudo_label_cross_entropy2d(dtype, layout, reduction, teacher_kind, with_d, gen, device):
    shape = (2, 7, 9, 11)
    x = _logits(shape, dtype, layout, gen, device=device)
    xr = _twin(x)
    teacher = {"none": None, "same": x.detach(),
               "separate": _with_layout(_rand(shape, gen, 2.0).to(dtype), layout, device=device)}[teacher_kind]
    tau = _tau_clear_of(x if teacher is None else teacher, 0.6)
    d = _with_layout(_rand((2, 9, 11), gen, 2.0).to(torch.float16), layout, device=device) if with_d else None
    mask = _mask((2, 9, 11), gen, layout=layout, device=device)
    kw = dict(confidence_threshold=tau, d_logits=d, ignore_mask=mask, reduction=reduction, return_ratio=True)
    out, ratio = fas.pseudo_label_cross_entropy2d(x, teacher, backend="cuda", **kw)
    ref, ratio_r = fas.pseudo_label_cross_entropy2d(xr, teacher, backend="reference", **kw)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    _close(out, ref, **LOSS_TOL)
    _close(ratio, ratio_r.float(), rtol=1e-6, atol=1e-7)
    assert 0 < float(ratio) < 1 and not ratio.requires_grad
    _backward_both(out, ref, gen, 1.3)
    assert x.grad.dtype == dtype
    _close(x.grad.float(), xr.grad.float(), **GRAD_TOL[dtype])


@pytest.mark.parametrize("labelled", [True, False])
@pytest.mark.parametrize("d_dtype", [None, torch.float32])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 21, 13, 17), (1, 3, 1, 1), (3, 19, 40, 33)])
def test_generator_loss(shape, dtype, layout, d_dtype, labelled, gen, device):
    n, c, h, w = shape
    x = _logits(shape, dtype, layout, gen, device=device)
    xr = _twin(x)
    d4 = _with_layout(_rand((n, 1, h, w), gen, 2.0).to(d_dtype or dtype), layout, device=device).requires_grad_(True)
    dr = _twin(d4)
    t = _target(shape, gen, layout=layout, device=device) if labelled else None
    kw = dict(lambda_adv=0.01, lambda_semi=0.1, threshold=0.2)
    out = fas.generator_loss(x, d4, t, backend="cuda", **kw)
    ref = fas.generator_loss(xr, dr, t, backend="reference", **kw)
    assert isinstance(out, fas.GeneratorLossOutput)
    for field in out._fields:
        a, b = getattr(out, field), getattr(ref, field)
        assert a.dtype == torch.float32 and a.dim() == 0, field
        _close(a, b.float(), **LOSS_TOL)
    assert not out.semi_ratio.requires_grad
    # every differentiable field with its own weight, so each backward coefficient is exercised
    terms = [out.total, 0.3 * out.ce, 0.7 * out.adv, 0.5 * out.semi]
    terms_r = [ref.total, 0.3 * ref.ce, 0.7 * ref.adv, 0.5 * ref.semi]
    sum(t_ for t_ in terms if t_.requires_grad).backward()
    sum(t_ for t_ in terms_r if t_.requires_grad).backward()
    _close(x.grad.float(), xr.grad.float(), **GRAD_TOL[dtype])
    _close(d4.grad.float(), dr.grad.float(), **GRAD_TOL[d4.dtype])


def test_generator_loss_empty_sets_give_zero_not_nan(gen, device):
    shape = (2, 5, 4, 6)
    x = _logits(shape, torch.float32, "contiguous", gen, device=device)
    d = torch.full((2, 1, 4, 6), -30.0, device=device, requires_grad=True)  # sigmoid ~ 0: nothing kept
    out = fas.generator_loss(x, d, None, lambda_adv=0.01, lambda_semi=0.1, backend="cuda")
    assert out.semi.item() == 0.0 and out.semi_ratio.item() == 0.0
    out.total.backward()
    assert torch.count_nonzero(x.grad) == 0 and torch.isfinite(d.grad).all()
    x.grad = None
    t = torch.full((2, 4, 6), 255, device=device)
    out = fas.generator_loss(x, d, t, lambda_adv=0.01, backend="cuda")
    assert out.total.item() == 0.0 and out.ce.item() == 0.0 and out.adv.item() == 0.0
    out.total.backward()
    assert torch.count_nonzero(x.grad) == 0


@pytest.mark.parametrize("masks", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_discriminator_loss(dtype, layout, masks, gen, device):
    fake = _with_layout(_rand((3, 1, 9, 14), gen).to(dtype), layout, device=device).requires_grad_(True)
    real = _with_layout(_rand((2, 1, 17, 5), gen).to(dtype), layout, device=device).requires_grad_(True)
    fr, rr = _twin(fake), _twin(real)
    mf = _mask((3, 9, 14), gen, layout=layout, device=device) if masks[0] else None
    mr = _mask((2, 17, 5), gen, layout=layout, device=device) if masks[1] else None
    out = fas.discriminator_loss(fake, real, ignore_mask_fake=mf, ignore_mask_real=mr, backend="cuda")
    ref = fas.discriminator_loss(fr, rr, ignore_mask_fake=mf, ignore_mask_real=mr, backend="reference")
    assert out.dtype == torch.float32
    _close(out, ref, **LOSS_TOL)
    out.backward()
    ref.backward()
    _close(fake.grad.float(), fr.grad.float(), **GRAD_TOL[dtype])
    _close(real.grad.float(), rr.grad.float(), **GRAD_TOL[dtype])


def test_discriminator_loss_one_empty_map_and_no_grad_for_constants(gen, device):
    fake = _rand((2, 0, 5), gen).float().to(device).requires_grad_(True)
    real = _rand((2, 6, 5), gen).float().to(device)
    out = fas.discriminator_loss(fake, real, backend="cuda")
    ref = fas.discriminator_loss(fake, real, backend="reference")
    _close(out, ref, **LOSS_TOL)
    out.backward()
    assert fake.grad.shape == fake.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                                   torch.uint8, torch.bool, torch.complex128])
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_one_hot2d(dtype, layout, gen, device):
    shape = (2, 7, 9, 5)
    t = _target(shape, gen, layout=layout, device=device)
    backend = _dispatch._load("cuda")  # the module itself: the public API routes float64 outputs to the reference
    out = backend.one_hot2d(t, 7, 255, dtype)
    ref = fas.one_hot2d(t, 7, dtype=dtype, backend="reference")
    assert out.dtype == dtype and out.shape == (2, 7, 9, 5) and out.is_contiguous()
    assert torch.equal(out, ref)


@requires_cuda
def test_deterministic_and_current_stream(gen):
    device = "cuda"
    shape = (4, 21, 65, 67)  # more pixels than one block: many partial sums
    x = _rand(shape, gen).float().cuda()
    d = _rand((4, 1, 65, 67), gen).float().cuda()
    t = _target(shape, gen, device=device)
    first = fas.generator_loss(x, d, None, lambda_adv=0.01, backend="cuda")
    again = fas.generator_loss(x, d, None, lambda_adv=0.01, backend="cuda")
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    ce1 = fas.cross_entropy2d(x, t, backend="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ce2 = fas.cross_entropy2d(x, t, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(ce1, ce2)


@requires_cuda
def test_more_than_2_to_the_31_elements():
    """int64 offsets: a half tensor of 2**31 + 2**23 elements, only the last pixels labelled."""
    device = "cuda"
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    n, c, h, w = 1, 2**15, 2**8, 2**8 + 1
    x = torch.empty((n, c, h, w), dtype=torch.float16, device="cuda").normal_().requires_grad_(True)
    t = torch.full((n, h, w), 255, dtype=torch.int64, device="cuda")
    t[0, -1, -3:] = torch.tensor([0, c - 1, 12345], device="cuda")
    loss = fas.cross_entropy2d(x, t, backend="cuda")
    tail = x.detach()[0, :, -1, -3:].float().T  # (3, C)
    expected = torch.nn.functional.cross_entropy(tail, t[0, -1, -3:])
    _close(loss, expected, rtol=1e-3, atol=1e-4)  # a sum of 32768 exponentials per pixel
    loss.backward()
    g_tail = x.grad[0, :, -1, -3:].float().T
    expected_g = (torch.softmax(tail, dim=1) - torch.nn.functional.one_hot(t[0, -1, -3:], c)) / 3
    _close(g_tail, expected_g, **GRAD_TOL[torch.float16])
    assert torch.count_nonzero(x.grad[0, :, :-1]) == 0


@requires_cuda
@pytest.mark.skipif(not HAS_TRITON, reason="the triton backend is not available on this machine")
@pytest.mark.parametrize("dtype", DTYPES)
def test_agrees_with_triton_backend(dtype, gen):
    device = "cuda"
    shape = (2, 21, 33, 35)
    x = _logits(shape, dtype, "channels_last", gen, device=device)
    xt = _twin(x)
    d = _rand((2, 1, 33, 35), gen, 2.0).to(dtype).cuda()
    t = _target(shape, gen, device=device)
    for labelled in (True, False):
        a = fas.generator_loss(x, d, t if labelled else None, lambda_adv=0.01, backend="cuda")
        b = fas.generator_loss(xt, d, t if labelled else None, lambda_adv=0.01, backend="triton")
        for field in a._fields:
            _close(getattr(a, field), getattr(b, field), **LOSS_TOL)
        a.total.backward()
        b.total.backward()
        _close(x.grad.float(), xt.grad.float(), **GRAD_TOL[dtype])
        x.grad = xt.grad = None
    _close(fas.softmax2d(x, backend="cuda").float(), fas.softmax2d(xt, backend="triton").float(), **GRAD_TOL[dtype])
    _close(fas.cross_entropy2d(x, t, reduction="none", backend="cuda"),
           fas.cross_entropy2d(xt, t, reduction="none", backend="triton"), **LOSS_TOL)


# ------------------------------------------------------------------------------------ fused bilinear upsampling
# The backend's launches with size (the public API gets the argument elsewhere): each equals the reference
# backend's op on F.interpolate(x.float(), size, mode="bilinear", align_corners), its gradient buffers have the
# low-resolution inputs' shapes and dtypes and equal the gradient through that interpolation.

@pytest.fixture(params=["cuda", "emulated"])
def cuda_module(request, monkeypatch):
    """(fastadvseg/backends/cuda.py, device): the real module on a GPU, or the module on the emulated kernels."""
    if request.param == "cuda":
        if not HAS_CUDA_BACKEND:
            pytest.skip("needs a GPU and the built cuda backend: "
                        + (_dispatch.unavailable_reason("cuda") or "no CUDA device visible"))
        return _dispatch._load("cuda"), "cuda"
    return load_emulated_backend(request.getfixturevalue("emulated_ext"), monkeypatch), "cpu"


def _interp(x, size, align):
    """The input as the op sees it: F.interpolate(x.float(), size) (maps: (N, h, w)); at size: x.float() itself."""
    if list(x.shape[-2:]) == list(size):
        return x.float()
    if x.dim() == 3:
        return _interp(x.unsqueeze(1), size, align).squeeze(1)
    return torch.nn.functional.interpolate(x.float(), size, mode="bilinear", align_corners=align)


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _grad_of(value, inputs):
    return torch.autograd.grad(value, inputs, allow_unused=True)


def _low_grad_close(actual, expected, like):
    assert actual.shape == like.shape and actual.dtype == like.dtype
    _close(actual.float(), expected.float(), **GRAD_TOL[like.dtype])


@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("dtype,layout", [(torch.float32, "contiguous"), (torch.float16, "channels_last"),
                                          (torch.bfloat16, "sliced")])
def test_upsampled_launches_match_the_reference_on_interpolated_inputs(cuda_module, dtype, layout, align, gen):
    from fastadvseg.backends import reference as ref

    module, device = cuda_module
    n, c, size = 2, 5, (13, 11)
    x = _with_layout(_rand((n, c, 5, 4), gen).to(dtype), layout, device)          # logits at about 1/2.5
    z = _with_layout(_rand((n, 3, 2), gen, 2.0).to(dtype), layout, device)        # D at about 1/5
    t = _target((n, c, *size), gen, layout=layout, device=device)
    mask = _mask((n, *size), gen, layout=layout, device=device)
    w = (torch.rand(c, generator=gen) + 0.5).to(device)
    kw = dict(size=size, align_corners=align)

    # softmax2d and its backward at the logits' resolution
    x32 = _leaf(x.float())
    y = module.softmax2d(x, **kw)
    y_ref = ref.softmax2d(_interp(x32, size, align))
    assert y.shape == (n, c, *size) and y.dtype == dtype
    _close(y.float(), y_ref.detach(), **GRAD_TOL[dtype])
    gy = _rand(y.shape, gen, 1.0).to(dtype).to(device)
    gx = module.softmax2d_backward(y, gy, low_size=tuple(x.shape[2:]), align_corners=align)
    (gx_ref,) = _grad_of((y_ref * gy.float()).sum(), x32)
    scaled = dict(rtol=GRAD_TOL[dtype]["rtol"], atol=GRAD_TOL[dtype]["rtol"] * float(gx_ref.abs().max()))
    assert gx.shape == x.shape and gx.dtype == dtype
    _close(gx.float(), gx_ref, **(GRAD_TOL[dtype] if dtype == torch.float32 else scaled))

    # cross_entropy2d with class weights and label smoothing
    launch = module.cross_entropy2d(x, t, w, 255, 0.1, "none", True, **kw)
    sums_ref, map_ref = ref.cross_entropy2d(_interp(x32, size, align), t, w, 255, 0.1)
    _close(launch.sums, sums_ref.detach(), **LOSS_TOL)
    _close(launch.loss_map, map_ref.detach(), **LOSS_TOL)
    _low_grad_close(launch.grad, _grad_of(sums_ref[0], x32)[0], x)
    assert launch.bad.tolist() == [0, 0]

    # semi_cross_entropy2d: logits and D at different resolutions, the keep rule on the interpolated D
    launch = module.semi_cross_entropy2d(x, z, 0.2, mask, "none", True, **kw)
    sums_ref, map_ref = ref.semi_cross_entropy2d(_interp(x32, size, align), _interp(z, size, align), 0.2, mask)
    _close(launch.sums, sums_ref.detach(), **LOSS_TOL)
    _close(launch.loss_map, map_ref.detach(), **LOSS_TOL)
    _low_grad_close(launch.grad, _grad_of(sums_ref[0], x32)[0], x)

    # generator_loss, labelled and unlabelled: the term's gradient to the logits, the adv's to D
    for target in (t, None):
        z32 = _leaf(z.float())
        launch = module.generator_loss(x, z, target, 0.01, 0.1, 0.2, 255, True, True, **kw)
        sums_ref = ref.generator_loss(_interp(x32, size, align), _interp(z32, size, align), target, 0.2, 255)
        _close(launch.sums, sums_ref.detach(), **LOSS_TOL)
        _low_grad_close(launch.grad, _grad_of(sums_ref[0], x32)[0], x)
        _low_grad_close(launch.grad_d, _grad_of(sums_ref[2], z32)[0], z)
        assert (launch.bad is None) == (target is None)

    # bce_with_logits2d against a target map, and discriminator_loss with one map at size already
    z32 = _leaf(z.float())
    tmap = torch.rand((n, *size), generator=gen).to(device)
    launch = module.bce_with_logits2d(z, tmap, 0.0, mask, "none", True, **kw)
    sums_ref, map_ref = ref.bce_with_logits2d(_interp(z32, size, align), tmap, 0.0, mask)
    _close(launch.sums, sums_ref.detach(), **LOSS_TOL)
    _close(launch.loss_map, map_ref.detach(), **LOSS_TOL)
    _low_grad_close(launch.grad, _grad_of(sums_ref[0], z32)[0], z)
    real = _rand((n, *size), gen).to(dtype).to(device)
    r32 = _leaf(real.float())
    launch = module.discriminator_loss(z, real, None, mask, True, True, **kw)
    sums_ref = ref.discriminator_loss(_interp(z32, size, align), _interp(r32, size, align), None, mask)
    _close(launch.sums, sums_ref.detach(), **LOSS_TOL)
    _low_grad_close(launch.grad_fake, _grad_of(sums_ref[0], z32)[0], z)
    _low_grad_close(launch.grad_real, _grad_of(sums_ref[2], r32)[0], real)


@pytest.mark.parametrize("tau", [None, 0.55])
@pytest.mark.parametrize("align", [False, True])
@pytest.mark.parametrize("dtype,layout", [(torch.float32, "contiguous"), (torch.float16, "channels_last"),
                                          (torch.bfloat16, "sliced")])
def test_upsampled_pseudo_label_launch_matches_the_reference(cuda_module, dtype, layout, align, tau, gen):
    """Student, teacher and D each at its own grid (also one of them at size): the launch's sums, loss map and
    gradient (of the loss sum, at the logits' grid) equal the reference's on the interpolated inputs."""
    from fastadvseg.backends import reference as ref

    module, device = cuda_module
    n, c, size = 2, 5, (13, 11)
    x = _with_layout(_rand((n, c, 5, 4), gen).to(dtype), layout, device)
    mask = _mask((n, *size), gen, layout=layout, device=device)
    teachers = {"none": None, "low": _with_layout(_rand((n, c, 3, 6), gen, 2.0).to(dtype), layout, device),
                "at size": _with_layout(_rand((n, c, *size), gen, 2.0).to(dtype), layout, device)}
    for name, teacher in teachers.items():
        for d in (None, _with_layout(_rand((n, 2, 3), gen, 2.0).to(torch.bfloat16), layout, device)):
            x32 = _leaf(x.float())
            t_up = _interp(x32 if teacher is None else teacher, size, align).detach()
            t_tau = None if tau is None else _tau_clear_of(t_up, tau)
            launch = module.pseudo_label_cross_entropy2d(x, teacher, d, t_tau, 0.3, mask, "none", True, size=size,
                                                         align_corners=align)
            sums_ref, map_ref = ref.pseudo_label_cross_entropy2d(
                x32, None if teacher is None else teacher.float(), d, t_tau, 0.3, mask, size=size,
                align_corners=align)
            _close(launch.sums, sums_ref.detach(), **LOSS_TOL)
            _close(launch.loss_map, map_ref.detach(), **LOSS_TOL)
            _low_grad_close(launch.grad, _grad_of(sums_ref[0], x32)[0], x)
            assert launch.scales.tolist() == [1.0] and launch.bad is None
            assert 0 < float(launch.sums[1]) < float(launch.sums[2]) or (tau is None and d is None), name
    # the logits at size, the teacher below it
    xs = _with_layout(_rand((n, c, *size), gen).to(dtype), layout, device)
    xs32 = _leaf(xs.float())
    t_tau = None if tau is None else _tau_clear_of(_interp(teachers["low"], size, align), tau)
    launch = module.pseudo_label_cross_entropy2d(xs, teachers["low"], None, t_tau, 0.3, None, "none", True,
                                                 size=size, align_corners=align)
    sums_ref, map_ref = ref.pseudo_label_cross_entropy2d(xs32, teachers["low"].float(), None, t_tau, 0.3, None,
                                                         size=size, align_corners=align)
    _close(launch.sums, sums_ref.detach(), **LOSS_TOL)
    _close(launch.loss_map, map_ref.detach(), **LOSS_TOL)
    _low_grad_close(launch.grad, _grad_of(sums_ref[0], xs32)[0], xs)


def test_pseudo_label_launch_arguments_are_checked(cuda_module, gen):
    module, device = cuda_module
    x = _rand((2, 3, 4, 5), gen).float().to(device)
    for teacher, words in ((_rand((1, 3, 4, 5), gen).float().to(device), "teacher_logits"),
                           (_rand((2, 4, 4, 5), gen).float().to(device), "teacher_logits"),
                           (_rand((2, 3, 4, 5), gen).half().to(device), "teacher_logits"),
                           (_rand((2, 3, 3, 5), gen).float().to(device), "teacher_logits")):
        with pytest.raises(ValueError, match=words):
            module.pseudo_label_cross_entropy2d(x, teacher, None, 0.9, 0.2, None, "mean", False)
    with pytest.raises(ValueError, match="no pixels"):
        module.pseudo_label_cross_entropy2d(x, torch.empty((2, 3, 0, 5), device=device), None, 0.9, 0.2, None, "mean",
                                            False, size=(8, 9))
    with pytest.raises(ValueError, match="d_logits"):
        module.pseudo_label_cross_entropy2d(x, None, _rand((1, 2, 3), gen).float().to(device), 0.9, 0.2, None,
                                            "mean", False, size=(8, 9))
    with pytest.raises(ValueError, match="ignore_mask"):
        module.pseudo_label_cross_entropy2d(x, None, None, 0.9, 0.2, torch.zeros((2, 8, 8), dtype=torch.bool,
                                                                              device=device), "mean", False,
                                            size=(8, 9))


def test_upsampled_launch_arguments_are_checked(cuda_module, gen):
    module, device = cuda_module
    x = _rand((2, 3, 4, 5), gen).float().to(device)
    t = _target((2, 3, 8, 9), gen, device=device)
    z = _rand((2, 2, 3), gen).float().to(device)
    with pytest.raises(TypeError):
        module.cross_entropy2d(x, t, None, 255, 0.0, "mean", False, (8, 9))  # keyword-only
    for size, error, words in (((8,), ValueError, "pair"), ((8, 0), ValueError, "positive"),
                               ((8.0, 9), TypeError, "ints"), ((True, 9), TypeError, "ints")):
        with pytest.raises(error, match=words):
            module.cross_entropy2d(x, t, None, 255, 0.0, "mean", False, size=size)
    with pytest.raises(TypeError, match="align_corners"):
        module.softmax2d(x, size=(8, 9), align_corners=1)
    with pytest.raises(ValueError, match=r"target must have shape \(N, H, W\) = \(2, 8, 10\).*\(2, 8, 9\)"):
        module.cross_entropy2d(x, t, None, 255, 0.0, "mean", False, size=(8, 10))
    with pytest.raises(ValueError, match="ignore_mask"):
        module.semi_cross_entropy2d(x, z, 0.2, torch.zeros((2, 8, 8), dtype=torch.bool, device=device), "mean",
                                    False, size=(8, 9))
    with pytest.raises(ValueError, match="d_logits"):
        module.generator_loss(x, z[:1], None, 0.01, 0.1, 0.2, 255, False, False, size=(8, 9))
    with pytest.raises(ValueError, match="no pixels"):
        module.softmax2d(torch.empty((2, 3, 0, 5), device=device), size=(8, 9))
    with pytest.raises(ValueError, match="ignore_mask_real"):
        module.discriminator_loss(z, z, None, torch.zeros((2, 3, 2), dtype=torch.bool, device=device), False, False,
                                  size=(8, 9))


@requires_cuda
def test_upsampled_on_gpu_deterministic_and_without_full_resolution_logits(gen):
    """41 -> 321 (DeepLab's 1/8 of a VOC crop): the same bits on every run, F.interpolate + F.cross_entropy's
    values, and no buffer the size of the upsampled logits (its forward or its gradient) at any time."""
    from fastadvseg.backends import cuda as module

    n, c, size = 2, 21, (321, 321)
    x = _rand((n, c, 41, 41), gen).float().cuda()
    t = _target((n, c, *size), gen, device="cuda")
    z = _rand((n, 11, 11), gen).float().cuda()
    full_bytes = n * c * size[0] * size[1] * 4
    for align in (False, True):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        first = module.cross_entropy2d(x, t, None, 255, 0.0, "mean", True, size=size, align_corners=align)
        torch.cuda.synchronize()
        assert torch.cuda.max_memory_allocated() - before < full_bytes // 4
        again = module.cross_entropy2d(x, t, None, 255, 0.0, "mean", True, size=size, align_corners=align)
        assert torch.equal(first.sums, again.sums) and torch.equal(first.grad, again.grad)
        x32 = x.clone().requires_grad_(True)
        up = torch.nn.functional.interpolate(x32, size, mode="bilinear", align_corners=align)
        loss = torch.nn.functional.cross_entropy(up, t, ignore_index=255, reduction="sum")
        loss.backward()
        _close(first.sums[0], loss.detach(), rtol=1e-5, atol=1e-3)
        _close(first.grad, x32.grad, rtol=1e-4, atol=1e-4)
        g1 = module.generator_loss(x, z, None, 0.01, 0.1, 0.2, 255, True, True, size=size, align_corners=align)
        g2 = module.generator_loss(x, z, None, 0.01, 0.1, 0.2, 255, True, True, size=size, align_corners=align)
        assert all(torch.equal(a, b) for a, b in zip(g1[:3], g2[:3]))


# ------------------------------------------------------------------------------------------- compile guard (CPU)

@pytest.mark.skipif(shutil.which(os.environ.get("NVCC", "nvcc")) is None, reason="nvcc is not on PATH")
@pytest.mark.skipif(os.environ.get("FASTADVSEG_SKIP_NVCC_TEST") == "1",
                    reason="FASTADVSEG_SKIP_NVCC_TEST=1: .ci/nvcc_check.sh already ran in this CI job")
def test_nvcc_compiles_cuda_kernels():
    """Every fastadvseg/kernels/cuda/*.cu compiles for sm_80 and sm_90 (no GPU needed): a syntax error cannot land unseen."""
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "nvcc_check.sh")], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout
