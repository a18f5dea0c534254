"""The Triton launchers called directly: ``cross_entropy_forward`` (with label smoothing) and ``generator_forward``.

Against float64 oracles (``F.cross_entropy(x.double(), ..., label_smoothing=eps)`` and its autograd gradient):
eps in {0, 0.1, 0.37}, no / positive / signed class weights, float32 / float16 / bfloat16, contiguous /
channels_last / sliced (non-contiguous, storage offset) logits, odd small shapes, ignored pixels, NaN/Inf logits
at uncounted pixels. The bad-label report ``bad`` = [count, first in pixel order] of both launchers: none, one,
several (the first in pixel order wins across images and across pixel blocks), 2**40, negative labels,
ignore_index (also negative, large, or inside [0, C)) never counted, non-flat label maps; its reduction makes no
host sync. Finally every new kernel variant is compiled for sm_90 through Triton's real compiler (the
interpreter never meets it).

Runs on CUDA, or on CPU under TRITON_INTERPRET=1 (set below if unset, before triton is imported). Shapes are
small: the interpreter runs each program in numpy.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import itertools  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("the triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from fastadvseg.kernels.triton import common  # noqa: E402
from fastadvseg.kernels.triton.cross_entropy import cross_entropy_forward  # noqa: E402
from fastadvseg.kernels.triton.generator_loss import generator_forward  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "sliced"]
SHAPES = [(1, 3, 5, 7), (2, 19, 7, 11), (1, 150, 3, 5)]
EPS = [0.0, 0.1, 0.37]
WEIGHTS = ["none", "positive", "signed"]


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(777)


def _layout(base, layout):
    """``base`` (N, C, H, W) or (N, H, W) with a memory layout; 'sliced' is a strided view at a storage offset."""
    if layout == "contiguous":
        return base.clone()
    if layout == "channels_last":  # an (N, H, W) map: the strides of an (N, 1, H, W) channels_last tensor
        if base.dim() == 3:
            return base.unsqueeze(1).contiguous(memory_format=torch.channels_last)[:, 0]
        return base.clone().contiguous(memory_format=torch.channels_last)
    lead, (h, w) = base.shape[:-2], base.shape[-2:]
    big = torch.zeros((*lead[:-1], lead[-1] + 2, 2 * h + 1, w + 3) if base.dim() == 4 else
                      (lead[0] + 1, 2 * h + 1, w + 3), dtype=base.dtype, device=base.device)
    view = big[:, 1:-1, 1::2, 2:w + 2] if base.dim() == 4 else big[1:, 1::2, 2:w + 2]
    view.copy_(base)
    assert not view.is_contiguous() and view.storage_offset() > 0
    return view


def _logits(shape, dtype, layout, gen, scale=3.0):
    base = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    return _layout(base, layout).to(DEVICE) if DEVICE == "cpu" else _layout(base.to(DEVICE), layout)


def _labels(shape, gen, ignore_index, ignore_frac=0.25):
    n, c, h, w = shape
    y = torch.randint(0, c, (n, h, w), generator=gen)
    y[torch.rand((n, h, w), generator=gen) < ignore_frac] = ignore_index
    return y.to(DEVICE)


def _weight(kind, c, gen):
    if kind == "none":
        return None
    w = torch.rand(c, generator=gen, dtype=torch.float64) * 1.5 + 0.25
    if kind == "signed":
        w[::3] *= -1.0
    return w.float().to(DEVICE)


def _close(actual, expected, dtype, what, scale=None):
    """Relative tolerance of the input dtype; atol = rtol times the magnitude (max |expected| unless given)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: {tuple(actual.shape)} != {tuple(expected.shape)}"
    rtol = RTOL[dtype]
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-6), equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def _oracle(x, y, weight, ignore_index, eps):
    """float64 (per-pixel loss map, its sum, weight sum, gradient of the sum) from PyTorch's definition."""
    xd = x.detach().double().requires_grad_(True)
    wd = None if weight is None else weight.double()
    loss_map = F.cross_entropy(xd, y, weight=wd, ignore_index=ignore_index, label_smoothing=eps, reduction="none")
    total = F.cross_entropy(xd, y, weight=wd, ignore_index=ignore_index, label_smoothing=eps, reduction="sum")
    (grad,) = torch.autograd.grad(total, xd)
    counted = y != ignore_index
    w_y = torch.ones_like(loss_map) if wd is None else wd[torch.where(counted, y, 0)]
    return loss_map.detach(), total.detach(), torch.where(counted, w_y, 0.0).sum(), grad


