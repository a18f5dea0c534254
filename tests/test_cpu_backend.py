"""The ``cpu`` backend's own guarantees (the shared suite checks its values and gradients against the oracle).

Determinism (bit-identical across runs and thread counts), index arithmetic on strided views with large storage
offsets, streamed outputs (8 MiB and more), the label check made in the kernels' own passes, the gradient buffer
handed to autograd (and recomputed for a second backward), every kernel build (AVX-512, AVX2, portable), the
native boundary (the binding takes tensors, never addresses, and checks what its kernels touch), and the
fallback when the extension is switched off.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastadvseg as fas
from fastadvseg import _labels
from helpers import RTOL, assert_close, layout_4d

pytestmark = pytest.mark.skipif("cpu" not in fas.available_backends("cpu"),
                                reason=f"cpu backend not built: {fas.unavailable_reason('cpu')}")

# large enough that the kernels really run on several threads (below 32768 elements they run on one)
SHAPE = (2, 21, 37, 53)


def _inputs(seed=0, dtype=torch.float32, shape=SHAPE, layout="contiguous", extreme=False):
    """Logits, D's logits and labels. ``extreme``: logits spread over [-400, 60] (exp under- and overflow
    territory) with the last channel -inf everywhere (never a label)."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    x = torch.randn(shape, generator=g) * 3
    if extreme:
        x = torch.rand(shape, generator=g) * 460 - 400
        x[:, -1] = float("-inf")
    x = layout_4d(x.to(dtype), layout).requires_grad_()
    d = torch.randn((n, 1, h, w), generator=g).requires_grad_()
    t = torch.randint(0, c - 1 if extreme else c, (n, h, w), generator=g)
    t[torch.rand((n, h, w), generator=g) < 0.2] = 255
    return x, d, t


def _run_all(x, d, t, backend="cpu"):
    """Every op's values and gradients, as a flat list of tensors."""
    out = []
    for target in (t, None):
        x.grad, d.grad = None, None
        res = fas.generator_loss(x, d, target, lambda_adv=0.01, lambda_semi=0.1, backend=backend)
        res.total.backward()
        out += [v.detach().clone() for v in res] + [x.grad.clone(), d.grad.clone()]
    for reduction in ("mean", "sum", "none"):
        x.grad = None
        loss = fas.cross_entropy2d(x, t, reduction=reduction, backend=backend)
        loss.sum().backward()
        out += [loss.detach().clone(), x.grad.clone()]
    x.grad = None
    loss, ratio = fas.semi_cross_entropy2d(x, d, return_ratio=True, backend=backend)
    loss.backward()
    out += [loss.detach().clone(), ratio.clone(), x.grad.clone()]
    x.grad = None
    y = fas.softmax2d(x, backend=backend)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype)).sum().backward()
    out += [y.detach().clone(), x.grad.clone()]
    d.grad = None
    loss = fas.discriminator_loss(d, d.detach() * 0.5, backend=backend)
    loss.backward()
    out += [loss.detach().clone(), d.grad.clone()]
    return out


