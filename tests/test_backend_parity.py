"""Same numbers on every backend: the keep rule of L_semi at its boundary, and counts beyond 2**24 pixels.

* Keep rule (fastadvseg/_keep.py): a pixel is kept where ``float32(z) > logit(float32(T))``, compared as real
  numbers -- ``sigmoid(z) > T`` decided exactly. Checked per pixel on every backend on CPU tensors (cpu, reference,
  triton under TRITON_INTERPRET=1, and cuda's per-pixel code emulated on the host: tests/cuda_emulation) for
  ``semi_cross_entropy2d`` and the unlabelled ``generator_loss``, with z
  at logit(T) rounded to float32 and its float32 neighbours, against the rule evaluated independently in 50-digit
  decimal arithmetic; plus the ends: T = 0 (every z kept but -inf and NaN, also z = -200 where a float32 sigmoid
  is 0), NaN, +-inf. (The other tests keep z 0.05 away from the boundary: tests/helpers.py make_d_logits.)
* Counts: every count a backend returns (kept, considered, counted labels, BCE counts) is the exact integer
  rounded once to float32 (the sums vector is float32), beyond 2**24 pixels. The shape is (1, 1, 1, 3 * 2**23 + 5)
  rather than the smallest one past 2**24: at 2**24 + 3 pixels every block but the last is full, its count a
  power of two, and a float32 sum of them is exact by accident; here the count patterns (every 257th pixel not
  kept, every 11th ignored) make a float32 sum of the per-program counts (in torch's order) miss the exact one,
  so the test fails if the triton backend sums its counts in float32 again. Triton runs with 2**20-pixel blocks
  (patched tile sizes; the kernels and their float64 reduction are unchanged): at the GPU's tiles (4096 pixels,
  C = 1) the interpreter needs ~2 minutes per op at this size. On CPU, torch's float32 reduction of the partials
  happens to be exact for the generator's 4-column buffer, so a float32 sum there alone would only fail on a GPU:
  the ``test_gpu_*`` tests run both checks on CUDA tensors (the triton and cuda backends at their own tiles),
  skipped without a GPU (scripts/gpu_check.sh runs them with the rest of the suite).
"""
from __future__ import annotations

import math
import struct
from decimal import Decimal, localcontext

import pytest
import torch

import fastadvseg as fas
from fastadvseg import _dispatch
from fastadvseg._keep import _logit64, keep_logit
from fastadvseg.backends import reference

from cuda_emulation.emulated_ext import load_emulated_backend
from helpers import BACKEND_CASES

CPU_BACKENDS = [b for b, d in BACKEND_CASES if d == "cpu"]
EMULATED = "cuda-emulated"
# the interpreter warns about the NaN and infinite z of the boundary tests
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:divide by zero encountered:RuntimeWarning")


def _use(backend: str, request, monkeypatch) -> str:
    """The backend= name to pass: for the emulated cuda backend, the dispatch table's "cuda" entry becomes
    fastadvseg/backends/cuda.py over the host emulation of its kernels, for this test only."""
    if backend != EMULATED:
        return backend
    module = load_emulated_backend(request.getfixturevalue("emulated_ext"), monkeypatch)
    monkeypatch.setattr(module, "supports_device", lambda d: True)
    monkeypatch.setitem(_dispatch._modules, "cuda", module)
    monkeypatch.setattr(_dispatch, "_resolved", {})
    return "cuda"
F32_MAX = 3.4028234663852886e38


def f32(v: float) -> float:
    return struct.unpack("<f", struct.pack("<f", v))[0]


def f32_next(v: float, up: bool) -> float:
    return torch.nextafter(torch.tensor(v, dtype=torch.float32),
                           torch.tensor(math.inf if up else -math.inf, dtype=torch.float32)).item()


def rule(z: float, threshold: float) -> bool:
    """sigmoid(z) > float32(T), decided in 50-digit decimal arithmetic, independently of fastadvseg."""
    t = Decimal(f32(threshold))
    if math.isnan(z) or z == -math.inf:
        return False
    if t >= 1:  # a T that rounds to 1 in float32
        return False
    if z == math.inf or t == 0:
        return True
    with localcontext() as ctx:
        ctx.prec = 50
        return Decimal(z) > (t / (1 - t)).ln()


def boundary_values(threshold: float) -> list:
    """z at logit(T) rounded to the nearest float32, its float32 neighbours, the rule's own constant and its
    neighbours, and the ends."""
    ends = [-math.inf, -F32_MAX, -200.0, -1e-45, 0.0, math.nan, math.inf]
    if f32(threshold) == 0:
        return ends
    nearest = f32(_logit64(f32(threshold)))
    values = {nearest, f32_next(nearest, False), f32_next(nearest, True), f32_next(f32_next(nearest, True), True)}
    low = keep_logit(threshold)
    values |= {low, f32_next(low, False), f32_next(low, True)}
    return sorted(values) + ends


THRESHOLDS = [0.0, 0.2, 0.5, 0.7, 0.9, 1e-6, 0.123456789, 0.3]


