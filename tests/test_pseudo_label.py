"""pseudo_label_cross_entropy2d beyond the contract suite: its identities with the other ops (no teacher is the
student's own detached logits; D's mask without a confidence test is semi_cross_entropy2d), where the gradient
goes (never to the teacher or D), torch.compile(fullgraph=True), torch.func.grad, torch.library.opcheck, the kept
ratio, the edge cases (nothing kept, all ignored, N = 0, C = 1, tau 0 and 1, NaN logits) and the nn module.

Every backend that has the op's launch runs here; ``shim`` is the registered op on a launch built from the
reference formula, so that the op's registration (schema, fake, stored-gradient rule) is tested whatever the
kernels do.
"""
import pytest
import torch
import torch.nn.functional as F

import fastadvseg as fas
import fastadvseg.nn as fnn
import oracle
from fastadvseg import _dispatch, _ops
from fastadvseg.backends import _launch, reference
from helpers import BACKEND_CASES, assert_close, ids

OP = "pseudo_label_cross_entropy2d"
SHIM = "shim"


def reference_launch(logits, teacher_logits, d_logits, confidence_threshold, d_threshold, ignore_mask, reduction,
                     store_grad, *, size=None, align_corners=False):
    """The launch, as a kernel backend defines it, computed by the reference formula. The gradient of the loss sum
    is written out, ``keep * (softmax - onehot(y))`` at full resolution taken back to the logits' own by the
    adjoint of the upsampling (autograd does not run below the op's Autograd key)."""
    sums, loss_map = reference.pseudo_label_cross_entropy2d(logits, teacher_logits, d_logits, confidence_threshold,
                                                            d_threshold, ignore_mask, size, align_corners)
    grad = None
    if store_grad:
        x = reference.upsample(logits, size, align_corners).float()
        teacher = x if teacher_logits is None else reference.upsample(teacher_logits, size, align_corners)
        d = None if d_logits is None else reference.upsample(d_logits, size, align_corners)
        kept, label = reference.pseudo_labels(teacher, d, confidence_threshold, d_threshold, ignore_mask)
        full = (torch.softmax(x, 1) - F.one_hot(label, x.shape[1]).permute(0, 3, 1, 2)) * kept.unsqueeze(1)
        if tuple(full.shape[-2:]) != tuple(logits.shape[-2:]):
            full = _ops._upsample_adjoint(full, tuple(logits.shape[-2:]), align_corners)
        grad = torch.empty_like(logits).copy_(full)  # the logits' dtype and memory format
    return _launch.LossLaunch(sums.float(), loss_map.float() if reduction == "none" else None, grad,
                              _launch.ones(1, logits.device))


def _kernel_module_on_cpu():
    return next((_dispatch.launcher(b) for b in fas.available_backends("cpu") if b != "reference"), None)


CASES = BACKEND_CASES + ([(SHIM, "cpu")] if _kernel_module_on_cpu() is not None else [])


@pytest.fixture(params=CASES, ids=ids)
def case(request, monkeypatch):
    """(backend name to pass, device); ``shim`` puts the reference launch into a kernel backend on the CPU."""
    backend, device = request.param
    if backend == SHIM:
        module = _kernel_module_on_cpu()
        monkeypatch.setattr(module, OP, reference_launch, raising=False)
        monkeypatch.setattr(_dispatch, "_resolved", {})
        backend = next(b for b in fas.available_backends("cpu") if _dispatch.launcher(b) is module)
    return backend, device


def _logits(shape, gen, device, dtype=torch.float32, scale=2.0):
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    x = x.scatter_add(1, x.argmax(1, keepdim=True), torch.ones_like(x[:, :1]))  # no argmax ties
    return x.to(dtype).to(device)