def _bits(t):
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _assert_identical(a, b):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert u.dtype == v.dtype and u.shape == v.shape, i
        assert torch.equal(_bits(u), _bits(v)), f"output {i} differs in some bit"


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_identical_across_runs(dtype, threads):
    torch.set_num_threads(2)
    x, d, t = _inputs(dtype=dtype)
    _assert_identical(_run_all(x, d, t), _run_all(x, d, t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bit_identical_across_thread_counts(dtype, threads):
    """Fixed blocks and block sums added in block order: the thread count does not change a single bit."""
    x, d, t = _inputs(dtype=dtype)
    torch.set_num_threads(1)
    one = _run_all(x, d, t)
    torch.set_num_threads(2)
    two = _run_all(x, d, t)
    _assert_identical(one, two)


def _close(a, b, rtol=1e-5):
    for i, (u, v) in enumerate(zip(a, b)):
        u, v = u.double(), v.double()
        scale = max(v.abs().max().item(), 1e-6) if v.numel() else 1.0
        torch.testing.assert_close(u, v, rtol=rtol, atol=rtol * scale, equal_nan=True, msg=f"output {i}")


def test_large_storage_offset_views():
    """Views deep into big storages (offsets of millions of elements, odd strides) index correctly."""
    n, c, h, w = 2, 5, 9, 11
    off = 3_000_001
    big = torch.zeros(off + 4 * n * c * h * w)
    x = big[off:off + 4 * n * c * h * w].view(n, c, 2 * h, 2 * w)[:, :, ::2, 1::2]
    assert x.storage_offset() >= off and not x.is_contiguous()
    g = torch.Generator().manual_seed(3)
    x.copy_(torch.randn(x.shape, generator=g) * 2)
    x.requires_grad_()
    bigt = torch.full((off + 1 + 2 * n * h * w,), 255, dtype=torch.int64)
    t = bigt[off + 1:off + 1 + 2 * n * h * w].view(n, h, 2 * w)[:, :, ::2]
    t.copy_(torch.randint(0, c, t.shape, generator=g))
    bigd = torch.zeros(off + 2 + 3 * n * h * w)
    d = bigd[off + 2:off + 2 + 3 * n * h * w].view(n, 1, h, 3 * w)[..., ::3]
    d.copy_(torch.randn(d.shape, generator=g))
    d.requires_grad_()
    xr, dr = x.detach().clone().requires_grad_(), d.detach().clone().requires_grad_()
    _close(_run_all(x, d, t), _run_all(xr, dr, t.clone(), backend="reference"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_channels_last_and_sliced_agree_with_contiguous(dtype):
    x, d, t = _inputs(dtype=dtype, shape=(2, 7, 9, 13))
    base = _run_all(x, d, t)
    cl = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    big = torch.zeros((2, 9, 19, 17), dtype=dtype)
    sl = big[:, 1:8, 1::2, 2:15]
    sl.copy_(x.detach())
    sl.requires_grad_()
    for variant in (cl, sl):
        # same arithmetic per pixel whatever the layout: identical up to the gradient's memory layout
        _close(_run_all(variant, d, t), base, rtol=1e-6 if dtype == torch.float32 else 1e-2)


# Large float32 gradients and softmax outputs are written with streaming stores (csrc/cpu/kernels_impl.h,
# StreamRows): each channel's 64-byte lines are assembled across pixel vectors and blocks, and the partial lines at
# the ends of a run of blocks are stored masked. An odd H*W puts every channel row at a different offset from a
# line; H*W a multiple of 16 puts every row on a line boundary (the path without assembly), here with N=1. Which
# outputs stream depends on the CPU's cache (stream_bytes), so the tests set the threshold: both paths run on
# every machine.
STREAMED = [(2, 7, 389, 401), (1, 9, 512, 480)]


@pytest.fixture(params=["streamed", "ordinary stores"])
def store_path(request):
    from fastadvseg import _C_cpu

    _C_cpu.set_stream_bytes(8 << 20 if request.param == "streamed" else 1 << 62)
    yield request.param
    _C_cpu.set_stream_bytes(0)


def _l3_one_core_sees():
    """The L3 size as Linux reads it per cache instance; glibc's getconf (the whole package on AMD) only without it."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "3":
                size = (index / "size").read_text().strip()
                return int(size[:-1]) << {"K": 10, "M": 20, "G": 30}[size[-1]] if size[-1] in "KMG" else int(size)
        except (OSError, ValueError):
            pass
    try:
        return int(subprocess.run(["getconf", "LEVEL3_CACHE_SIZE"], capture_output=True, text=True).stdout.strip())
    except (OSError, ValueError):
        return 0


def test_outputs_stream_when_they_and_their_input_do_not_fit_in_the_l3_cache():
    from fastadvseg import _C_cpu

    l3 = _l3_one_core_sees()
    assert _C_cpu.l3_cache_bytes() == l3
    assert _C_cpu.default_stream_bytes() == max(8 << 20, l3 // 2)
    assert _C_cpu.stream_bytes() == _C_cpu.default_stream_bytes()
    _C_cpu.set_stream_bytes(12345)
    try:
        assert _C_cpu.stream_bytes() == 12345
    finally:
        _C_cpu.set_stream_bytes(0)
    assert _C_cpu.stream_bytes() == _C_cpu.default_stream_bytes()


@pytest.mark.parametrize("text, size", [("32768K", 32 << 20), ("32768K\n", 32 << 20), ("2M", 2 << 20),
                                        ("1G", 1 << 30), ("4096", 4096), ("", 0), ("K", 0), ("-5K", 0), ("7Q", 0)])
def test_cache_sizes_are_read_as_sysfs_writes_them(text, size):
    from fastadvseg import _C_cpu

    assert _C_cpu.parse_cache_size(text) == size


def _streamed_outputs(x, d, t, backend):
    """Values and gradients of the ops that stream their outputs: the fused-kernel losses and softmax2d."""
    out = []
    for target in (t, None):
        gx, gd = torch.autograd.grad(
            fas.generator_loss(x, d, target, lambda_adv=0.01, lambda_semi=0.1, backend=backend).total, [x, d])
        out += [gx, gd]
    loss = fas.cross_entropy2d(x, t, backend=backend)
    out += [loss.detach(), *torch.autograd.grad(loss, [x])]
    loss = fas.semi_cross_entropy2d(x, d, backend=backend)
    out += [loss.detach(), *torch.autograd.grad(loss, [x])]
    y = fas.softmax2d(x, backend=backend)
    up = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    out += [y.detach(), *torch.autograd.grad(y, [x], grad_outputs=up)]
    return out


@pytest.mark.parametrize("shape,layout", [(STREAMED[0], "contiguous"), (STREAMED[0], "sliced"),
                                          (STREAMED[1], "contiguous")])
def test_streamed_outputs_match_the_float64_reference(shape, layout, threads, store_path):
    g = torch.Generator().manual_seed(11)
    n, c, h, w = shape
    base = torch.randn(shape, generator=g) * 3
    t = torch.randint(0, c, (n, h, w), generator=g)
    t[torch.rand((n, h, w), generator=g) < 0.2] = 255
    d = torch.randn((n, 1, h, w), generator=g)
    x = layout_4d(base, layout).requires_grad_()
    assert x.numel() * x.element_size() >= 8 << 20
    torch.set_num_threads(2)
    two = _streamed_outputs(x, d.clone().requires_grad_(), t, "cpu")
    ref = _streamed_outputs(base.double().requires_grad_(), d.double().requires_grad_(), t, "reference")
    _close(two, ref, rtol=2e-5)
    # which thread streams which run of blocks must not show in a single bit
    torch.set_num_threads(1)
    _assert_identical(_streamed_outputs(x, d.clone().requires_grad_(), t, "cpu"), two)


def test_bad_labels_are_found_in_the_passes_the_ops_make_anyway(monkeypatch):
    """cross_entropy2d and generator_loss on the cpu backend check the labels in the maps pre-pass (or the
    kernel, where there is no pre-pass) and raise the public error, with the same count and the same first value
    in pixel order; the separate label pass does not run for them."""
    x, d, t = _inputs()
    n, c, h, w = x.shape
    t = t.clone()
    t[1, 30, 7], t[0, 20, 40], t[1, 36, 52] = 99, -7, c  # first in pixel order: -7, far from the first block
    with pytest.raises(ValueError) as public:
        _labels.report(_labels.find_bad_labels(t, c, 255), c, 255)
    assert "label -7 (3 pixel(s)" in str(public.value)
    monkeypatch.setattr(_labels, "find_bad_labels", lambda *a: pytest.fail("the separate label pass ran"))
    calls = [
        lambda: fas.cross_entropy2d(x, t, backend="cpu"),  # gradient and mean: the maps pre-pass
        lambda: fas.cross_entropy2d(x.detach(), t, backend="cpu"),  # no gradient: the kernel
        lambda: fas.cross_entropy2d(x, t, reduction="sum"),
        lambda: fas.cross_entropy2d(x, t, reduction="none"),
        lambda: fas.generator_loss(x, d, t, lambda_adv=0.01, backend="cpu"),
        lambda: fas.generator_loss(x.detach(), d.detach(), t, lambda_adv=0.01, backend="cpu"),
    ]
    for call in calls:
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == str(public.value)
    with fas.label_validation(False):
        for call in calls:
            call()  # such pixels are ignored


def test_gradient_buffer_handed_over_and_recomputed():
    x, d, t = _inputs()
    out = fas.generator_loss(x, d, t, lambda_adv=0.01, backend="cpu")
    g1 = torch.autograd.grad(out.total, [x, d], retain_graph=True)
    g2 = torch.autograd.grad(out.total, [x, d], retain_graph=True)  # recomputed: the first buffer was given away
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    with torch.no_grad():
        x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out.total, [x])


def test_logits_never_written():
    x, d, t = _inputs(dtype=torch.float16)
    before = x.detach().clone()
    _run_all(x, d, t)
    assert torch.equal(x.detach(), before)


def test_nan_at_ignored_pixels_stays_out_and_bad_labels_are_ignored():
    x, d, t = _inputs(shape=(1, 4, 5, 6))
    with torch.no_grad():
        x[0, :, 0, 0] = float("nan")
    t[0, 0, 0] = 255
    t[0, 1, 1] = 99  # out of range: ignored when validation is off
    t[0, 1, 2] = -7
    with fas.label_validation(False):
        loss = fas.cross_entropy2d(x, t, backend="cpu")
        ref = fas.cross_entropy2d(x, t, backend="reference")
        loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.int64, torch.int32, torch.float16, torch.bfloat16])
def test_one_hot_any_dtype(dtype):
    t = torch.randint(0, 5, (2, 3, 7))
    t[0, 0, :3] = 255
    assert torch.equal(fas.one_hot2d(t, 5, dtype=dtype, backend="cpu"),
                       fas.one_hot2d(t, 5, dtype=dtype, backend="reference"))


_CHILD = textwrap.dedent("""
    import json, sys, warnings, torch
    import fastadvseg as fas
    report = {"available": fas.available_backends(), "reason": fas.unavailable_reason("cpu")}
    if "cpu" in report["available"]:
        from fastadvseg import _C_cpu
        report["isa"] = _C_cpu.isa()
    x = torch.linspace(-3, 3, 2 * 5 * 6 * 7).reshape(2, 5, 6, 7).requires_grad_()
    d = torch.linspace(-2, 2, 2 * 6 * 7).reshape(2, 1, 6, 7)
    t = (torch.arange(2 * 6 * 7).reshape(2, 6, 7) * 7) % 6
    t[t == 5] = 255
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fas.generator_loss(x, d, t, lambda_adv=0.01)
        out.total.backward()
    report["warnings"] = [str(w.message) for w in caught]
    report["total"] = float(out.total)
    report["grad"] = x.grad.flatten().tolist()
    print(json.dumps(report))
""")


def _child(**env):
    full = dict(os.environ, **env)
    full.pop("FASTADVSEG_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=full, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_forced_off_falls_back_to_reference_with_a_reason():
    off = _child(FASTADVSEG_DISABLE_CPU_EXT="1")
    assert "cpu" not in off["available"] and "reference" in off["available"]
    assert "FASTADVSEG_DISABLE_CPU_EXT" in off["reason"]
    assert any("reference" in w and "cpu" in w for w in off["warnings"]), off["warnings"]
    on = _child()
    assert "cpu" in on["available"] and on["reason"] is None and not on["warnings"]
    assert abs(on["total"] - off["total"]) <= 1e-5 * abs(off["total"])
    torch.testing.assert_close(torch.tensor(on["grad"]), torch.tensor(off["grad"]), rtol=1e-5, atol=1e-7)


def test_portable_build_agrees_with_the_default_one():
    """FASTADVSEG_CPU_ISA=base runs the portable (SSE2) kernels; they agree with the AVX2 ones and the reference."""
    base = _child(FASTADVSEG_CPU_ISA="base")
    default = _child()
    assert base["isa"] == "base"
    ref = _child(FASTADVSEG_DISABLE_CPU_EXT="1")
    for run in (base, default):
        assert abs(run["total"] - ref["total"]) <= 1e-5 * abs(ref["total"])
        torch.testing.assert_close(torch.tensor(run["grad"]), torch.tensor(ref["grad"]), rtol=1e-5, atol=1e-7)


# Cases for every kernel build: full blocks read and written in place (float32, unit pixel stride) next to tails
# that go through the scratch, rows that do not merge (sliced views), channels_last, half types, C=150 (blocks
# of 48 pixels), logits whose exp under- and overflows.
ISA_CASES = {
    "f32-contiguous": dict(dtype=torch.float32, shape=(2, 21, 37, 53)),
    "f32-sliced-rows-of-48": dict(dtype=torch.float32, shape=(1, 19, 9, 48), layout="sliced"),
    "f32-channels_last": dict(dtype=torch.float32, shape=(2, 21, 13, 17), layout="channels_last"),
    "f32-C150": dict(dtype=torch.float32, shape=(1, 150, 16, 16)),
    "f32-extreme": dict(dtype=torch.float32, shape=(2, 21, 19, 32), extreme=True),
    "bf16-contiguous": dict(dtype=torch.bfloat16, shape=(2, 21, 37, 53)),
    "f16-sliced-rows-of-48": dict(dtype=torch.float16, shape=(1, 5, 9, 48), layout="sliced"),
}

_ISA_CHILD = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[2])
    from fastadvseg import _C_cpu
    import test_cpu_backend as T
    out = {"isa": _C_cpu.isa()}
    for name, kw in T.ISA_CASES.items():
        out[name] = T._run_all(*T._inputs(**kw))
    torch.save(out, sys.argv[1])
""")


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_every_kernel_build_matches_the_reference(isa, tmp_path):
    """Each build the CPU can run (FASTADVSEG_CPU_ISA caps the choice) against the reference backend on float64
    copies of the same inputs, with the dtype's tolerance of the shared suite."""
    env = dict(os.environ, FASTADVSEG_CPU_ISA=isa)
    env.pop("FASTADVSEG_BACKEND", None)
    path = tmp_path / "out.pt"
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", _ISA_CHILD, str(path), tests_dir], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    out = torch.load(path)
    if out["isa"] != isa:
        pytest.skip(f"this CPU does not run the {isa} build (got {out['isa']})")
    for name, kw in ISA_CASES.items():
        x, d, t = _inputs(**kw)
        x64 = x.detach().double().requires_grad_()
        expected = _run_all(x64, d, t, backend="reference")
        assert len(out[name]) == len(expected)
        for i, (a, e) in enumerate(zip(out[name], expected)):
            assert_close(a, e, kw["dtype"], f"{isa} {name} output {i}")


def test_learnt_class_weights_get_their_gradient():
    """The kernel writes no gradient for class weights: the shared autograd rule gives it (the reference formula)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn((2, 4, 3, 5), generator=g, requires_grad=True)
    t = torch.randint(0, 4, (2, 3, 5), generator=g)
    grads = []
    for backend in ("cpu", "reference"):
        w = torch.rand(4, generator=torch.Generator().manual_seed(6)).requires_grad_()
        fas.cross_entropy2d(x, t, weight=w, backend=backend).backward()
        grads.append(w.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_label_check_kernel_agrees_with_torch_ops():
    """The label check of the public functions runs as one cpu kernel pass: same count, same first bad label."""
    from fastadvseg.backends import cpu
    g = torch.Generator().manual_seed(11)
    big = torch.randint(0, 21, (2, 2 * 67 + 1, 93), generator=g)
    t = big[:, 1::2, 3:90]  # strided rows, a storage offset
    assert cpu.find_bad_labels(t, 21, 255) == tuple(_labels.find_bad_labels(t, 21, 255).tolist()) == (0, 0)
    t[0, 0, 5] = 255  # ignored: fine
    t[1, 40, 7] = -3
    t[1, 60, 2] = 21
    t[0, 50, 80] = 2 ** 40
    expected = (3, 2 ** 40)  # the first in pixel order (N, H, W)
    assert cpu.find_bad_labels(t, 21, 255) == tuple(_labels.find_bad_labels(t, 21, 255).tolist()) == expected
    x = torch.zeros((2, 21) + tuple(t.shape[1:]))
    with pytest.raises(ValueError, match=r"label 1099511627776 \(3 pixel"):
        fas.cross_entropy2d(x, t, backend="cpu")


# ---- the native boundary: tensors in, never addresses; what a kernel touches is checked first --------------------
def _ext():
    from fastadvseg import _C_cpu
    return _C_cpu


def _fused_args(x, **changes):
    """fused_loss's arguments for a sum of cross-entropy over x (N, C, H, W) and int64 labels, with changes."""
    n, c, h, w = x.shape
    args = dict(sizes=tuple(x.shape), logits=x, grad=torch.empty_like(x), grad_scale=1.0,
                target=torch.zeros((n, h, w), dtype=torch.int64), ignore_index=255, weight=None, d_logits=None,
                ignore_mask=None, keep_mode=0, threshold=0.0, adv_mode=0, loss_map=None, grad_d_logits=None,
                grad_d_logits_scale=1.0, maps_only=False, num_threads=1)
    args.update(changes)
    return args


def test_binding_takes_tensors_not_addresses():
    """An address is an int that keeps nothing alive: the binding refuses it for every tensor argument."""
    ext = _ext()
    x = torch.randn(1, 3, 2, 4)
    for name in ("logits", "grad", "target"):
        arg = _fused_args(x)
        arg[name] = arg[name].data_ptr()
        with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor, got int"):
            ext.fused_loss(**arg)
    with pytest.raises(TypeError, match="must be a torch.Tensor, got int"):
        ext.softmax_forward(x.data_ptr(), torch.empty_like(x), 1)
    with pytest.raises(TypeError, match="d_logits must be a torch.Tensor, got tuple"):
        ext.bce_maps([((1, 2, 4), None, 1.0, None, None, None, 1.0)], 1)


@pytest.mark.parametrize("change, error, pattern", [
    (lambda x, a: dict(target=a["target"].int()), TypeError, r"target must be int64, got torch.int32"),
    (lambda x, a: dict(target=a["target"][:, :1]), ValueError, r"target \(1, 1, 4\) does not match"),
    (lambda x, a: dict(weight=torch.ones(2)), ValueError, r"weight \(2,\) does not match the logits' class count"),
    (lambda x, a: dict(weight=torch.ones(3, dtype=torch.float64)), TypeError, r"weight must be float32"),
    (lambda x, a: dict(weight=torch.ones(6)[::2]), ValueError, r"weight must be contiguous"),
    (lambda x, a: dict(grad=torch.empty(1, 3, 2, 4, dtype=torch.float16)), TypeError, r"grad must have the dtype"),
    (lambda x, a: dict(grad=torch.empty(1, 3, 1, 4).expand(1, 3, 2, 4)), ValueError, r"grad \(an output\) must not overlap"),
    (lambda x, a: dict(grad=torch.empty(1, 3, 9).as_strided((1, 3, 2, 4), (27, 9, 2, 1))), ValueError,
     r"grad \(an output\) must not overlap"),
    (lambda x, a: dict(sizes=(1, 3, 2, 5)), ValueError, r"logits \(1, 3, 2, 4\) does not match the sizes"),
    (lambda x, a: dict(logits=x.double(), grad=None), TypeError, r"logits must be float32, float16 or bfloat16"),
    (lambda x, a: dict(target=None, d_logits=torch.zeros(1, 2, 4, dtype=torch.float16), keep_mode=1), TypeError,
     r"d_logits must be float32, got torch.float16"),
    (lambda x, a: dict(target=None, d_logits=torch.zeros(1, 2, 4), keep_mode=1,
                       ignore_mask=torch.zeros(1, 2, 4, dtype=torch.uint8)), TypeError, r"ignore_mask must be bool"),
    (lambda x, a: dict(loss_map=torch.empty(1, 4, 2).transpose(1, 2)), ValueError, r"loss_map must be contiguous"),
    (lambda x, a: dict(loss_map=torch.empty(1, 2, 3)), ValueError, r"loss_map \(1, 2, 3\) does not match"),
    (lambda x, a: dict(adv_mode=1), ValueError, r"d_logits missing"),
], ids=["int32-labels", "label-shape", "weight-length", "weight-dtype", "weight-strided", "grad-dtype",
        "grad-expanded", "grad-aliased", "sizes", "float64-logits", "map-dtype", "mask-dtype", "map-output-strided",
        "map-output-shape", "missing-map"])
def test_native_boundary_checks_what_the_kernel_touches(change, error, pattern):
    ext = _ext()
    x = torch.randn(1, 3, 2, 4)
    args = _fused_args(x)
    args.update(change(x, args))
    with pytest.raises(error, match=pattern):
        ext.fused_loss(**args)


def test_native_boundary_of_the_other_kernels():
    ext = _ext()
    x = torch.randn(1, 3, 2, 4)
    with pytest.raises(ValueError, match=r"grad_probs \(1, 3, 2, 3\) does not match probs"):
        ext.softmax_backward(x, x[..., :3], torch.empty_like(x), 1)
    with pytest.raises(TypeError, match=r"out must have the dtype of logits"):
        ext.softmax_forward(x, torch.empty_like(x, dtype=torch.bfloat16), 1)
    z = torch.randn(1, 2, 4)
    with pytest.raises(TypeError, match=r"target must be float32, got torch.bfloat16"):
        ext.bce_maps([(z, z.bfloat16(), 0.0, None, None, None, 1.0)], 1)
    with pytest.raises(ValueError, match=r"grad \(1, 2, 3\) does not match d_logits"):
        ext.bce_maps([(z, None, 0.0, None, None, torch.empty(1, 2, 3), 1.0)], 1)
    with pytest.raises(TypeError, match=r"target must be int64, got torch.int32"):
        ext.find_bad_labels(torch.zeros(1, 2, 4, dtype=torch.int32), 3, 255, 1)
    with pytest.raises(ValueError, match=r"target \(1, 2, 3\) does not match out's"):
        ext.one_hot(torch.zeros(1, 2, 3, dtype=torch.int64), torch.empty(1, 3, 2, 4), 255, 1, 1)
    with pytest.raises(ValueError, match=r"out must be contiguous"):
        ext.one_hot(torch.zeros(1, 2, 4, dtype=torch.int64), torch.empty(1, 2, 4, 3).permute(0, 3, 1, 2), 255, 1, 1)


def test_inline_temporaries_live_through_the_kernel():
    """The use-after-free this boundary was built against: half-precision BCE targets are converted to a float32
    temporary inline; the value must equal PyTorch's for every target form, and a second backward the first."""
    gen = torch.Generator().manual_seed(3)
    d = torch.randn(2, 1, 7, 12, generator=gen).to(torch.bfloat16).requires_grad_()
    for target in (torch.rand(2, 1, 7, 12, generator=gen).to(torch.bfloat16), torch.tensor(1.0, dtype=torch.float16),
                   torch.ones_like(d, requires_grad=False), torch.rand(2, 7, 12, generator=gen).half()):
        expected = torch.nn.functional.binary_cross_entropy_with_logits(
            d.detach().double(), target.double().reshape(target.shape).expand(2, 1, 7, 12)
            if target.dim() != 3 else target.double().unsqueeze(1))
        for _ in range(3):  # the freed memory is reused by the next allocations: repeat
            loss = fas.bce_with_logits2d(d, target, backend="cpu")
            assert_close(loss, expected, torch.bfloat16, f"target {target.dtype} {tuple(target.shape)}")
            g1, = torch.autograd.grad(loss, [d], retain_graph=True)
            g2, = torch.autograd.grad(loss, [d])
            assert torch.isfinite(g1).all() and torch.equal(g1, g2)
