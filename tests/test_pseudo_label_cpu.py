"""The ``cpu`` backend's ``pseudo_label_cross_entropy2d`` launch, called directly.

The student's cross-entropy against the argmax of a teacher's logits (its own when the teacher is None), kept where
the teacher's max softmax >= tau and / or sigmoid(D) > T, with the logits, the teacher and D each bilinearly
upsampled to ``size`` from its own resolution inside the one kernel pass. Every result is compared with
``reference.pseudo_label_cross_entropy2d`` on float64 logits (sums, loss map) and with autograd of its loss sum
(the gradient), on fresh random inputs: odd shapes and factors, C = 1, 3, 21, with and without teacher, D, tau and
mask, both align_corners, every reduction, half dtypes, channels_last and sliced views. Tau is drawn between the
pixels' float64 confidences (never within 1e-4 of one), so that no pixel sits on the boundary where float32
rounding may legitimately decide either way. Also: a teacher equal to the logits gives bit for bit the
self-training result, results do not depend on the thread count, NaN stays where the semi kernel keeps it, and the
native boundary checks the new arguments.
"""
import pytest
import torch

import fastadvseg as fas
from fastadvseg.backends import reference
from helpers import RTOL, layout_4d

pytestmark = pytest.mark.skipif("cpu" not in fas.available_backends("cpu"),
                                reason=f"cpu backend not built: {fas.unavailable_reason('cpu')}")

if "cpu" in fas.available_backends("cpu"):
    from fastadvseg.backends import cpu
    from fastadvseg import _C_cpu as ext

D_THRESHOLD = 0.3
# (student (h, w), teacher (h, w), D (h, w), size): all at one size (size None), each at its own low resolution,
# a single low pixel, the student at full size with a low-resolution teacher, downsampling
GEOMETRIES = [((5, 7), (5, 7), (5, 7), None), ((5, 7), (4, 6), (3, 3), (13, 17)), ((1, 1), (1, 1), (2, 1), (4, 3)),
              ((13, 17), (5, 7), (13, 17), (13, 17)), ((9, 8), (11, 13), (4, 5), (6, 7))]


def randn(shape, gen, scale=3.0):
    return torch.randn(shape, generator=gen, dtype=torch.float64) * scale


def d_map(n, hw, gen):
    """D's logits (float32), with a confident and an unconfident pixel in each map."""
    z = randn((n,) + tuple(hw), gen, 2.0).float()
    z[:, 0, 0] = -3.0
    z[:, -1, -1] = 3.0
    return z


def pick_tau(x64, t64, size, align_corners):
    """A threshold between the pixels' float64 teacher confidences, 1e-4 or more from each, near their median."""
    teacher = x64 if t64 is None else t64
    conf, _ = reference.teacher_confidence(reference.upsample(teacher, size, align_corners))
    values = torch.unique(conf.flatten())  # sorted
    if values.numel() == 1:
        return float(values[0]) / 2  # (C = 1: every confidence is 1)
    gaps = values[1:] - values[:-1]
    mids = (values[1:] + values[:-1]) / 2
    ok = torch.nonzero(gaps > 2e-4).flatten()
    assert ok.numel(), "no gap between the confidences to put tau in"
    best = ok[(mids[ok] - values.median()).abs().argmin()]
    return float(mids[best])


def expected(x, teacher, z, tau, mask, size, align_corners):
    """(sums, loss map, gradient of the loss sum w.r.t. the logits): the reference on float64 logits (D stays
    float32: the keep rule decides on its float32 interpolation, as the kernel's does)."""
    leaf = x.detach().double().requires_grad_()
    t64 = None if teacher is None else teacher.detach().double()
    sums, loss_map = reference.pseudo_label_cross_entropy2d(leaf, t64, z, tau, D_THRESHOLD, mask, size,
                                                            align_corners)
    grad, = torch.autograd.grad(sums[0], leaf)
    return sums.detach(), loss_map.detach(), grad