def test_thresholds_cover_both_roundings():
    """Among the thresholds tested, logit(T) rounds up to the nearest float32 for some and down for others (the
    rule's constant is the one below: nearest rounding would keep a z at the boundary that the rule does not)."""
    ups = [f32(_logit64(f32(t))) > _logit64(f32(t)) for t in THRESHOLDS if 0 < t < 1]
    assert any(ups) and not all(ups)


@pytest.mark.parametrize("threshold", THRESHOLDS + [0.999999999, 1 - 2 ** -26])
def test_keep_logit_is_the_rule(threshold):
    low = keep_logit(threshold)
    for z in boundary_values(threshold) if math.isfinite(low) else [-1.0, 0.0, 30.0, math.inf]:
        assert (z > low) == rule(z, threshold), (threshold, z, low)


def _inputs(threshold: float, device: str = "cpu"):
    values = boundary_values(threshold)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn((1, 3, 1, len(values)), generator=gen, dtype=torch.float32).to(device)
    d = torch.tensor(values, dtype=torch.float32).reshape(1, 1, len(values)).to(device)
    expected = torch.tensor([rule(z, threshold) for z in values])
    return x, d, expected


def _check_semi(threshold: float, backend: str, device: str = "cpu") -> None:
    x, d, expected = _inputs(threshold, device)
    loss_map = fas.semi_cross_entropy2d(x, d, threshold=threshold, reduction="none", backend=backend)
    kept = (loss_map[0, 0] != 0).cpu()  # -log p[argmax] > 0 at every kept pixel of these logits
    assert torch.equal(kept, expected), (backend, threshold, d.flatten().tolist(), kept.tolist(), expected.tolist())
    _, ratio = fas.semi_cross_entropy2d(x, d, threshold=threshold, return_ratio=True, backend=backend)
    assert round(ratio.item() * d.numel()) == int(expected.sum())


def _check_generator(threshold: float, backend: str, device: str = "cpu") -> None:
    x, d, expected = _inputs(threshold, device)
    x.requires_grad_(True)
    out = fas.generator_loss(x, d, None, lambda_adv=0.1, lambda_semi=1.0, threshold=threshold, backend=backend)
    (grad,) = torch.autograd.grad(out.semi, x)
    kept = (grad[0, :, 0].abs().sum(0) != 0).cpu()  # the L_semi gradient is nonzero exactly at kept pixels
    assert torch.equal(kept, expected), (backend, threshold, d.flatten().tolist(), kept.tolist(), expected.tolist())
    assert round(out.semi_ratio.item() * d.numel()) == int(expected.sum())


@pytest.mark.parametrize("backend", CPU_BACKENDS + [EMULATED])
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_semi_keep_rule_at_the_boundary(threshold, backend, request, monkeypatch):
    _check_semi(threshold, _use(backend, request, monkeypatch))


@pytest.mark.parametrize("backend", CPU_BACKENDS + [EMULATED])
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_unlabelled_generator_keep_rule_at_the_boundary(threshold, backend, request, monkeypatch):
    _check_generator(threshold, _use(backend, request, monkeypatch))


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "triton"] + [EMULATED])
def test_every_backend_computes_the_same_keep_constant(backend, request, monkeypatch):
    """For 300 random thresholds: z = keep_logit(T) is not kept and the float32 just above it is (the cpu and cuda
    kernels compute the constant in C++; reference and triton take it from fastadvseg/_keep.py, and triton, slow
    under the interpreter, is covered by the boundary tests above)."""
    backend = _use(backend, request, monkeypatch)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn((1, 2, 1, 2), generator=gen)
    for threshold in torch.rand(300, generator=gen, dtype=torch.float64).tolist():
        low = keep_logit(threshold)
        d = torch.tensor([[[low, f32_next(low, True)]]])
        loss_map = fas.semi_cross_entropy2d(x, d, threshold=threshold, reduction="none", backend=backend)
        assert (loss_map[0, 0] != 0).tolist() == [False, True], (threshold, low)


