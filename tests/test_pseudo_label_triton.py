"""The triton backend's pseudo_label_cross_entropy2d launch against the float64 reference.

The launch (``fastadvseg.backends.triton.pseudo_label_cross_entropy2d``) is called directly and compared with
``reference.pseudo_label_cross_entropy2d`` evaluated in float64 on the inputs upsampled as the kernels read them
(``F.interpolate(x.float(), ...)``: float32 interpolation, then float64): sums (counts exactly), (N, H, W) loss maps,
and the low-resolution gradient against autograd of the reference's loss sum, through the float64 adjoint of the
interpolation. Student, teacher and D each at its own resolution or at the full one, no size; the student as its
own teacher; with and without D, tau and the mask; C = 1, 3, 21; float32 / float16 / bfloat16; contiguous,
channels_last and sliced inputs; both align_corners; every reduction; NaN and inf logits; empty batches; errors.
Confidence thresholds are drawn away from every pixel's float64 confidence (a pixel within rounding of tau may
legitimately be decided either way), D thresholds away from every upsampled z.

Runs on CUDA, or on CPU under TRITON_INTERPRET=1 (set below if unset, before triton is imported): tiny shapes.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("the triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from fastadvseg.backends import reference as R  # noqa: E402
from fastadvseg.backends import triton as B  # noqa: E402
from test_upsample_triton import DEVICE, adjoint, close, dmap, logits, mask, threshold_away_from, up32  # noqa: E402

# the gradient is stored in the logits' dtype (bfloat16 casts truncate under the interpreter); losses and sums are
# float32 computations on the same float32 values as the oracle's
RTOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
LOSS_RTOL = 2e-5


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(2718)


def oracle(x, teacher, d, tau, d_threshold, ignore, size, align):
    """(sums [loss, kept, considered], loss map, gradient of the loss sum w.r.t. the low-resolution x), float64."""
    full = tuple(size) if size is not None else tuple(x.shape[-2:])
    xu = up32(x, full, align).requires_grad_(True)
    tu = None if teacher is None else up32(teacher, full, align)
    du = None if d is None else up32(d, full, align)
    sums, loss_map = R.pseudo_label_cross_entropy2d(xu, tu, du, tau, d_threshold, ignore)
    (g_full,) = torch.autograd.grad(sums[0], xu)
    return sums.detach(), loss_map.detach(), adjoint(x, full, align, g_full)


def tau_away_from(teacher_full, kept_somewhere=True):
    """A confidence threshold at least 1e-4 from every pixel's float64 confidence, keeping some pixels and not
    others where the teacher has more than one class."""
    conf, _ = R.teacher_confidence(teacher_full)
    conf = conf[torch.isfinite(conf)]
    for tau in (0.6, 0.5, 0.7, 0.45, 0.8, 0.55, 0.65, 0.4, 0.9):
        if conf.numel() and (conf - tau).abs().min().item() <= 1e-4:
            continue
        if kept_somewhere and teacher_full.shape[1] > 1 and not bool(((conf >= tau).any() & (conf < tau).any())):
            continue
        return tau
    raise AssertionError("no confidence threshold away from the teacher's confidences")


def check(out, x, teacher, d, tau, d_threshold, ignore, size, align, dtype, what):
    sums, ref_map, ref_grad = oracle(x, teacher, d, tau, d_threshold, ignore, size, align)
    full = tuple(size) if size is not None else tuple(x.shape[-2:])
    assert out.sums.dtype == torch.float32 and out.sums.shape == (3,) and out.sums.device == x.device
    close(out.sums[0], sums[0], LOSS_RTOL, what + ": loss sum", scale=ref_map.abs().sum().item())
    for i in (1, 2):
        assert out.sums[i].item() == sums[i].item(), f"{what}: count {i}: {out.sums[i].item()} != {sums[i].item()}"
    assert out.loss_map.shape == (x.shape[0], *full) and out.loss_map.dtype == torch.float32
    close(out.loss_map, ref_map, LOSS_RTOL, what + ": loss map")
    assert out.grad.shape == x.shape and out.grad.dtype == dtype and out.grad.device == x.device
    close(out.grad, ref_grad, RTOL[dtype], what + ": gradient")
    assert out.scales.tolist() == [1.0] and out.bad is None
    return sums


# name: C, student (h, w), teacher (ht, wt) or None (the student is its own teacher), D (hd, wd) or None,
# with tau, with a mask, size or None, align_corners, dtype, layout
CASES = {
    "teacher-d-tau-mask": (3, (5, 7), (5, 7), (5, 7), True, True, None, False, torch.float32, "contiguous"),
    "self-tau": (3, (5, 7), None, None, True, False, None, False, torch.float16, "channels_last"),
    "self-mask-only": (21, (5, 7), None, None, False, True, None, False, torch.bfloat16, "sliced"),
    "one-class-teacher-d": (1, (5, 7), (5, 7), (5, 7), False, False, None, False, torch.float32, "sliced"),
    "one-class-tau": (1, (1, 1), (1, 1), None, True, True, (4, 3), True, torch.float32, "contiguous"),
    "up-each-own": (3, (5, 7), (4, 6), (2, 3), True, True, (13, 17), False, torch.float32, "contiguous"),
    "up-each-own-ac": (21, (5, 7), (3, 3), (2, 3), True, True, (13, 17), True, torch.bfloat16, "channels_last"),
    "up-from-1x1": (3, (1, 1), (1, 1), (1, 1), True, False, (4, 3), False, torch.float16, "sliced"),
    "up-student-full-teacher-d": (3, (3, 4), (7, 9), (7, 9), True, True, (7, 9), True, torch.float32,
                                  "channels_last"),
    "up-teacher-only": (3, (7, 9), (3, 4), (2, 3), True, True, (7, 9), False, torch.float16, "contiguous"),
    "up-self-tau-w-first": (3, (4, 3), None, None, True, True, (9, 7), True, torch.float32, "sliced"),
    "up-one-axis": (3, (7, 4), (3, 9), None, False, True, (7, 9), False, torch.bfloat16, "contiguous"),
    "up-self-d": (3, (5, 2), None, (3, 2), False, False, (17, 5), True, torch.float32, "contiguous"),
}


def make_case(name, gen):
    c, x_hw, t_hw, d_hw, with_tau, masked, size, align, dtype, layout = CASES[name]
    n = 2
    full = size if size is not None else x_hw
    x = logits((n, c, *x_hw), dtype, layout, gen)
    teacher = None if t_hw is None else logits((n, c, *t_hw), dtype, layout, gen)
    d = None if d_hw is None else dmap((n, *d_hw), dtype, gen, layout=layout)
    ignore = mask(n, full, gen) if masked else None
    teacher_full = up32(x if teacher is None else teacher, full, align)
    tau = tau_away_from(teacher_full) if with_tau else None
    d_threshold = threshold_away_from(up32(d, full, align)) if d is not None else 0.2
    return x, teacher, d, tau, d_threshold, ignore, size, align, dtype


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name, gen):
    x, teacher, d, tau, d_threshold, ignore, size, align, dtype = make_case(name, gen)
    out = B.pseudo_label_cross_entropy2d(x, teacher, d, tau, d_threshold, ignore, "none", True, size=size,
                                         align_corners=align)
    sums = check(out, x, teacher, d, tau, d_threshold, ignore, size, align, dtype, name)
    if x.shape[1] > 1 and (tau is not None or d is not None):  # the tests decide something
        assert 0 < sums[1] < sums[2], (name, sums.tolist())
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert out.grad.stride() == x.stride()  # a dense input's layout is kept


@pytest.mark.parametrize("name", ["teacher-d-tau-mask", "up-each-own"])
def test_reductions_and_stored_gradient_change_only_what_is_returned(name, gen):
    """"sum" and "mean" return no map, store_grad off no gradient; the sums and gradient stay bit-identical."""
    x, teacher, d, tau, d_threshold, ignore, size, align, dtype = make_case(name, gen)
    kw = dict(size=size, align_corners=align)
    none = B.pseudo_label_cross_entropy2d(x, teacher, d, tau, d_threshold, ignore, "none", True, **kw)
    for reduction in ("sum", "mean"):
        out = B.pseudo_label_cross_entropy2d(x, teacher, d, tau, d_threshold, ignore, reduction, True, **kw)
        assert out.loss_map is None and torch.equal(out.sums, none.sums) and torch.equal(out.grad, none.grad)
    out = B.pseudo_label_cross_entropy2d(x, teacher, d, tau, d_threshold, ignore, "mean", False, **kw)
    assert out.grad is None and out.loss_map is None and torch.equal(out.sums, none.sums)
    again = B.pseudo_label_cross_entropy2d(x, teacher, d, tau, d_threshold, ignore, "none", True, **kw)
    for a, b in zip(none[:3], again[:3]):  # deterministic: no atomics, a fixed order
        assert torch.equal(a, b)


@pytest.mark.parametrize("size", [None, (9, 7)], ids=["no-size", "upsampled"])
def test_the_student_as_teacher_without_tau_is_semi_cross_entropy_to_the_bit(size, gen):
    """Self-training with D only is L_semi: the same sums, loss map and gradient bit for bit, with NaN and inf
    logits (the NaN channel is the label and its pixel's loss NaN; +inf gives NaN; -inf is never the label)."""
    x = logits((2, 3, 4, 3), torch.float32, "sliced", gen)
    x[0, 1, 0, 0], x[1, 2, 1, 1], x[0, 0, 2, 2] = float("nan"), float("inf"), float("-inf")
    d = dmap((2, 2, 3) if size else (2, 4, 3), torch.float32, gen)
    d[1, 0, 2] = float("-inf")  # never kept, even at T = 0
    ignore = mask(2, size or (4, 3), gen)
    for threshold in (0.2, 0.0):
        kw = dict(size=size, align_corners=True)
        semi = B.semi_cross_entropy2d(x, d, threshold, ignore, "none", True, **kw)
        pseudo = B.pseudo_label_cross_entropy2d(x, None, d, None, threshold, ignore, "none", True, **kw)
        for a, b in zip(semi[:3], pseudo[:3]):
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        assert pseudo.sums[0].isnan()


def test_a_teacher_equal_to_the_student_is_the_student_as_teacher(gen):
    """The two code paths (a teacher read as a second tensor, the student's own tile) give the same bits."""
    x = logits((2, 5, 3, 4), torch.float16, "channels_last", gen)
    d = dmap((2, 2, 2), torch.float16, gen)
    ignore = mask(2, (7, 9), gen)
    tau = tau_away_from(up32(x, (7, 9), True))
    kw = dict(size=(7, 9), align_corners=True)
    own = B.pseudo_label_cross_entropy2d(x, None, d, tau, 0.3, ignore, "none", True, **kw)
    copy = B.pseudo_label_cross_entropy2d(x, x.detach().clone(), d, tau, 0.3, ignore, "none", True, **kw)
    for a, b in zip(own[:3], copy[:3]):
        assert torch.equal(a, b)


def test_nan_and_inf_teacher_logits_are_never_confident(gen):
    """A NaN or +inf teacher logit gives a NaN confidence: the pixel fails every tau (also tau = 0) and is kept
    without one (the NaN channel is then the label); a -inf logit is an ordinary zero-probability class."""
    x = logits((1, 3, 3, 4), torch.float32, "contiguous", gen)
    teacher = logits((1, 3, 3, 4), torch.float32, "contiguous", gen)
    teacher[0, 1, 0, 0], teacher[0, 2, 1, 1], teacher[0, 0, 2, 3] = float("nan"), float("inf"), float("-inf")
    for tau in (None, 0.0, tau_away_from(teacher.double())):
        out = B.pseudo_label_cross_entropy2d(x, teacher, None, tau, 0.2, None, "none", True)
        check(out, x, teacher, None, tau, 0.2, None, None, False, torch.float32, f"tau={tau}")
        kept_map = out.loss_map != 0
        assert kept_map[0, 0, 0].item() == (tau is None) and kept_map[0, 1, 1].item() == (tau is None)
        if tau is None or tau == 0.0:
            assert kept_map[0, 2, 3].item()


def test_d_of_another_dtype_and_empty_batches(gen):
    """D maps of any float dtype (float64 here, with float32 logits and bfloat16 logits); empty batches give zero
    sums and empty buffers, with and without a size."""
    x = logits((2, 3, 5, 7), torch.bfloat16, "contiguous", gen)
    teacher = logits((2, 3, 5, 7), torch.bfloat16, "contiguous", gen)
    d = dmap((2, 5, 7), torch.float64, gen)
    threshold = threshold_away_from(d)
    out = B.pseudo_label_cross_entropy2d(x, teacher, d, None, threshold, None, "none", True)
    check(out, x, teacher, d, None, threshold, None, None, False, torch.bfloat16, "float64 D")
    for size, d_hw in ((None, (5, 7)), ((7, 9), (2, 3))):
        x0 = logits((0, 3, 5, 7), torch.float32, "contiguous", gen)
        ignore = torch.zeros((0, *(size or (5, 7))), dtype=torch.bool, device=DEVICE)
        out = B.pseudo_label_cross_entropy2d(x0, x0.clone(), torch.zeros((0, *d_hw), device=DEVICE), 0.5, 0.2,
                                             ignore, "none", True, size=size)
        assert out.sums.tolist() == [0.0, 0.0, 0.0]
        assert out.grad.shape == x0.shape and out.loss_map.shape == (0, *(size or (5, 7)))


def test_bad_shapes_raise_one_line_errors(gen):
    x = logits((2, 3, 5, 7), torch.float32, "contiguous", gen)
    cases = [
        (dict(teacher=logits((2, 4, 5, 7), torch.float32, "contiguous", gen)), "teacher_logits of shape"),
        (dict(teacher=logits((1, 3, 5, 7), torch.float32, "contiguous", gen)), "teacher_logits of shape"),
        (dict(teacher=logits((2, 3, 4, 7), torch.float32, "contiguous", gen)), "pass size="),
        (dict(d=dmap((2, 5, 6), torch.float32, gen)), "d_logits of shape"),
        (dict(d=dmap((2, 2, 3), torch.float32, gen), size=(7, 9), ignore=mask(2, (7, 8), gen)), "ignore_mask"),
        (dict(teacher=logits((1, 3, 4, 7), torch.float32, "contiguous", gen), size=(7, 9)), "batch size"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            B.pseudo_label_cross_entropy2d(x, kw.get("teacher"), kw.get("d"), 0.5, 0.2, kw.get("ignore"), "mean",
                                           True, size=kw.get("size"))
        assert "\n" not in str(info.value)


def test_confidence_is_compared_with_tau_as_the_reference_does(gen):
    """tau = 1 keeps exactly the pixels whose confidence is 1 (a teacher sure of one class by exp(-200), 1 in
    float64 too), tau = 0 every pixel with a finite confidence: the comparison is >=, not >."""
    x = logits((1, 3, 2, 5), torch.float32, "contiguous", gen)
    teacher = torch.zeros((1, 3, 2, 5), device=DEVICE)
    teacher[0, 0, 0] = 200.0  # confidence 1.0 on the first row
    for tau in (1.0, 0.0):
        out = B.pseudo_label_cross_entropy2d(x, teacher, None, tau, 0.2, None, "none", True)
        check(out, x, teacher, None, tau, 0.2, None, None, False, torch.float32, f"tau={tau}")
        assert out.sums[1].item() == (5 if tau == 1.0 else 10)
    assert math.isfinite(out.sums[0].item())