def _off_boundary(teacher, tau, size=None, align_corners=False):
    """``teacher`` with every pixel whose confidence lies within 1e-4 of tau made surely confident (its top logit
    raised by 3): float32 kernels may decide those pixels either way. Checked where the test reads them (at
    ``size``, after the upsampling) only without upsampling; with it, the test picks tau away from them."""
    conf, label = oracle.teacher_confidence(teacher.cpu() if size is None else F.interpolate(
        teacher.cpu().float(), size, mode="bilinear", align_corners=align_corners))
    near = (conf - tau).abs() < 1e-4
    if size is None and near.any():
        bump = torch.zeros_like(teacher.cpu())
        bump.scatter_(1, label.unsqueeze(1), 3.0 * near.unsqueeze(1).to(bump.dtype))
        teacher = teacher + bump.to(teacher.device)
    return teacher


def _grad(fn, x):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    loss = out[0] if isinstance(out, tuple) else out
    (g,) = torch.autograd.grad(loss.sum() if loss.dim() else loss, x)
    return out, g


# ------------------------------------------------------------------------------------------------- identities

@pytest.mark.parametrize("resize", [None, dict(size=(11, 9), align_corners=False),
                                    dict(size=(11, 9), align_corners=True)])
def test_no_teacher_is_the_detached_student(case, gen, resize):
    backend, device = case
    x = _logits((2, 5, 6, 4), gen, device, scale=1.0)
    x = x if resize else _off_boundary(x, 0.7)
    mask = (torch.rand((2, *(resize or {}).get("size", (6, 4))), generator=gen) < 0.2).to(device)
    kw = dict(confidence_threshold=0.7, ignore_mask=mask, return_ratio=True, backend=backend, **(resize or {}))
    (own, own_ratio), g_own = _grad(lambda v: fas.pseudo_label_cross_entropy2d(v, **kw), x)
    (det, det_ratio), g_det = _grad(lambda v: fas.pseudo_label_cross_entropy2d(v, v.detach(), **kw), x)
    torch.testing.assert_close(own, det, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g_own, g_det, rtol=1e-5, atol=1e-8)
    assert own_ratio.item() == det_ratio.item()
    assert 0 < own_ratio.item() < 1  # the test decides something


