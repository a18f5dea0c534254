"""Label smoothing in the fused cpu kernel (``fastadvseg._C_cpu.fused_loss(..., label_smoothing=eps)``).

The kernel is called directly, with the argument packing of ``fastadvseg/backends/cpu.py`` (copied below, so that
these tests do not depend on that module), and compared with a float64 oracle: ``F.cross_entropy(x.double(), y,
weight, ignore_index, label_smoothing=eps)`` and its autograd gradient. Covered: eps 0 / 0.1 / 0.37 / 1, with and
without class weights (negative ones included), float32 / float16 / bfloat16 logits, contiguous / channels_last /
sliced layouts (gradient written through a strided view, nothing outside it touched), odd shapes (tails through the
scratch, C = 150), ignore pixels, the loss map, grad_scale != 1, NaN / Inf logits at ignored pixels, threads and
streamed gradients, the adversarial terms next to it, every kernel build the CPU runs (FASTADVSEG_CPU_ISA), and
eps = 0 being bit-identical to a call without the argument.
"""
import json
import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch
import torch.nn.functional as F

_C_cpu = pytest.importorskip("fastadvseg._C_cpu")

# ---- the arguments of fastadvseg/backends/cpu.py (csrc/cpu/bindings.cpp takes the tensors themselves) -----------
LOSS, WSUM, ADV, ADV_COUNT, KEPT, CONSIDERED, BAD, FIRST_BAD = range(8)  # csrc/cpu/kernels.h, FusedSum


def fused(x, y, *, weight=None, ignore_index=255, grad=None, grad_scale=1.0, loss_map=None, eps=None,
          num_threads=None, z=None, adv_mode=0, grad_z=None, maps_only=False, positional=False):
    """One fused_loss call; y None: pseudo-labels; eps None: the call without the label_smoothing argument."""
    n, c, h, w = x.shape
    args = ((n, c, h, w), None if maps_only else x, grad, float(grad_scale), y, int(ignore_index), weight, z, None,
            0, 0.0, adv_mode, loss_map, grad_z, 1.0, maps_only,
            torch.get_num_threads() if num_threads is None else num_threads)
    if eps is None:
        return _C_cpu.fused_loss(*args)
    if positional:
        return _C_cpu.fused_loss(*args, float(eps))
    return _C_cpu.fused_loss(*args, label_smoothing=float(eps))


# ---- inputs ----------------------------------------------------------------------------------------------------
def make_logits(shape, dtype, layout, gen, scale=3.0):
    n, c, h, w = shape
    if layout == "sliced":  # a view with a storage offset, padded channel / row / pixel strides
        big = torch.randn((n, c + 3, h + 2, w + 5), generator=gen) * scale
        return big.to(dtype)[:, 2:2 + c, 1:1 + h, 3:3 + w]
    x = (torch.randn(shape, generator=gen) * scale).to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def make_grad(x, layout):
    """The gradient buffer in the logits' layout; sliced: a view into a NaN-filled buffer (nothing else written)."""
    if layout == "sliced":
        n, c, h, w = x.shape
        big = torch.full((n, c + 2, h + 3, w + 4), float("nan"), dtype=x.dtype)
        return big[:, 1:1 + c, 2:2 + h, 1:1 + w], big
    g = torch.full_like(x, float("nan"))  # (empty_like keeps channels_last)
    return g, g


def make_labels(shape, gen, ignore_index=255, ignore_frac=0.2, sliced=False):
    n, c, h, w = shape
    y = torch.randint(0, c, (n, h, w + 2 if sliced else w), generator=gen)
    y[torch.rand(y.shape, generator=gen) < ignore_frac] = ignore_index
    return y[..., 1:1 + w] if sliced else y


def make_weight(c, kind, gen):
    if kind is None:
        return None
    w = torch.rand(c, generator=gen) * 2 + 0.1
    if kind == "signed":
        w[::3] = -w[::3]  # negative class weights (allowed by PyTorch, summed as they are)
    return w.float().contiguous()


# ---- the float64 oracle ------------------------------------------------------------------------------------------
def oracle(x, y, weight, ignore_index, eps, grad_scale):
    """(loss sum, weight sum, per-pixel loss map, gradient) in float64."""
    x64 = x.detach().double().requires_grad_()
    w64 = None if weight is None else weight.double()
    loss_map = F.cross_entropy(x64, y, weight=w64, ignore_index=ignore_index, label_smoothing=eps,
                               reduction="none")
    loss_map.sum().backward()
    valid = y != ignore_index
    wy = torch.ones_like(y, dtype=torch.float64) if w64 is None else w64[y.clamp(0, x.shape[1] - 1)]
    wsum = float((wy * valid).sum())
    return float(loss_map.detach().sum()), wsum, loss_map.detach(), x64.grad * grad_scale


TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def scales(x, y, weight, ignore_index, eps, grad_scale):
    """The magnitude each result is computed at (for atol): per-pixel sum_c |terms| of the loss and gradient."""
    c = x.shape[1]
    valid = (y != ignore_index).double()
    w = torch.ones(c, dtype=torch.float64) if weight is None else weight.double()
    wy = w.abs()[y.clamp(0, c - 1)] * valid
    lsm = torch.log_softmax(x.detach().double(), 1).abs()
    pix = (1 - eps) * wy * lsm.gather(1, y.clamp(0, c - 1).unsqueeze(1)).squeeze(1) \
        + (eps / c) * valid * (lsm * w.abs().view(1, -1, 1, 1)).sum(1)
    grad = abs(grad_scale) * float(((1 - eps) * wy + (eps / c) * valid * float(w.abs().sum())).max())
    return pix, grad


def check(x, y, *, weight=None, ignore_index=255, eps=0.1, grad_scale=1.0, layout="contiguous", want_map=True,
          want_grad=True, num_threads=None, what=""):
    """One kernel call against the oracle; returns the kernel's (sums, grad, loss map)."""
    n, c, h, w = x.shape
    grad, grad_buf = make_grad(x, layout) if want_grad else (None, None)
    lmap = torch.full((n, h, w), float("nan")) if want_map else None
    sums = fused(x, y, weight=weight, ignore_index=ignore_index, grad=grad, grad_scale=grad_scale, loss_map=lmap,
                 eps=eps, num_threads=num_threads)
    loss, wsum, ref_map, ref_grad = oracle(x, y, weight, ignore_index, eps, grad_scale)
    tol = TOL[x.dtype]
    pix_scale, grad_scale_abs = scales(x, y, weight, ignore_index, eps, grad_scale)
    assert sums[BAD] == 0 and sums[FIRST_BAD] == -1, what
    assert abs(sums[LOSS] - loss) <= tol * float(pix_scale.sum()) + 1e-12, (what, sums[LOSS], loss)
    assert abs(sums[WSUM] - wsum) <= 1e-6 * (1 + abs(wsum)), (what, sums[WSUM], wsum)
    valid = y != ignore_index
    if want_map:
        torch.testing.assert_close(lmap.double(), ref_map, rtol=tol, atol=tol * float(pix_scale.max()) + 1e-12,
                                   msg=lambda m: f"{what} loss map: {m}")
        assert torch.all(lmap[~valid] == 0), what
    if want_grad:
        torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol * grad_scale_abs + 1e-12,
                                   msg=lambda m: f"{what} gradient: {m}")
        ignored = grad.permute(0, 2, 3, 1)[~valid]
        assert torch.all(ignored == 0) and not torch.signbit(ignored).any(), what  # +0 (a select, not a product)
        if layout == "sliced":  # nothing outside the view was written
            outside = torch.ones(grad_buf.shape, dtype=torch.bool)
            outside[:, 1:1 + c, 2:2 + h, 1:1 + w] = False
            assert torch.all(torch.isnan(grad_buf[outside])), what
    return sums, grad, lmap