def close(actual, want, dtype=torch.float32, what=""):
    """Float32: 1e-5 relative, and 1e-6 absolute per unit of the largest expected value; half dtypes: their
    rounding (helpers.RTOL)."""
    actual, want = actual.detach().double(), want.detach().double()
    assert actual.shape == want.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(want.shape)}"
    rtol = 1e-5 if dtype == torch.float32 else RTOL[dtype]
    scale = max(want.abs().max().item() if want.numel() else 0.0, 1.0)
    atol = (1e-6 if dtype == torch.float32 else RTOL[dtype]) * scale
    torch.testing.assert_close(actual, want, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def check(out, want, reduction, dtype=torch.float32):
    sums, loss_map, grad = want
    assert out.sums.dtype == torch.float32 and out.sums.shape == (3,)
    assert (out.sums[1].item(), out.sums[2].item()) == (sums[1].item(), sums[2].item()), "kept / considered"
    close(out.sums[0], sums[0], dtype, "loss sum")
    if reduction == "none":
        close(out.loss_map, loss_map, dtype, "loss map")
    else:
        assert out.loss_map is None
    assert out.grad.dtype == dtype and out.grad.shape == grad.shape
    close(out.grad.double() / out.scales.item(), grad, dtype, "gradient of the loss sum")


def case_inputs(geometry, c, with_teacher, with_d, with_tau, with_mask, align_corners, gen, n=2):
    x_hw, t_hw, z_hw, size = geometry
    full = size or x_hw
    x = randn((n, c) + x_hw, gen).float()
    teacher = randn((n, c) + (t_hw if size else x_hw), gen).float() if with_teacher else None
    z = d_map(n, z_hw if size else x_hw, gen) if with_d else None
    mask = torch.rand((n,) + full, generator=gen) < 0.25 if with_mask else None
    tau = pick_tau(x.double(), None if teacher is None else teacher.double(), size, align_corners) \
        if with_tau else None
    return x, teacher, z, tau, mask, size


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}-{g[1]}-{g[2]}->{g[3]}")
@pytest.mark.parametrize("c", [1, 3, 21])
@pytest.mark.parametrize("with_teacher", [False, True], ids=["self", "teacher"])
@pytest.mark.parametrize("with_d,with_tau", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["no-test", "d", "tau", "d+tau"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_matches_the_reference(geometry, c, with_teacher, with_d, with_tau, align_corners, gen):
    x, teacher, z, tau, mask, size = case_inputs(geometry, c, with_teacher, with_d, with_tau, True, align_corners,
                                                 gen)
    want = expected(x, teacher, z, tau, mask, size, align_corners)
    if with_tau and c > 1:
        assert 0 < want[0][1] < want[0][2], "tau keeps some pixels and drops others"
    for reduction in ("none", "sum", "mean"):
        out = cpu.pseudo_label_cross_entropy2d(x, teacher, z, tau, D_THRESHOLD, mask, reduction, True, size=size,
                                               align_corners=align_corners)
        check(out, want, reduction)
        if reduction == "mean":
            kept = want[0][1].item()
            # without tau the maps give the count before the pass: the gradient comes pre-scaled by 1 / kept
            prescale = 1.0 / kept if tau is None and kept else 1.0
            assert out.scales.tolist() == pytest.approx([prescale], rel=1e-6)
    no_grad = cpu.pseudo_label_cross_entropy2d(x, teacher, z, tau, D_THRESHOLD, mask, "sum", False, size=size,
                                               align_corners=align_corners)
    assert no_grad.grad is None and torch.equal(no_grad.sums, out.sums)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("x_layout,t_layout", [("channels_last", "sliced"), ("sliced", "contiguous"),
                                               ("contiguous", "channels_last"), ("contiguous", "contiguous")])
# (rows of 16 pixels: the kernels read and write whole pixel vectors in place, in the tensors' own dtype)
@pytest.mark.parametrize("geometry", [((7, 9), (7, 9), (7, 9), None), ((8, 16), (8, 16), (8, 16), None),
                                      ((5, 6), (6, 4), (3, 5), (11, 13)), ((5, 6), (11, 16), (3, 5), (11, 16))],
                         ids=["plain", "plain-rows-of-16", "upsampled", "teacher-at-full-size"])
def test_dtypes_and_layouts(dtype, x_layout, t_layout, geometry, gen):
    x_hw, t_hw, z_hw, size = geometry
    n, c = 2, 19
    x = layout_4d(randn((n, c) + x_hw, gen).to(dtype), x_layout)
    teacher = layout_4d(randn((n, c) + t_hw, gen).to(dtype), t_layout)
    z = d_map(n, z_hw, gen)
    mask = torch.rand((n,) + (size or x_hw), generator=gen) < 0.2
    tau = pick_tau(x.double(), teacher.double(), size, False)
    want = expected(x, teacher, z, tau, mask, size, False)
    for reduction in ("none", "mean"):
        out = cpu.pseudo_label_cross_entropy2d(x, teacher, z, tau, D_THRESHOLD, mask, reduction, True, size=size)
        check(out, want, reduction, dtype)
        # the gradient comes in the logits' memory format where it is a dense one
        if x_layout == "channels_last":
            assert out.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("geometry", GEOMETRIES[:2] + GEOMETRIES[3:4], ids=["plain", "upsampled", "full-student"])
@pytest.mark.parametrize("with_tau", [False, True])
def test_a_teacher_equal_to_the_logits_gives_the_self_training_result(geometry, with_tau, gen):
    """The separate teacher path (its own reads, its own resize) and the logits' own pseudo-labels agree bit for
    bit, whether the teacher is a copy in another layout or the logits' own view."""
    x_hw, _, z_hw, size = geometry
    x = randn((2, 5) + x_hw, gen).float()
    z = d_map(2, z_hw if size else x_hw, gen)
    tau = 0.55 if with_tau else None
    runs = [cpu.pseudo_label_cross_entropy2d(x, t, z, tau, D_THRESHOLD, None, "none", True, size=size)
            for t in (None, x.detach(), x.clone(), x.clone().to(memory_format=torch.channels_last),
                      layout_4d(x, "sliced"))]
    for other in runs[1:]:
        assert torch.equal(other.sums, runs[0].sums)
        assert torch.equal(other.loss_map, runs[0].loss_map)
        assert torch.equal(other.grad, runs[0].grad)


def test_semi_cross_entropy2d_is_the_pseudo_label_loss_of_the_logits_own_labels(gen):
    x = randn((2, 4, 5, 6), gen).float()
    z = d_map(2, (3, 3), gen)
    mask = torch.rand((2, 9, 11), generator=gen) < 0.2
    semi = cpu.semi_cross_entropy2d(x, z, D_THRESHOLD, mask, "mean", True, size=(9, 11), align_corners=True)
    want = expected(x, None, z, None, mask, (9, 11), True)
    check(semi, want, "mean")


def test_results_do_not_depend_on_the_thread_count(gen):
    n, c, full = 2, 5, (61, 67)  # (enough logits for the kernels to use threads)
    mask = torch.rand((n,) + full, generator=gen) < 0.2
    cases = [  # (logits, teacher, D, size): all upsampled, the logits' own labels, all at full size
        (randn((n, c, 9, 11), gen).float(), randn((n, c, 13, 8), gen).float(), d_map(n, (5, 7), gen), full),
        (randn((n, c, 9, 11), gen).float(), None, d_map(n, (5, 7), gen), full),
        (randn((n, c) + full, gen).float(), randn((n, c) + full, gen).float(), d_map(n, full, gen), None)]
    previous = torch.get_num_threads()
    try:
        runs = []
        for threads in (2, 1, 2):
            torch.set_num_threads(threads)
            runs.append([cpu.pseudo_label_cross_entropy2d(x, t, z, 0.5, D_THRESHOLD, mask, "none", True, size=size)
                         for x, t, z, size in cases])
    finally:
        torch.set_num_threads(previous)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a.sums, b.sums) and torch.equal(a.loss_map, b.loss_map)
            assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("size", [None, (9, 10)])
def test_nan_logits(size, gen):
    """A NaN in the teacher makes its confidence NaN: never kept (as in the reference). A NaN student logit at an
    ignored pixel stays out of the loss and the gradient; at a kept pixel the loss is NaN (the semi kernel's rule)."""
    n, c = 1, 4
    x = randn((n, c, 5, 6), gen).float()
    teacher = randn((n, c, 4, 5) if size else (n, c, 5, 6), gen).float()
    full = size or (5, 6)
    teacher[0, 2, 1, 1] = float("nan")
    mask = torch.zeros((n,) + full, dtype=torch.bool)
    x_nan = x.clone()
    x_nan[0, 1, 3, 4] = float("nan")
    # the NaN reaches the full-resolution pixels its low pixel is read by: ignore all of them
    reach = reference.upsample(x_nan.double(), size, False).isnan().any(1)
    mask |= reach
    out = cpu.pseudo_label_cross_entropy2d(x_nan, teacher, None, 0.0, D_THRESHOLD, mask, "none", True, size=size)
    # (the oracle on the logits without their NaN, which only ignored pixels read: autograd would carry a NaN
    # through log_softmax's backward even where the loss is 0)
    want = expected(x, teacher, None, 0.0, mask, size, False)
    teacher_nan = reference.upsample(teacher.double(), size, False).isnan().any(1)
    assert (teacher_nan & ~mask).any(), "the confidence test, not the mask, drops a NaN teacher pixel"
    check(out, want, "none")
    assert torch.isfinite(out.grad).all() and torch.isfinite(out.loss_map).all()
    assert (out.loss_map[teacher_nan] == 0).all()
    # a NaN student logit at a kept pixel: the loss is NaN there, as the reference's
    kept = cpu.pseudo_label_cross_entropy2d(x_nan, None, None, None, D_THRESHOLD, None, "none", False, size=size)
    assert kept.loss_map[reach].isnan().all() and kept.sums[0].isnan()


def test_empty_batch():
    x = torch.zeros((0, 3, 4, 5))
    out = cpu.pseudo_label_cross_entropy2d(x, torch.zeros((0, 3, 2, 2)), None, 0.5, D_THRESHOLD, None, "mean", True,
                                           size=(7, 8))
    assert out.sums.tolist() == [0.0, 0.0, 0.0] and out.grad.shape == x.shape


def test_native_boundary_checks_the_teacher_and_the_confidence(gen):
    x = randn((2, 3, 4, 5), gen).float()
    common = dict(sizes=x.shape, keep=True)
    with pytest.raises(ValueError, match=r"teacher_logits \(2, 4, 4, 5\) does not match the logits' \(N, C\)"):
        cpu._fused(x, teacher=randn((2, 4, 4, 5), gen).float(), **common)
    with pytest.raises(ValueError, match=r"teacher_logits \(2, 3, 3, 5\) does not match the logits"):
        cpu._fused(x, teacher=randn((2, 3, 3, 5), gen).float(), **common)
    with pytest.raises(TypeError, match=r"teacher_logits must have the dtype of logits"):
        cpu._fused(x, teacher=x.half(), **common)
    with pytest.raises(ValueError, match=r"teacher_logits .* has no pixel to resize"):
        cpu._fused(x, teacher=torch.zeros((2, 3, 0, 5)), size=(9, 11), **common)
    with pytest.raises(ValueError, match=r"confidence_threshold must be in \[0, 1\]"):
        cpu._fused(x, confidence=1.5, **common)
    with pytest.raises(ValueError, match=r"teacher_logits replace the target"):
        cpu._fused(x, labels=torch.zeros((2, 4, 5), dtype=torch.int64), teacher=x.clone(), sizes=x.shape)
    with pytest.raises(ValueError, match=r"confidence_threshold needs pseudo-labels"):
        cpu._fused(x, labels=torch.zeros((2, 4, 5), dtype=torch.int64), confidence=0.5, sizes=x.shape)
    with pytest.raises(ValueError, match=r"maps_only cannot test the teacher's confidence"):
        cpu._fused(None, maps_only=True, confidence=0.5, **common)
    with pytest.raises(ValueError, match=r"maps_only reads no teacher_logits"):
        cpu._fused(None, maps_only=True, teacher=x, **common)
    with pytest.raises(TypeError, match=r"confidence_threshold must be None or a float"):
        ext.fused_loss(tuple(x.shape), x, None, 1.0, None, 255, None, None, None, 1, 0.0, 0, None, None, 1.0, False,
                       1, confidence_threshold="high")