def _gpu(backend: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if backend not in fas.available_backends("cuda"):
        pytest.skip(f"backend {backend} unavailable on cuda: {fas.unavailable_reason(backend)}")


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_gpu_keep_rule_at_the_boundary(backend):
    """Both ops, every threshold, on CUDA tensors (skipped without a GPU)."""
    _gpu(backend)
    for threshold in THRESHOLDS:
        _check_semi(threshold, backend, "cuda")
        _check_generator(threshold, backend, "cuda")


# ------------------------------------------------------------------------------------- counts past 2**24 pixels

BIG_W = 3 * 2 ** 23 + 5


@pytest.fixture(scope="module")
def big():
    """(1, 1, 1, BIG_W) inputs: z kept except at every 257th pixel (T = 0.2), every 11th pixel ignored (mask,
    label), and the exact counts."""
    p = torch.arange(BIG_W)
    x = torch.zeros((1, 1, 1, BIG_W))
    z = torch.where(p % 257 == 0, -3.0, 1.0).reshape(1, 1, BIG_W)
    ignored = (p % 11 == 0).reshape(1, 1, BIG_W)
    target = torch.where(ignored, 255, 0)
    real_mask = (p % 257 == 0).reshape(1, 1, BIG_W)
    kept = z > 0
    exact = dict(kept=int((kept & ~ignored).sum()), considered=int((~ignored).sum()),
                 kept_all=int(kept.sum()), pixels=BIG_W, counted=int((~ignored).sum()),
                 real=int((~real_mask).sum()))
    assert all(v > 2 ** 24 for v in exact.values())
    return x, z, ignored, target, real_mask, exact


def _counts(backend: str, big, device: str = "cpu") -> dict:
    """The counts of every op's sums vector, from ``backend`` on ``device``."""
    x, z, ignored, target, real_mask = (t.to(device) for t in big[:-1])
    ops = torch.ops.fastadvseg
    if backend == "reference":
        semi, _ = reference.semi_cross_entropy2d(x, z, 0.2, ignored)
        gen_u = reference.generator_loss(x, z, None, 0.2, 255)
        gen_l = reference.generator_loss(x, z, target, 0.2, 255)
        ce, _ = reference.cross_entropy2d(x, target, None, 255)
        bce, _ = reference.bce_with_logits2d(z, None, 1.0, ignored)
        disc = reference.discriminator_loss(z, z, ignored, real_mask)
    else:
        semi = ops.semi_cross_entropy2d(x, z, 0.2, ignored, "sum", False, backend)[0]
        gen_u = ops.generator_loss(x, z, None, 0.1, 1.0, 0.2, 255, False, False, False, backend)[0]
        gen_l = ops.generator_loss(x, z, target, 0.1, 1.0, 0.2, 255, False, False, False, backend)[0]
        ce = ops.cross_entropy2d(x, target, None, 255, 0.0, "sum", False, False, backend)[0]
        bce = ops.bce_with_logits2d(z, None, 1.0, ignored, "sum", False, backend)[0]
        disc = ops.discriminator_loss(z, z, ignored, real_mask, False, False, backend)[0]
    return {
        "semi kept": (semi[1], "kept"), "semi considered": (semi[2], "considered"),
        "generator term count": (gen_u[1], "kept_all"), "generator adv count": (gen_u[3], "pixels"),
        "generator kept": (gen_u[4], "kept_all"), "generator considered": (gen_u[5], "pixels"),
        "labelled generator ce count": (gen_l[1], "counted"), "labelled generator adv count": (gen_l[3], "counted"),
        "cross_entropy2d weight sum": (ce[1], "counted"), "bce count": (bce[1], "counted"),
        "discriminator fake count": (disc[1], "counted"), "discriminator real count": (disc[3], "real"),
    }


@pytest.mark.parametrize("backend", CPU_BACKENDS + [EMULATED])
def test_counts_are_exact_beyond_2_to_the_24_pixels(backend, big, request, monkeypatch):
    backend = _use(backend, request, monkeypatch)
    if backend == "triton":
        from fastadvseg.kernels.triton import common
        monkeypatch.setattr(common, "TILE_ELEMS", 2 ** 20)  # 25 programs (see the module's docstring)
        monkeypatch.setattr(common, "MAP_BLOCK", 2 ** 20)
    _check_counts(backend, big)


def _check_counts(backend: str, big, device: str = "cpu") -> None:
    exact = big[-1]
    got = {name: (value.item(), torch.tensor(exact[key], dtype=torch.float64).float().item(), exact[key])
           for name, (value, key) in _counts(backend, big, device).items()}
    wrong = {name: v for name, v in got.items() if v[0] != v[1]}
    assert not wrong, f"{backend} on {device}: (got, float32 of the exact count, exact count): {wrong}"


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_gpu_counts_are_exact_beyond_2_to_the_24_pixels(backend, big):
    """The same on CUDA tensors, at the GPU's own tiles and reductions (skipped without a GPU)."""
    _gpu(backend)
    _check_counts(backend, big, "cuda")


@pytest.mark.parametrize("threshold", [0.0, 0.2, 0.5, 0.9999999])
def test_compiled_reference_keeps_the_same_pixels(threshold):
    """Traced by torch.compile (dynamic=True: T may be symbolic) the reference writes the keep rule in torch ops;
    it must keep exactly what the eager rule keeps, at the boundary too."""
    from fastadvseg import _keep
    bound = _keep.keep_logit(threshold)
    near = [bound, math.nextafter(bound, math.inf), math.nextafter(bound, -math.inf)] if math.isfinite(bound) else []
    z = torch.tensor(near + [0.0, -3.4e38, 3.4e38, -math.inf, math.inf, math.nan], dtype=torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(_keep.keep_mask, dynamic=True, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(z, threshold), _keep.keep_mask(z, threshold))
    assert torch.equal(_keep.keep_mask(z, threshold), z > bound)