SHAPES = [(1, 3, 5, 7), (2, 19, 7, 11), (2, 21, 1, 31), (1, 150, 3, 5), (2, 5, 4, 48)]


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.37])
@pytest.mark.parametrize("weight_kind", [None, "positive", "signed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_matches_cross_entropy_label_smoothing(eps, weight_kind, dtype, layout):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((eps, weight_kind, dtype, layout)).encode()))
    for i, shape in enumerate(SHAPES):
        x = make_logits(shape, dtype, layout, gen)
        y = make_labels(shape, gen, sliced=layout == "sliced")
        weight = make_weight(shape[1], weight_kind, gen)
        check(x, y, weight=weight, eps=eps, grad_scale=(1.0, 0.37, -2.5)[i % 3], layout=layout,
              want_map=i % 2 == 0, what=f"{shape} {dtype} {layout} w={weight_kind} eps={eps}")


@pytest.mark.parametrize("ignore_index", [255, -100, 0])
def test_ignore_index_values_and_all_ignored(ignore_index):
    gen = torch.Generator().manual_seed(3)
    shape = (2, 6, 5, 9)
    x = make_logits(shape, torch.float32, "contiguous", gen)
    y = make_labels(shape, gen, ignore_index=ignore_index, ignore_frac=0.4)
    check(x, y, weight=make_weight(6, "positive", gen), ignore_index=ignore_index, eps=0.2, grad_scale=0.5)
    y_all = torch.full((2, 5, 9), ignore_index)
    sums, grad, lmap = check(x, y_all, eps=0.2, ignore_index=ignore_index)
    assert sums[LOSS] == 0 and sums[WSUM] == 0 and torch.all(grad == 0) and torch.all(lmap == 0)


def test_eps_one_and_grad_scale_zero():
    gen = torch.Generator().manual_seed(4)
    shape = (1, 7, 6, 13)
    x = make_logits(shape, torch.float32, "contiguous", gen)
    y = make_labels(shape, gen)
    check(x, y, weight=make_weight(7, "signed", gen), eps=1.0, grad_scale=1.5)  # only the smoothing term
    sums, grad, _ = check(x, y, eps=0.3, grad_scale=0.0)
    assert torch.all(grad == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_at_ignored_pixels_stay_out(dtype):
    gen = torch.Generator().manual_seed(5)
    shape = (2, 9, 6, 21)
    x = make_logits(shape, dtype, "contiguous", gen)
    y = make_labels(shape, gen, ignore_frac=0.3)
    ignored = (y == 255).unsqueeze(1).expand_as(x).clone()
    ignored[:, 1::3] = False  # a mix of NaN, +inf and -inf and finite values at the ignored pixels
    x = x.masked_fill(ignored & (torch.arange(9).view(1, -1, 1, 1) % 3 == 0), float("nan"))
    x = x.masked_fill(ignored & (torch.arange(9).view(1, -1, 1, 1) % 3 == 2), float("inf"))
    x[:, 1][y == 255] = float("-inf")
    for weight in (None, make_weight(9, "signed", gen)):
        grad = torch.empty_like(x)
        lmap = torch.empty(2, 6, 21)
        sums = fused(x, y, weight=weight, grad=grad, loss_map=lmap, eps=0.25, grad_scale=0.7)
        finite = x.masked_fill((y == 255).unsqueeze(1), 0.0)  # the same logits where counted
        loss, _, ref_map, ref_grad = oracle(finite, y, weight, 255, 0.25, 0.7)
        pix_scale, grad_scale_abs = scales(finite, y, weight, 255, 0.25, 0.7)
        tol = TOL[dtype]
        assert abs(sums[LOSS] - loss) <= tol * float(pix_scale.sum()), (sums[LOSS], loss)
        assert torch.isfinite(lmap).all() and torch.all(lmap[y == 255] == 0)
        torch.testing.assert_close(lmap.double(), ref_map, rtol=tol, atol=tol * float(pix_scale.max()))
        assert torch.isfinite(grad).all() and torch.all(grad.permute(0, 2, 3, 1)[y == 255] == 0)
        torch.testing.assert_close(grad.double(), ref_grad, rtol=tol, atol=tol * grad_scale_abs)


def test_eps_zero_is_bit_identical_to_no_argument():
    gen = torch.Generator().manual_seed(6)
    cases = [((2, 21, 37, 53), torch.float32, "contiguous"), ((1, 150, 3, 5), torch.float32, "sliced"),
             ((2, 19, 7, 11), torch.float16, "channels_last"), ((2, 21, 1, 31), torch.bfloat16, "contiguous")]
    for shape, dtype, layout in cases:
        x = make_logits(shape, dtype, layout, gen)
        y = make_labels(shape, gen, sliced=layout == "sliced")
        for weight in (None, make_weight(shape[1], "signed", gen)):
            out = []
            for eps, positional in ((None, False), (0.0, False), (0.0, True)):
                grad, _ = make_grad(x, layout)
                lmap = torch.empty(shape[0], shape[2], shape[3])
                sums = fused(x, y, weight=weight, grad=grad, grad_scale=0.3, loss_map=lmap, eps=eps,
                             positional=positional)
                out.append((sums, grad, lmap))
            for sums, grad, lmap in out[1:]:
                assert sums == out[0][0]  # every sum, bit for bit
                assert torch.equal(grad.view(torch.int16 if dtype != torch.float32 else torch.int32),
                                   out[0][1].view(torch.int16 if dtype != torch.float32 else torch.int32))
                assert torch.equal(lmap.view(torch.int32), out[0][2].view(torch.int32))


def test_threads_and_streamed_gradient():
    """A gradient large enough to be streamed (>= 8 MiB float32, odd width: unaligned rows), in parallel blocks:
    matches the oracle, and the sums do not depend on the thread count."""
    gen = torch.Generator().manual_seed(7)
    shape = (1, 21, 257, 401)
    x = make_logits(shape, torch.float32, "contiguous", gen)
    y = make_labels(shape, gen)
    weight = make_weight(21, "positive", gen)
    s2, g2, m2 = check(x, y, weight=weight, eps=0.1, grad_scale=1 / 1000, num_threads=2)
    grad = torch.empty_like(x)
    lmap = torch.empty(1, 257, 401)
    s1 = fused(x, y, weight=weight, grad=grad, grad_scale=1 / 1000, loss_map=lmap, eps=0.1, num_threads=1)
    assert s1 == s2 and torch.equal(grad, g2) and torch.equal(lmap, m2)


def test_adversarial_terms_are_unchanged():
    """generator_loss's labelled pass (adv_mode 1): smoothing changes the cross-entropy part only."""
    gen = torch.Generator().manual_seed(8)
    shape = (2, 5, 6, 19)
    x = make_logits(shape, torch.float32, "contiguous", gen)
    y = make_labels(shape, gen)
    z = torch.randn((2, 6, 19), generator=gen)
    out = {}
    for eps in (0.0, 0.3):
        grad, grad_z = torch.empty_like(x), torch.empty(2, 6, 19)
        out[eps] = (fused(x, y, grad=grad, z=z, adv_mode=1, grad_z=grad_z, eps=eps), grad, grad_z)
    (s0, _, gz0), (s3, g3, gz3) = out[0.0], out[0.3]
    assert s0[ADV] == s3[ADV] and s0[ADV_COUNT] == s3[ADV_COUNT] and torch.equal(gz0, gz3)
    loss, wsum, _, ref_grad = oracle(x, y, None, 255, 0.3, 1.0)
    assert abs(s3[LOSS] - loss) <= 1e-5 * abs(loss) and s3[WSUM] == wsum
    torch.testing.assert_close(g3.double(), ref_grad, rtol=2e-5, atol=2e-6)


def test_maps_only_ignores_smoothing_and_arguments_are_checked():
    gen = torch.Generator().manual_seed(9)
    shape = (1, 4, 3, 5)
    x = make_logits(shape, torch.float32, "contiguous", gen)
    y = make_labels(shape, gen)
    assert fused(x, y, maps_only=True, eps=0.4) == fused(x, y, maps_only=True)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="label_smoothing"):
            fused(x, y, eps=bad)
    with pytest.raises(ValueError, match="label_smoothing"):
        fused(x, None, eps=0.1)
    fused(x, None, eps=0.0)  # (eps 0: pseudo-labels as before)
    with pytest.raises(TypeError):  # every argument but label_smoothing is required
        _C_cpu.fused_loss(sizes=(1, 4, 3, 5))


# ---- every kernel build the CPU runs (FASTADVSEG_CPU_ISA caps the runtime choice) --------------------------------
ISA_CASES = [((2, 19, 7, 11), torch.float32, "contiguous", "signed", 0.37),
             ((2, 21, 5, 48), torch.float32, "contiguous", None, 0.1),  # full in-place blocks
             ((1, 150, 3, 5), torch.float32, "sliced", "positive", 0.1),
             ((2, 7, 6, 33), torch.float16, "channels_last", "positive", 0.2),
             ((2, 21, 3, 32), torch.bfloat16, "contiguous", "signed", 0.1)]


def run_isa_cases():
    gen = torch.Generator().manual_seed(10)
    for shape, dtype, layout, weight_kind, eps in ISA_CASES:
        x = make_logits(shape, dtype, layout, gen)
        y = make_labels(shape, gen, sliced=layout == "sliced")
        check(x, y, weight=make_weight(shape[1], weight_kind, gen), eps=eps, grad_scale=0.5, layout=layout,
              what=f"{_C_cpu.isa()} {shape} {dtype} {layout}")


_ISA_CHILD = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import test_cpu_kernel_smoothing as T
    T.run_isa_cases()
    print(json.dumps({"isa": T._C_cpu.isa()}))
""")


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_every_kernel_build(isa):
    env = dict(os.environ, FASTADVSEG_CPU_ISA=isa)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", _ISA_CHILD, tests_dir], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])["isa"]
    if got != isa:
        pytest.skip(f"this CPU does not run the {isa} build (got {got})")