@pytest.mark.parametrize("resize", [None, dict(size=(9, 13), align_corners=False)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_d_mask_without_confidence_test_is_semi(case, gen, resize, reduction):
    backend, device = case
    x = _logits((2, 4, 5, 7), gen, device)
    full = (resize or {}).get("size", (5, 7))
    d_hw = (3, 4) if resize else full
    d = (torch.randn((2, 1, *d_hw), generator=gen) * 2).to(device)
    mask = (torch.rand((2, *full), generator=gen) < 0.2).to(device)
    kw = dict(ignore_mask=mask, reduction=reduction, return_ratio=True, backend=backend, **(resize or {}))
    (ours, ratio), g_ours = _grad(lambda v: fas.pseudo_label_cross_entropy2d(
        v, confidence_threshold=None, d_logits=d, d_threshold=0.3, **kw), x)
    (semi, semi_ratio), g_semi = _grad(lambda v: fas.semi_cross_entropy2d(v, d, threshold=0.3, **kw), x)
    torch.testing.assert_close(ours, semi, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_semi, rtol=1e-5, atol=1e-8)
    assert ratio.item() == semi_ratio.item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("resize", [None, dict(size=(7, 10), align_corners=True)])
def test_values_gradient_and_ratio_against_float64(case, gen, dtype, resize):
    """Teacher at a resolution of its own, D at another, both tests on: loss, gradient and kept ratio against the
    float64 oracle, and the ratio exactly the reference backend's."""
    backend, device = case
    x = _logits((2, 3, 4, 5), gen, device, dtype)
    teacher = _logits((2, 3, 5, 6) if resize else (2, 3, 4, 5), gen, device, torch.float32)
    d = (torch.randn((2, 3, 4) if resize else (2, 4, 5), generator=gen) * 2).to(device)
    tau = 0.55
    full = resize["size"] if resize else (4, 5)
    if resize is None:
        teacher = _off_boundary(teacher.to(dtype), tau)
    kw = dict(confidence_threshold=tau, d_logits=d, d_threshold=0.2, return_ratio=True, **(resize or {}))
    (loss, ratio), g = _grad(lambda v: fas.pseudo_label_cross_entropy2d(v, teacher, backend=backend, **kw), x)
    assert loss.dtype == torch.float32 and g.dtype == dtype and g.shape == x.shape

    def up(t):
        t = t.cpu().double()
        if resize is None:
            return t
        exact = F.interpolate(t if t.dim() == 4 else t.unsqueeze(1), full, mode="bilinear", align_corners=True)
        rounded = F.interpolate((t if t.dim() == 4 else t.unsqueeze(1)).float(), full, mode="bilinear",
                                align_corners=True).double()
        out = exact + (rounded - exact).detach()
        return out if t.dim() == 4 else out.squeeze(1)

    x64 = x.detach().cpu().double().requires_grad_()
    conf, _ = oracle.teacher_confidence(up(teacher.to(dtype)))
    assert (conf - tau).abs().min() > 1e-4, "inputs at the confidence boundary: pick another seed"
    want, want_ratio = oracle.pseudo_label(up(x64) if resize else x64, up(teacher.to(dtype)), up(d), tau, 0.2)
    (want_g,) = torch.autograd.grad(want, x64)
    assert_close(loss, want, dtype, "loss")
    assert_close(g, want_g, dtype, "gradient")
    assert ratio.item() == pytest.approx(want_ratio.item(), abs=1e-7)
    _, ref_ratio = fas.pseudo_label_cross_entropy2d(x, teacher, backend="reference", **kw)
    assert ratio.item() == ref_ratio.item()
    assert not ratio.requires_grad and ratio.dim() == 0


def test_teacher_of_another_dtype_is_cast_to_the_logits(case, gen):
    backend, device = case
    x = _logits((1, 4, 3, 5), gen, device, torch.bfloat16)
    teacher = _off_boundary(_logits((1, 4, 3, 5), gen, device, torch.float64).to(torch.bfloat16), 0.7).double()
    a = fas.pseudo_label_cross_entropy2d(x, teacher, confidence_threshold=0.7, backend=backend)
    b = fas.pseudo_label_cross_entropy2d(x, teacher.to(torch.bfloat16), confidence_threshold=0.7, backend=backend)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ where gradients go

def test_gradient_never_reaches_teacher_or_d(case, gen):
    backend, device = case
    x = _logits((2, 3, 4, 5), gen, device).requires_grad_()
    teacher = _logits((2, 3, 4, 5), gen, device).requires_grad_()
    d = (torch.randn((2, 1, 4, 5), generator=gen) * 2).to(device).requires_grad_()
    loss = fas.pseudo_label_cross_entropy2d(x, teacher, confidence_threshold=0.3, d_logits=d, backend=backend)
    gx, gt, gd = torch.autograd.grad(loss, (x, teacher, d), allow_unused=True)
    assert gx is not None and gx.abs().sum() > 0
    assert gt is None and gd is None
    loss = fas.pseudo_label_cross_entropy2d(x, teacher, confidence_threshold=0.3, d_logits=d, backend=backend)
    loss.backward()
    assert teacher.grad is None and d.grad is None


def test_func_grad(case, gen):
    backend, device = case
    x = _logits((2, 3, 4, 5), gen, device)
    teacher = _off_boundary(_logits((2, 3, 4, 5), gen, device), 0.6)

    def f(v, t):
        return fas.pseudo_label_cross_entropy2d(v, t, confidence_threshold=0.6, backend=backend)

    gx, gt = torch.func.grad(f, argnums=(0, 1))(x, teacher)
    _, want = _grad(lambda v: f(v, teacher), x)
    torch.testing.assert_close(gx, want, rtol=1e-5, atol=1e-8)
    assert not gt.any()


@pytest.mark.parametrize("resize", [None, dict(size=(9, 7), align_corners=False)])
def test_compile_fullgraph(case, gen, resize):
    backend, device = case
    x = _logits((2, 3, 4, 5), gen, device)
    teacher = _logits((2, 3, 3, 5) if resize else (2, 3, 4, 5), gen, device)
    d = (torch.randn((2, 4, 5), generator=gen) * 2).to(device)
    if resize is None:
        teacher = _off_boundary(teacher, 0.6)

    def f(v, t, dd):
        return fas.pseudo_label_cross_entropy2d(v, t, confidence_threshold=0.6, d_logits=dd, return_ratio=True,
                                                backend=backend, **(resize or {}))

    torch._dynamo.reset()
    try:
        (loss, ratio), g = _grad(lambda v: torch.compile(f, fullgraph=True)(v, teacher, d), x)
    finally:
        torch._dynamo.reset()
    (want, want_ratio), want_g = _grad(lambda v: f(v, teacher, d), x)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g, want_g, rtol=1e-5, atol=1e-8)
    assert ratio.item() == want_ratio.item()


def test_opcheck(case, gen):
    """Schema, fake tensors, autograd registration and AOT dispatch of the registered op (a stored gradient is
    scaled in place by backward, so AOT dispatch runs on the calls that store none)."""
    backend, device = case
    if backend == "reference":
        pytest.skip("the reference backend is plain PyTorch, not the registered op")
    x = _logits((2, 3, 4, 5), gen, device).requires_grad_()
    xc = _logits((2, 3, 4, 5), gen, device, torch.bfloat16).contiguous(memory_format=torch.channels_last)
    xc.requires_grad_()
    teacher = _logits((2, 3, 4, 5), gen, device)
    low = _logits((2, 3, 3, 2), gen, device).requires_grad_()
    d = (torch.randn((2, 4, 5), generator=gen) * 2).to(device)
    mask = (torch.rand((2, 4, 5), generator=gen) < 0.3).to(device)
    op = _ops.pseudo_label_cross_entropy2d
    samples = [(x, teacher, d, 0.5, 0.2, mask, "mean", True, backend),
               (x, None, None, None, 0.2, None, "none", True, backend),
               (xc, teacher.to(torch.bfloat16), None, 0.9, 0.2, None, "sum", True, backend),
               (low, low.detach() * 2, d[:, :2], 0.5, 0.2, mask, "mean", True, backend, [4, 5], True)]
    for args in samples:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        args = args[:7] + (False,) + args[8:]
        torch.library.opcheck(op, args, test_utils="test_aot_dispatch_dynamic")


# ------------------------------------------------------------------------------------------------- edge cases

def _zero_with_zero_grad(loss, x):
    assert loss.dtype == torch.float32 and loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, x)
    assert g.shape == x.shape and not g.any()


