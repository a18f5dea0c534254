"""Every op of the ``cpu`` backend, forward and backward, once per dtype and layout of each tensor it takes, at tiny
shapes, in one process: the workload that tests/test_memcheck.py runs under a memory checker (valgrind memcheck),
which reports any read or write of freed or unallocated memory by the kernels, e.g. a kernel handed the address of
a temporary copy that is freed before it runs.

Only the public API (``import fastadvseg as fas``), the registered ops (``torch.ops.fastadvseg.*``) and the cpu
backend's launches (``fastadvseg.backends.cpu``, for the fused upsampling: ``size=`` and ``align_corners``), never the
extension module itself, so that it keeps working when the binding changes. Each result is also compared with the
``reference`` backend, so a plain run (``python tests/memcheck_driver.py``, a few seconds) catches what a reused
dangling buffer does to the values; under the checker freed memory is not reused, and the checker's report is the
signal.

Options: ``--no-compare`` skips the reference runs (under the checker, where they only cost time);
``--expect-valgrind`` exits with 3 unless this very process runs under valgrind memcheck.
Exit status: 0 when every call ran and matched, 1 on a mismatch or an unexpected error (listed), 2 when the cpu
backend is not built. The last line of a complete run starts with ``DONE_MARKER``.
"""
from __future__ import annotations

import os
import sys
import traceback

import torch
import torch.nn.functional as F

import fastadvseg as fas

DONE_MARKER = "memcheck driver: done"
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
N, C, H, W = 2, 5, 7, 12  # W=12: vector loops of the kernels plus a scalar tail

_gen = torch.Generator().manual_seed(20261202)
_failures: list = []
_calls = [0]
_compare = [True]


def _randn(*shape, dtype=torch.float32, scale=2.0):
    return (torch.randn(shape, generator=_gen) * scale).to(dtype)


def _rand(*shape, dtype=torch.float32):
    return torch.rand(shape, generator=_gen).to(dtype)


def _labels(n=N, h=H, w=W, dtype=torch.int64, ignore=255):
    t = torch.randint(0, C, (n, h, w), generator=_gen)
    t[:, 0, :3] = ignore  # a few ignored pixels
    return t.to(dtype)


def _mask(n=N, h=H, w=W):
    m = torch.rand((n, h, w), generator=_gen) < 0.3
    m[0, 0, 0] = False
    return m


def _tol(*tensors):
    half = any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors if isinstance(t, torch.Tensor))
    return (3e-2, 3e-2) if half else (1e-4, 1e-5)


def _close(what, got, want, tol):
    if got is None and want is None:
        return
    rtol, atol = tol
    try:
        torch.testing.assert_close(got.detach().float(), want.detach().float(), rtol=rtol, atol=atol,
                                   equal_nan=True)
    except AssertionError as exc:
        _failures.append(f"{what}: cpu and reference differ: {str(exc).splitlines()[:4]}")