def _check_ce(x, y, weight, ignore_index, eps, dtype, what):
    loss_sum, weight_sum, loss_map, grad, bad = cross_entropy_forward(
        x, y, weight, ignore_index, label_smoothing=eps, store_grad=True, store_map=True)
    ref_map, ref_sum, ref_wsum, ref_grad = _oracle(x, y, weight, ignore_index, eps)
    assert loss_sum.dtype == weight_sum.dtype == loss_map.dtype == torch.float32
    assert grad.dtype == x.dtype and grad.shape == x.shape and grad.device == x.device
    # the sums accumulate in float32: scale by the sum of magnitudes (signed weights cancel)
    _close(loss_sum, ref_sum, torch.float32 if dtype == torch.float32 else dtype, what + " loss_sum",
           scale=ref_map.abs().sum().item())
    _close(weight_sum, ref_wsum, torch.float32, what + " weight_sum", scale=ref_map.numel() * 2.0)
    _close(loss_map, ref_map, torch.float32 if dtype == torch.float32 else dtype, what + " loss_map")
    _close(grad, ref_grad, dtype, what + " grad")
    assert bad.dtype == torch.int64 and bad.shape == (2,) and bad.device == x.device
    assert bad.tolist() == [0, 0], what
    return loss_sum, weight_sum, loss_map, grad


# ------------------------------------------------------------------------------------- cross-entropy vs oracle