def test_nothing_kept_all_ignored_and_empty_batch(case, gen):
    backend, device = case
    x = _logits((2, 3, 4, 5), gen, device).requires_grad_()
    loss, ratio = fas.pseudo_label_cross_entropy2d(x, confidence_threshold=1.0, return_ratio=True, backend=backend)
    assert ratio.item() == 0.0  # with C > 1 no confidence reaches 1
    _zero_with_zero_grad(loss, x)
    d = torch.full((2, 4, 5), -30.0, device=device)
    _zero_with_zero_grad(fas.pseudo_label_cross_entropy2d(x, d_logits=d, backend=backend), x)
    everything = torch.ones((2, 1, 4, 5), dtype=torch.bool, device=device)
    loss, ratio = fas.pseudo_label_cross_entropy2d(x, ignore_mask=everything, return_ratio=True, backend=backend)
    assert ratio.item() == 0.0
    _zero_with_zero_grad(loss, x)
    empty = torch.zeros((0, 3, 4, 5), device=device, requires_grad=True)
    loss, ratio = fas.pseudo_label_cross_entropy2d(empty, empty.detach() + 1, return_ratio=True, backend=backend)
    assert ratio.item() == 0.0
    _zero_with_zero_grad(loss, empty)
    assert fas.pseudo_label_cross_entropy2d(empty, reduction="none", size=(6, 7), backend=backend).shape == (0, 6, 7)