def _leaves(args):
    return [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


def _fresh(args):
    """The same inputs as new leaves (same values, strides and storage offset), for the reference run."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.requires_grad:
            b = torch.empty_strided(a.size(), a.stride(), dtype=a.dtype)
            b.copy_(a.detach())
            out.append(b.requires_grad_())
        else:
            out.append(a)
    return out


def _backward(outs):
    """Backward from the first output (a map gets a varied upstream gradient, a scalar 1)."""
    first = outs[0]
    seed = torch.linspace(-1.0, 1.0, first.numel()).reshape(first.shape).to(first.dtype) if first.dim() else None
    first.backward(seed)


def _tensors(out):
    return [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]


def check(what, fn, *args, **kwargs):
    """fn(*args, backend="cpu") and its backward, compared with the reference backend unless --no-compare; errors
    are recorded, not raised."""
    _calls[0] += 1
    try:
        ref_args = _fresh(args) if _compare[0] else None
        got = _tensors(fn(*args, backend="cpu", **kwargs))
        leaves = _leaves(args)
        if leaves:
            _backward(got)
        if not _compare[0]:
            _touch(got + [a.grad for a in leaves])
            return
        want = _tensors(fn(*ref_args, backend="reference", **kwargs))
        ref_leaves = _leaves(ref_args)
        if ref_leaves:
            _backward(want)
        tol = _tol(*args)
        for i, (g, r) in enumerate(zip(got, want)):
            _close(f"{what} output {i}", g, r, tol)
        for i, (a, b) in enumerate(zip(leaves, ref_leaves)):
            _close(f"{what} grad {i}", a.grad, b.grad, tol)
    except Exception:
        _failures.append(f"{what}: raised\n{traceback.format_exc()}")


def expect_error(what, fn, *args, **kwargs):
    """A call that must raise (e.g. a bad label): runs the error paths, which read the inputs too."""
    _calls[0] += 1
    try:
        fn(*args, **kwargs)
    except (ValueError, TypeError, IndexError, RuntimeError):
        return
    _failures.append(f"{what}: did not raise")


def _touch(out):
    """Read every output back (sums them)."""
    for t in (out if isinstance(out, (tuple, list)) else (out,)):
        if isinstance(t, torch.Tensor) and t.numel():
            float(t.detach().double().sum())


def op(what, fn, *args):
    """A direct call of a registered op; the outputs are read back."""
    _calls[0] += 1
    try:
        _touch(fn(*args))
    except Exception:
        _failures.append(f"{what}: raised\n{traceback.format_exc()}")


def _layouts(x):
    """(name, tensor) for a 4-D input: contiguous, channels_last, and a sliced view with a storage offset."""
    wide = torch.zeros((x.shape[0], x.shape[1] + 1, x.shape[2], x.shape[3] * 2 + 1), dtype=x.dtype)
    view = wide[:, 1:, :, 1::2]
    view.copy_(x)
    return (("contiguous", x.clone()), ("channels_last", x.contiguous(memory_format=torch.channels_last)),
            ("strided view", view))


def _map_view(m):
    """An (N, H, W) map as a non-contiguous view (a transposed copy's transpose)."""
    return m.transpose(1, 2).contiguous().transpose(1, 2)


def _cycle(values, i):
    return values[i % len(values)]


def run_public():
    """Each dtype of each tensor argument and each option at least once (not all their combinations: under the
    checker every call costs about a second)."""
    reductions = ("mean", "sum", "none")
    for i, dtype in enumerate(FLOATS):
        x0 = _randn(N, C, H, W, dtype=dtype)
        for j, (layout, x) in enumerate(_layouts(x0)):
            tag = f"{dtype} {layout}"
            check(f"softmax2d {tag}", fas.softmax2d, x.requires_grad_())
            ldtype = _cycle((torch.uint8, torch.int32, torch.int64), i + j)
            t = _labels(dtype=ldtype)
            check(f"cross_entropy2d {tag} labels {ldtype} {_cycle(reductions, j)}", fas.cross_entropy2d,
                  x.detach().requires_grad_(), t if j < 2 else _map_view(t), reduction=_cycle(reductions, i + j))
        x = x0.clone()
        t = _labels()
        for k, wdtype in enumerate(FLOATS + (torch.float64,)):
            wt = (_rand(C, dtype=wdtype) + 0.5).requires_grad_(k == i)  # a weight that needs its gradient too
            check(f"cross_entropy2d {dtype} weight {wdtype}", fas.cross_entropy2d, x.detach().requires_grad_(), t,
                  wt, label_smoothing=0.1 * (k % 2), reduction=_cycle(reductions, k))
        check(f"cross_entropy2d {dtype} no grad", fas.cross_entropy2d, x, t, reduction="none",
              label_smoothing=0.2)
        bad = t.clone()
        bad[1, 2, 3] = C + 3
        expect_error(f"cross_entropy2d {dtype} bad label", fas.cross_entropy2d, x.detach().requires_grad_(), bad,
                     backend="cpu")
        for k, ddtype in enumerate(FLOATS + (torch.float64,)):
            d = _randn(N, 1, H, W, dtype=ddtype)
            d3 = _map_view(d[:, 0])  # (N, H, W), non-contiguous
            check(f"semi_cross_entropy2d {dtype} d {ddtype} {_cycle(reductions, i + k)}", fas.semi_cross_entropy2d,
                  x.detach().requires_grad_(), d if k % 2 else d3, reduction=_cycle(reductions, i + k),
                  ignore_mask=_mask() if k % 2 else _mask()[:, None], return_ratio=True)
            check(f"generator_loss {dtype} d {ddtype} labelled", fas.generator_loss, x.detach().requires_grad_(),
                  (d3 if k % 2 else d).detach().requires_grad_(), _labels(dtype=_cycle((torch.uint8, torch.int32,
                  torch.int64), k)), lambda_adv=_cycle((0.01, 0.0), k))
            check(f"generator_loss {dtype} d {ddtype} unlabelled", fas.generator_loss, x.detach().requires_grad_(),
                  (d if k % 2 else d3).detach().requires_grad_(k != 3), None, lambda_adv=_cycle((0.01, 0.0), k),
                  lambda_semi=_cycle((0.1, 0.0, 0.1), k))
        check(f"semi_cross_entropy2d {dtype} no mask, no grad", fas.semi_cross_entropy2d, x, _randn(N, H, W),
              threshold=0.4)
        for k, teacher in enumerate((None, _randn(N, C, H, W, dtype=dtype), _map_view(_randn(N, C, H, W)))):
            # a teacher of its own dtype and layout (the op converts it), D's test and a mask on some calls
            check(f"pseudo_label_cross_entropy2d {dtype} teacher {k}", fas.pseudo_label_cross_entropy2d,
                  x.detach().requires_grad_(), teacher, confidence_threshold=_cycle((0.3, None, 0.0), k),
                  d_logits=_randn(N, 1, H, W) if k != 1 else None, ignore_mask=_mask() if k else None,
                  reduction=_cycle(reductions, i + k), return_ratio=True)
        bad = _labels()
        bad[0, 1, 2] = -7
        expect_error(f"generator_loss {dtype} bad label", fas.generator_loss, x.detach().requires_grad_(),
                     _randn(N, H, W), bad, lambda_adv=0.01, backend="cpu")

    for i, dtype in enumerate(FLOATS):
        d4 = _randn(N, 1, H, W, dtype=dtype)
        shapes = (("(N,1,H,W)", d4), ("(N,H,W)", d4[:, 0].clone()), ("(N,H,W) view", _map_view(d4[:, 0])))
        targets = [(f"{v}", lambda shape, v=v: v) for v in (0.0, 1.0, 0.3)]
        for tdtype in FLOATS + (torch.float64,):
            targets.append((f"map {tdtype}", lambda shape, tdtype=tdtype: _rand(*shape, dtype=tdtype)))
            targets.append((f"0-dim {tdtype}", lambda shape, tdtype=tdtype: torch.tensor(0.7, dtype=tdtype)))
        for k, (ttag, target) in enumerate(targets):
            shape_tag, d = _cycle(shapes, i + k)
            reduction = _cycle(reductions, k)
            check(f"bce_with_logits2d d {dtype} {shape_tag} target {ttag} {reduction}", fas.bce_with_logits2d,
                  d.detach().requires_grad_(), target(d.shape), reduction=reduction,
                  ignore_mask=_mask().reshape(d.shape) if k % 2 else None)
        d = d4[:, 0]
        check(f"bce_with_logits2d d {dtype} target map view, mask view", fas.bce_with_logits2d,
              _map_view(d).requires_grad_(), _map_view(_rand(N, H, W, dtype=torch.bfloat16)),
              ignore_mask=_map_view(_mask()))
        check(f"bce_with_logits2d d {dtype} target map requires grad", fas.bce_with_logits2d,
              d.detach().requires_grad_(), _rand(N, H, W, dtype=_cycle(FLOATS, i + 1)).requires_grad_())
        check(f"bce_with_logits2d d {dtype} no grad", fas.bce_with_logits2d, d.detach(),
              _rand(N, H, W, dtype=torch.float16), reduction="none")
        rdtype = _cycle(FLOATS, i + 1)
        check(f"discriminator_loss fake {dtype} real {rdtype}", fas.discriminator_loss,
              d4.detach().requires_grad_(), _randn(N + 1, H - 2, W + 3, dtype=rdtype).requires_grad_())
        check(f"discriminator_loss {dtype} masks, views", fas.discriminator_loss, _map_view(d).requires_grad_(),
              d4.detach().requires_grad_(), ignore_mask_fake=_map_view(_mask()), ignore_mask_real=_mask()[:, None])
        check(f"discriminator_loss {dtype} one side needs grad", fas.discriminator_loss, d4.detach(),
              d4.detach().clone().requires_grad_())

    odtypes = FLOATS + (torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool)
    for k, odtype in enumerate(odtypes):
        ldtype = _cycle((torch.uint8, torch.int32, torch.int64), k)
        t = _labels(dtype=ldtype)
        check(f"one_hot2d labels {ldtype} -> {odtype}", fas.one_hot2d, t if k % 2 else _map_view(t), C,
              dtype=odtype)
    bad = _labels()
    bad[1, 1, 1] = C
    expect_error("one_hot2d bad label", fas.one_hot2d, bad, C, backend="cpu")


def run_registered_ops():
    """The registered ops called directly, with the inputs the public functions hand them."""
    ops = torch.ops.fastadvseg
    x = _randn(N, C, H, W)
    t = _labels()
    for dtype in FLOATS:
        xd = x.to(dtype)
        p = ops.softmax2d(xd, "cpu")
        op(f"ops.softmax2d {dtype}", ops.softmax2d, xd, "cpu")
        for gdtype in FLOATS:
            op(f"ops.softmax2d_backward {dtype} grad {gdtype}", ops.softmax2d_backward, p, _randn(N, C, H, W,
                                                                                                 dtype=gdtype), "cpu")
        for wdtype in (None,) + FLOATS:
            wt = None if wdtype is None else _rand(C, dtype=wdtype) + 0.5
            for reduction in ("mean", "none"):
                op(f"ops.cross_entropy2d {dtype} weight {wdtype} {reduction}", ops.cross_entropy2d, xd, t, wt, 255,
                   0.0, reduction, True, True, "cpu")
        op(f"ops.cross_entropy2d {dtype} smoothing, sum, no grad", ops.cross_entropy2d, xd, t, None, 255, 0.1, "sum",
           False, False, "cpu")
        for ddtype in FLOATS:
            d = _randn(N, H, W, dtype=ddtype)
            for reduction in ("mean", "sum", "none"):
                op(f"ops.semi_cross_entropy2d {dtype} d {ddtype} {reduction}", ops.semi_cross_entropy2d, xd, d, 0.2,
                   _mask(), reduction, True, "cpu")
            for target in (t, None):
                for store_d in (True, False):
                    op(f"ops.generator_loss {dtype} d {ddtype} labelled={target is not None} store_d={store_d}",
                       ops.generator_loss, xd, d, target, 0.01, 0.1, 0.2, 255, True, store_d, True, "cpu")
    for ddtype in FLOATS:
        d = _randn(N, H, W, dtype=ddtype)
        for tdtype in (None,) + FLOATS:
            tmap = None if tdtype is None else _rand(N, H, W, dtype=tdtype)
            for reduction in ("mean", "sum", "none"):
                for mask in (None, _mask()):
                    op(f"ops.bce_with_logits2d d {ddtype} target {tdtype} {reduction} mask={mask is not None}",
                       ops.bce_with_logits2d, d, tmap, 1.0, mask, reduction, True, "cpu")
        for rdtype in FLOATS:
            real = _randn(N, H + 1, W - 1, dtype=rdtype)
            op(f"ops.discriminator_loss {ddtype} {rdtype}", ops.discriminator_loss, d, real, _mask(), None, True,
               True, "cpu")
    for odtype in (torch.float32, torch.bfloat16, torch.uint8, torch.int64):
        op(f"ops.one_hot2d -> {odtype}", ops.one_hot2d, t, C, 255, odtype, True, "cpu")


def _up(x, size, align_corners):
    """F.interpolate of a (N, C, h, w) or (N, h, w) tensor in float32: the reference of the fused upsampling."""
    three = x.dim() == 3
    y = F.interpolate((x[:, None] if three else x).float(), size=size, mode="bilinear", align_corners=align_corners)
    return y[:, 0] if three else y


def _grad_of(value, leaf):
    return torch.autograd.grad(value, leaf)[0]


def upsampled(what, fn):
    """fn() -> pairs (got, want) of the fused upsampling and its reference; errors are recorded, not raised."""
    _calls[0] += 1
    try:
        pairs = fn()
        if not _compare[0]:
            _touch([g for g, _ in pairs])
            return
        for i, (got, want) in enumerate(pairs):
            _close(f"{what} result {i}", got, want, _tol(got))
    except Exception:
        _failures.append(f"{what}: raised\n{traceback.format_exc()}")


def run_upsampling():
    """The cpu launches with size=(H, W): logits (N, C, h, w) and D maps at their own low resolutions, resized inside
    the kernels; each layout and dtype of the logits, both align_corners, masks and target maps at (H, W)."""
    from fastadvseg.backends import cpu, reference
    size, low, d_low = (H, W), (3, 5), (2, 3)
    for i, dtype in enumerate(FLOATS):
        x0 = _randn(N, C, *low, dtype=dtype)
        for j, (layout, x) in enumerate(_layouts(x0)):
            ac = bool((i + j) % 2)
            tag = f"{dtype} {layout} align_corners={ac}"
            xr = x.detach().float().requires_grad_()
            x_full = _up(xr, size, ac)

            def softmax(x=x, xr=xr, x_full=x_full, ac=ac):
                y = cpu.softmax2d(x, size=size, align_corners=ac)
                gy = _randn(N, C, H, W, dtype=dtype)
                gx = cpu.softmax2d_backward(y, gy, low_size=low, align_corners=ac)
                want = torch.softmax(x_full, 1)
                return [(y, want), (gx, torch.autograd.grad(want, xr, gy.float(), retain_graph=True)[0])]
            upsampled(f"softmax2d upsampled {tag}", softmax)

            t = _labels()
            def ce(x=x, xr=xr, x_full=x_full, ac=ac, t=t):
                out = cpu.cross_entropy2d(x, t, None, 255, 0.1 * j, "mean", True, size=size, align_corners=ac)
                loss = F.cross_entropy(x_full, t, ignore_index=255, label_smoothing=0.1 * j)
                return [(out.sums[0] / out.sums[1], loss), (out.grad, _grad_of(loss, xr))]
            upsampled(f"cross_entropy2d upsampled {tag}", ce)

            d = _randn(N, *d_low)
            d_view = _map_view(d) if j == 2 else d
            zr = d.detach().requires_grad_()
            z_full = _up(zr, size, ac)
            mask = _mask()

            def semi(x=x, xr=xr, x_full=x_full, ac=ac, d_view=d_view, z_full=z_full, mask=mask):
                out = cpu.semi_cross_entropy2d(x, d_view, 0.3, mask, "none", True, size=size, align_corners=ac)
                sums, loss_map = reference.semi_cross_entropy2d(x_full, z_full.detach(), 0.3, mask)
                return [(out.sums, sums.detach()), (out.loss_map, loss_map),
                        (out.grad, _grad_of(sums[0], xr))]
            upsampled(f"semi_cross_entropy2d upsampled {tag}", semi)

            teacher = _randn(N, C, 4, 3, dtype=dtype)  # at a resolution of its own

            def pseudo(x=x, xr=xr, x_full=x_full, ac=ac, d_view=d_view, z_full=z_full, mask=mask, teacher=teacher):
                out = cpu.pseudo_label_cross_entropy2d(x, teacher, d_view, 0.3, 0.3, mask, "none", True, size=size,
                                                       align_corners=ac)
                sums, loss_map = reference.pseudo_label_cross_entropy2d(x_full, _up(teacher.float(), size, ac),
                                                                        z_full.detach(), 0.3, 0.3, mask)
                return [(out.sums, sums.detach()), (out.loss_map, loss_map),
                        (out.grad / out.scales[0], _grad_of(sums[0], xr))]
            upsampled(f"pseudo_label_cross_entropy2d upsampled {tag}", pseudo)

            for target in (t, None):
                def gen(x=x, xr=xr, x_full=x_full, ac=ac, d_view=d_view, zr=zr, z_full=z_full, target=target):
                    out = cpu.generator_loss(x, d_view, target, 0.01, 0.1, 0.2, 255, True, True, size=size,
                                             align_corners=ac)
                    sums = reference.generator_loss(x_full, z_full, target, 0.2, 255)
                    return [(out.sums, sums.detach()),
                            (out.grad / out.scales[0], _grad_of(sums[0], xr)),
                            (out.grad_d / out.scales[1], _grad_of(sums[2], zr))]
                upsampled(f"generator_loss upsampled {tag} labelled={target is not None}", gen)

    for k, ac in enumerate((False, True)):
        d = _randn(N, 2, 3)
        zr = d.detach().requires_grad_()
        z_full = _up(zr, (H, W), ac)
        tmap = _rand(N, H, W) if k else None
        mask = _mask()

        def bce(d=d, zr=zr, z_full=z_full, tmap=tmap, mask=mask, ac=ac):
            out = cpu.bce_with_logits2d(_map_view(d), tmap, 0.3, mask, "none", True, size=(H, W), align_corners=ac)
            sums, loss_map = reference.bce_with_logits2d(z_full, tmap, 0.3, mask)
            return [(out.sums, sums.detach()), (out.loss_map, loss_map), (out.grad, _grad_of(sums[0], zr))]
        upsampled(f"bce_with_logits2d upsampled align_corners={ac} target map={tmap is not None}", bce)

        real = _randn(N + 1, 4, 2)
        rr = real.detach().requires_grad_()
        r_full = _up(rr, (H, W), ac)

        def disc(d=d, zr=zr, z_full=z_full, real=real, rr=rr, r_full=r_full, mask=mask, ac=ac):
            out = cpu.discriminator_loss(d, real, mask, None, True, True, size=(H, W), align_corners=ac)
            sums = reference.discriminator_loss(z_full, r_full, mask, None)
            return [(out.sums, sums.detach()), (out.grad_fake / out.scales[0], _grad_of(sums[0], zr)),
                    (out.grad_real / out.scales[1], _grad_of(sums[2], rr))]
        upsampled(f"discriminator_loss upsampled align_corners={ac}", disc)


def _under_valgrind() -> bool:
    """valgrind maps its preload library (vgpreload_memcheck-*.so) into the process it checks."""
    try:
        with open("/proc/self/maps") as f:
            return "vgpreload_memcheck" in f.read()
    except OSError:
        return False


def main(argv) -> int:
    _compare[0] = "--no-compare" not in argv
    if "--expect-valgrind" in argv and not _under_valgrind():
        print("memcheck driver: --expect-valgrind, but this process is not running under valgrind memcheck "
              "(was the interpreter a wrapper script?)", flush=True)
        return 3
    if "cpu" not in fas.available_backends():
        print(f"memcheck driver: the cpu backend is not available: {fas.unavailable_reason('cpu')}", flush=True)
        return 2
    torch.set_num_threads(int(os.environ.get("FASTADVSEG_MEMCHECK_THREADS", "2")))
    run_public()
    run_registered_ops()
    run_upsampling()
    for failure in _failures:
        print(f"memcheck driver: FAILED {failure}", flush=True)
    print(f"{DONE_MARKER}: {_calls[0]} calls, {len(_failures)} failed; fastadvseg from {fas.__file__}", flush=True)
    return 1 if _failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