# every (eps, weights, dtype); each (layout, shape) pair comes up three times along the list
CE_CASES = [(eps, wk, dt, LAYOUTS[i % 3], SHAPES[(i // 3) % 3])
            for i, (eps, wk, dt) in enumerate(itertools.product(EPS, WEIGHTS, DTYPES))]


@pytest.mark.parametrize("eps,weight_kind,dtype,layout,shape", CE_CASES,
                         ids=[f"eps{e}-{w}-{str(d)[6:]}-{l}-{'x'.join(map(str, s))}" for e, w, d, l, s in CE_CASES])
def test_cross_entropy_matches_float64_oracle(eps, weight_kind, dtype, layout, shape, gen):
    ignore_index = -100 if weight_kind == "positive" else 255
    x = _logits(shape, dtype, layout, gen)
    assert layout != "sliced" or (not x.is_contiguous() and x.storage_offset() > 0)
    y = _labels(shape, gen, ignore_index)
    weight = _weight(weight_kind, shape[1], gen)
    _check_ce(x, y, weight, ignore_index, eps, dtype, f"{shape} {layout} {dtype} eps={eps} w={weight_kind}")


@pytest.mark.parametrize("eps", [0.0, 0.37])
def test_cross_entropy_without_stores_gives_the_same_sums(eps, gen):
    shape = (2, 19, 7, 11)
    x = _logits(shape, torch.float32, "channels_last", gen)
    y = _labels(shape, gen, 255)
    weight = _weight("signed", 19, gen)
    full = cross_entropy_forward(x, y, weight, 255, label_smoothing=eps, store_grad=True, store_map=True)
    bare = cross_entropy_forward(x, y, weight, 255, label_smoothing=eps, store_grad=False, store_map=False)
    assert bare[2] is None and bare[3] is None
    assert torch.equal(bare[0], full[0]) and torch.equal(bare[1], full[1])
    unchecked = cross_entropy_forward(x, y, weight, 255, label_smoothing=eps, store_grad=False, store_map=False,
                                      check_labels=False)
    assert torch.equal(unchecked[0], full[0]) and unchecked[4].tolist() == [0, 0]


def test_label_smoothing_of_one_and_full_grid_of_layouts(gen):
    """eps = 1 (only the smoothing term) on every layout x shape, float32 with signed weights."""
    for layout, shape in itertools.product(LAYOUTS, SHAPES):
        x = _logits(shape, torch.float32, layout, gen)
        y = _labels(shape, gen, 255)
        _check_ce(x, y, _weight("signed", shape[1], gen), 255, 1.0, torch.float32, f"{layout} {shape} eps=1")


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_uncounted_pixels_are_exactly_zero_even_with_nan_and_inf_logits(eps, gen):
    shape = (2, 19, 7, 11)
    x = _logits(shape, torch.float32, "sliced", gen)
    y = _labels(shape, gen, 255)
    y[0, 1, 2], y[1, 3, 4], y[1, 6, 10] = 255, 19, -3  # ignored, bad (too big), bad (negative)
    with torch.no_grad():
        x[0, 5, 1, 2], x[1, :, 3, 4], x[1, 0, 6, 10] = float("nan"), float("inf"), float("-inf")
    weight = _weight("positive", 19, gen)
    loss_sum, weight_sum, loss_map, grad, bad = cross_entropy_forward(
        x, y, weight, 255, label_smoothing=eps, store_grad=True, store_map=True)
    assert bad.tolist() == [2, 19]  # (1, 3, 4) comes before (1, 6, 10) in pixel order
    for n, h, w in ((0, 1, 2), (1, 3, 4), (1, 6, 10)):
        assert loss_map[n, h, w].item() == 0.0
        assert torch.count_nonzero(grad[n, :, h, w]).item() == 0 and torch.isfinite(grad[n, :, h, w]).all()
    # bad labels are ignored: compare with the oracle where they are ignore_index and the logits are finite
    clean_y = torch.where((y < 0) | (y >= 19), 255, y)
    clean_x = x.detach().clone()
    clean_x[0, :, 1, 2] = clean_x[1, :, 3, 4] = clean_x[1, :, 6, 10] = 0.0
    ref_map, ref_sum, ref_wsum, ref_grad = _oracle(clean_x, clean_y, weight, 255, eps)
    assert torch.isfinite(loss_sum) and torch.isfinite(grad).all()
    _close(loss_sum, ref_sum, torch.float32, "loss_sum", scale=ref_map.abs().sum().item())
    _close(weight_sum, ref_wsum, torch.float32, "weight_sum")
    _close(loss_map, ref_map, torch.float32, "loss_map")
    _close(grad, ref_grad, torch.float32, "grad")


def test_nan_logit_at_a_counted_pixel_propagates(gen):
    shape = (1, 3, 5, 7)
    x = _logits(shape, torch.float32, "contiguous", gen)
    y = _labels(shape, gen, 255, ignore_frac=0.0)
    with torch.no_grad():
        x[0, 1, 2, 3] = float("nan")
    loss_sum, _, loss_map, _, _ = cross_entropy_forward(x, y, None, 255, label_smoothing=0.1, store_grad=True,
                                                        store_map=True)
    assert torch.isnan(loss_sum) and torch.isnan(loss_map[0, 2, 3]) and torch.isfinite(loss_map[0, 0]).all()


@pytest.mark.parametrize("eps", [-0.1, 1.5, float("nan")])
def test_label_smoothing_outside_unit_interval_raises(eps):
    x = torch.zeros((1, 3, 2, 2), device=DEVICE)
    y = torch.zeros((1, 2, 2), dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy_forward(x, y, None, 255, label_smoothing=eps, store_grad=False, store_map=False)


# ----------------------------------------------------------------------------------------- generator (labelled)

@pytest.mark.parametrize("dtype,layout", [(torch.float32, "sliced"), (torch.float16, "channels_last"),
                                          (torch.bfloat16, "contiguous")])
def test_generator_labelled_matches_float64_oracle(dtype, layout, gen):
    shape = (2, 19, 7, 11)
    x = _logits(shape, dtype, layout, gen)
    d = _layout((torch.randn((2, 7, 11), generator=gen, dtype=torch.float64) * 2).to(dtype), layout).to(DEVICE)
    y = _labels(shape, gen, 255)
    term_sum, term_count, adv_sum, adv_count, gx, gz, bad = generator_forward(
        x, d, y, 255, 0.2, store_gx=True, store_gz=True)
    ref_map, ref_sum, ref_count, ref_gx = _oracle(x, y, None, 255, 0.0)
    counted = y != 255
    zd = d.detach().double().requires_grad_(True)
    adv_map = F.binary_cross_entropy_with_logits(zd, torch.ones_like(zd), reduction="none")
    ref_adv = torch.where(counted, adv_map, 0.0).sum()
    (ref_gz,) = torch.autograd.grad(ref_adv, zd)
    lo = torch.float32 if dtype == torch.float32 else dtype
    _close(term_sum, ref_sum, lo, "ce sum", scale=ref_map.abs().sum().item())
    assert term_count.item() == ref_count.item() == adv_count.item() == counted.sum().item()
    _close(adv_sum, ref_adv, lo, "adv sum")
    _close(gx, ref_gx, dtype, "gx")
    _close(gz, ref_gz, dtype, "gz")
    assert bad.tolist() == [0, 0] and bad.dtype == torch.int64 and bad.device == x.device


def test_generator_unlabelled_reports_no_bad_labels(gen):
    shape = (1, 3, 5, 7)
    x = _logits(shape, torch.float32, "contiguous", gen)
    d = torch.randn((1, 5, 7), generator=gen).to(DEVICE)
    out = generator_forward(x, d, None, 255, 0.2, store_gx=False, store_gz=False)
    assert len(out) == 7
    bad = out[6]
    assert bad.dtype == torch.int64 and bad.shape == (2,) and bad.device == x.device and bad.tolist() == [0, 0]


# --------------------------------------------------------------------------------------------- bad-label report

# C = 19 with H·W = 143 pixels: more than one block of pixels per image (checked below), N = 3 images
BAD_SHAPE = (3, 19, 13, 11)


def _run(launcher, x, y, ignore_index, check_labels=True):
    if launcher == "cross_entropy":
        loss_sum, count, _, _, bad = cross_entropy_forward(x, y, None, ignore_index, label_smoothing=0.1,
                                                           store_grad=False, store_map=False,
                                                           check_labels=check_labels)
    else:
        d = torch.zeros(y.shape, device=DEVICE)
        loss_sum, count, _, _, _, _, bad = generator_forward(x, d, y, ignore_index, 0.2, store_gx=False,
                                                             store_gz=False, check_labels=check_labels)
    assert bad.dtype == torch.int64 and bad.shape == (2,) and bad.device == x.device
    return bad.tolist(), count.item()


def _flat(n, h, w):
    return n * BAD_SHAPE[2] * BAD_SHAPE[3] + h * BAD_SHAPE[3] + w


# (name, ignore_index, {(n, h, w): label}, expected [count, first value])
BAD_CASES = [
    ("none", 255, {}, [0, 0]),
    ("one", 255, {(1, 4, 9): 19}, [1, 19]),
    ("one_at_the_last_pixel", 255, {(2, 12, 10): -7}, [1, -7]),
    # image 0's second pixel block (p = 130) comes before image 1's first block and every later pixel
    ("several_across_images_and_blocks", 255, {(1, 0, 3): 40, (0, 11, 9): 23, (2, 0, 0): 77, (1, 12, 1): -2},
     [4, 23]),
    # one image, both of its blocks: p = 77 (block 0) before p = 127 (block 0) and p = 142 (block 1)
    ("several_in_one_image", 255, {(1, 12, 10): 1000, (1, 7, 0): 2 ** 40, (1, 11, 6): 19}, [3, 2 ** 40]),
    ("two_pow_40", 255, {(0, 2, 2): 2 ** 40}, [1, 2 ** 40]),
    ("int64_extremes", 255, {(0, 0, 1): -(2 ** 63), (0, 0, 2): 2 ** 63 - 1}, [2, -(2 ** 63)]),
    ("negative", 255, {(2, 5, 5): -1, (2, 5, 6): -(2 ** 40)}, [2, -1]),
    ("ignore_index_never_counted", 255, {(0, 0, 0): 255, (0, 0, 1): 255, (1, 3, 3): 256}, [1, 256]),
    ("negative_ignore_index", -1, {(0, 0, 0): -1, (0, 1, 0): -2, (2, 0, 0): 255}, [2, -2]),
    ("large_ignore_index", 2 ** 40, {(0, 0, 0): 2 ** 40, (0, 0, 1): 2 ** 41}, [1, 2 ** 41]),
    ("ignore_index_inside_range", 3, {(0, 0, 0): 3, (1, 0, 0): 19}, [1, 19]),
]


def test_bad_cases_span_several_pixel_blocks():
    _, block_p, _ = common.tile_shape(BAD_SHAPE[1], BAD_SHAPE[2] * BAD_SHAPE[3])
    assert block_p < BAD_SHAPE[2] * BAD_SHAPE[3]  # 2 blocks per image: row order != a single block
    assert _flat(0, 11, 9) >= block_p and _flat(1, 12, 10) - _flat(1, 0, 0) >= block_p


@pytest.mark.parametrize("launcher", ["cross_entropy", "generator"])
@pytest.mark.parametrize("name,ignore_index,bad_at,expected", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_label_report(launcher, name, ignore_index, bad_at, expected, gen):
    n, c, h, w = BAD_SHAPE
    x = _logits(BAD_SHAPE, torch.float32, "contiguous", gen)
    y = torch.randint(0, c, (n, h, w), generator=gen)
    y[torch.rand((n, h, w), generator=gen) < 0.2] = ignore_index
    for (i, j, k), v in bad_at.items():
        y[i, j, k] = v
    y = y.to(DEVICE)
    assert _run(launcher, x, y, ignore_index)[0] == expected
    # the same labels through a non-flat (sliced) label map: the report is in pixel order, not memory order
    assert _run(launcher, x, _layout(y, "sliced"), ignore_index)[0] == expected


@pytest.mark.parametrize("launcher", ["cross_entropy", "generator"])
def test_bad_labels_are_ignored_and_unchecked_when_asked(launcher, gen):
    x = _logits(BAD_SHAPE, torch.float32, "contiguous", gen)
    y = _labels(BAD_SHAPE, gen, 255)
    assert _run(launcher, x, y, 255) == ([0, 0], (y != 255).sum().item())
    y[0, 0, 0], y[2, 12, 10] = -5, 2 ** 40
    checked, count = _run(launcher, x, y, 255)
    assert checked == [2, -5]
    assert count == ((y != 255) & (y >= 0) & (y < BAD_SHAPE[1])).sum().item()  # weight sum / ce count
    unchecked, count_unchecked = _run(launcher, x, y, 255, check_labels=False)
    assert unchecked == [0, 0] and count_unchecked == count


def test_bad_label_summary_picks_the_smallest_pixel_index_without_host_sync(monkeypatch):
    big = common.NO_BAD_LABEL
    report = torch.tensor([[0, big, 0], [2, 700, -9], [1, 650, 2 ** 40], [3, 900, 5], [0, big, 0]],
                          dtype=torch.int64, device=DEVICE)
    none = torch.tensor([[0, big, 0]] * 3, dtype=torch.int64, device=DEVICE)

    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation in bad_label_summary")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__bool__", "__int__", "__index__", "cpu", "numpy"):
            m.setattr(torch.Tensor, name, refuse)
        summary, empty = common.bad_label_summary(report), common.bad_label_summary(none)
    assert summary.tolist() == [6, 2 ** 40] and summary.device == report.device
    assert empty.tolist() == [0, 0]
    assert common.bad_label_summary(none[:0]).tolist() == [0, 0]  # an empty launch
    if DEVICE == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            common.bad_label_summary(report)
        finally:
            torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------------------------------- compile for sm_90

_COMPILE_SCRIPT = textwrap.dedent("""
    import sys, torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastadvseg.kernels.triton import cross_entropy as ce, generator_loss as gen
    from tools import compile_check as cc

    target = GPUTarget("cuda", 90, 32)
    try:
        from triton.compiler.compiler import make_backend
        make_backend(target)
    except Exception as exc:
        print(f"cannot compile for {target} here: {exc}")
        sys.exit(3)
    force_i64, done = [False], []

    def patch(kernel):
        def run(*args, grid=None, warmup=False, **kwargs):
            meta = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
            options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
            sig, constants = cc._signature(kernel, args, meta, force_i64[0])
            triton.compile(ASTSource(kernel, sig, constants), target=target, options=options)
            done.append(f"{kernel.__name__} {meta} i64={force_i64[0]}")
            print("ok", done[-1], flush=True)
        kernel.run = run

    patch(ce.cross_entropy_kernel)
    patch(gen.generator_kernel)
    g = torch.Generator().manual_seed(0)
    for force in (False, True):
        force_i64[0] = force
        for dtype, c, eps, weighted, stores, check in (
                (torch.float32, 19, 0.1, True, True, True), (torch.bfloat16, 19, 0.1, False, True, True),
                (torch.float16, 19, 0.0, True, False, True), (torch.float16, 150, 0.37, True, False, False),
                (torch.float32, 4100, 0.1, False, True, True)):
            x = torch.randn((2, c, 3, 5), generator=g).to(dtype)
            x = x if dtype != torch.bfloat16 else torch.zeros((2, c, 7, 6), dtype=dtype)[:, :, ::2, 1:]
            y = torch.randint(0, c, (x.shape[0], x.shape[2], x.shape[3]), generator=g)
            ce.cross_entropy_forward(x, y, torch.rand(c) if weighted else None, 2 ** 40 if force else 255,
                                     label_smoothing=eps, store_grad=stores, store_map=stores, check_labels=check)
            gen.generator_forward(x, torch.randn(y.shape).to(dtype), y, 255, 0.2, store_gx=stores, store_gz=stores,
                                  check_labels=check)
    print(len(done), "compiled")
""")


def test_new_kernel_variants_compile_for_sm90():
    """Label smoothing, the bad-label report and its flag through Triton's real compiler (cubin for sm_90)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "20 compiled" in proc.stdout, proc.stdout[-4000:]