@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_one_class_and_the_extreme_thresholds(case, gen, tau):
    """C = 1: confidence exactly 1, kept at every tau, loss 0. tau = 0 keeps every pixel: the cross-entropy with the
    teacher's argmax as labels."""
    backend, device = case
    one = _logits((2, 1, 3, 4), gen, device).requires_grad_()
    loss, ratio = fas.pseudo_label_cross_entropy2d(one, confidence_threshold=tau, return_ratio=True, backend=backend)
    assert ratio.item() == 1.0
    _zero_with_zero_grad(loss, one)
    if tau == 0.0:
        x = _logits((2, 5, 3, 4), gen, device)
        teacher = _logits((2, 5, 3, 4), gen, device)
        (loss, ratio), g = _grad(lambda v: fas.pseudo_label_cross_entropy2d(
            v, teacher, confidence_threshold=0.0, return_ratio=True, backend=backend), x)
        _, want_g = _grad(lambda v: F.cross_entropy(v.cpu(), teacher.cpu().argmax(1)), x.double())
        assert ratio.item() == 1.0
        assert_close(loss, F.cross_entropy(x.cpu().double(), teacher.cpu().argmax(1)), torch.float32, "loss")
        assert_close(g, want_g, torch.float32, "gradient")


def test_nan_logits(case, gen):
    """A NaN at a kept pixel makes the loss NaN, as semi_cross_entropy2d; at a dropped pixel it does not. A NaN
    teacher pixel has no confidence: not kept."""
    backend, device = case
    x = _logits((1, 4, 2, 3), gen, device)
    teacher = _logits((1, 4, 2, 3), gen, device)
    keep_all = torch.full((1, 2, 3), 5.0, device=device)
    xn = x.clone()
    xn[0, 1, 0, 0] = float("nan")
    assert torch.isnan(fas.pseudo_label_cross_entropy2d(xn, teacher, confidence_threshold=None, d_logits=keep_all,
                                                        backend=backend))
    semi = fas.semi_cross_entropy2d(xn, keep_all, reduction="none", backend=backend)
    ours = fas.pseudo_label_cross_entropy2d(xn, confidence_threshold=None, d_logits=keep_all, reduction="none",
                                            backend=backend)
    assert torch.equal(torch.isnan(ours), torch.isnan(semi))
    drop = keep_all.clone()
    drop[0, 0, 0] = -5.0
    assert torch.isfinite(fas.pseudo_label_cross_entropy2d(xn, teacher, confidence_threshold=None, d_logits=drop,
                                                           backend=backend))
    tn = teacher.clone()
    tn[0, 2, 1, 2] = float("nan")
    loss, ratio = fas.pseudo_label_cross_entropy2d(x, tn, confidence_threshold=0.0, return_ratio=True,
                                                   backend=backend)
    assert torch.isfinite(loss) and ratio.item() == pytest.approx(5 / 6)
    assert torch.isfinite(fas.pseudo_label_cross_entropy2d(xn, confidence_threshold=0.0, backend=backend))


# --------------------------------------------------------------------------------------------------- nn module

def test_nn_module_is_the_function(gen):
    x = _logits((2, 3, 4, 5), gen, "cpu")
    teacher = _logits((2, 3, 2, 3), gen, "cpu")
    d = torch.randn((2, 1, 2, 2), generator=gen)
    module = fnn.PseudoLabelCrossEntropy2d(confidence_threshold=0.4, d_threshold=0.3, return_ratio=True,
                                           align_corners=True)
    got = module(x, teacher, d, size=(4, 5))
    want = fas.pseudo_label_cross_entropy2d(x, teacher, confidence_threshold=0.4, d_logits=d, d_threshold=0.3,
                                            return_ratio=True, size=(4, 5), align_corners=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)

