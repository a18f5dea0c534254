"""The fused bilinear upsampling of the public API, on every backend here (cpu, reference, triton under
TRITON_INTERPRET=1; cuda and triton on a GPU).

With ``size=(H, W)`` every op over logits or discriminator maps reads inputs at another resolution as
``F.interpolate(x.float(), size, mode="bilinear", align_corners=a)``: each result is compared with that
interpolation followed by the same op on the reference backend in float64 (values, loss maps, counts), and each
gradient with autograd through that composition (the float64 interpolation's adjoint), on fresh random inputs:
factors that are not integers, downsampling, an input already at ``size``, logits and D maps at different low
resolutions, layouts, half dtypes, every reduction and option. Also: double backward and ``torch.func.grad``,
``torch.compile(fullgraph=True)``, determinism, ``torch.library.opcheck`` of the ops' new arguments, the
``fastadvseg.nn`` modules, and the errors.
"""
import pytest
import torch
import torch.nn.functional as F

import fastadvseg as fas
import fastadvseg.nn as fnn
from fastadvseg import _ops
from helpers import BACKEND_CASES, KERNEL_CASES, assert_close, ids, layout_3d, layout_4d

OPS = torch.ops.fastadvseg
IGNORE = 255


def _grid(backend):
    """(logits' (h, w), D's (h, w), size): factors that are not integers (5x7 -> 17x23 where the interpreter is
    not in the way), D at a lower resolution than the logits."""
    if backend == "triton":
        return (3, 4), (2, 2), (7, 9)
    return (5, 7), (3, 4), (17, 23)


def _logits(shape, dtype, layout, device, gen):
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2.0
    return layout_4d(x.to(dtype).to(device), layout).requires_grad_()


def _dmap(n_h_w, dtype, device, gen, layout="contiguous", grad=True):
    z = (torch.randn(n_h_w, generator=gen, dtype=torch.float64) * 2.0).to(dtype).to(device)
    return layout_3d(z, layout).requires_grad_(grad)


def _labels(n_h_w, c, device, gen, ignore_index=IGNORE):
    t = torch.randint(0, c, n_h_w, generator=gen)
    t[torch.rand(n_h_w, generator=gen) < 0.2] = ignore_index
    return t.to(device)


def _mask(n_h_w, device, gen):
    return (torch.rand(n_h_w, generator=gen) < 0.3).to(device)


def upsampled64(t, size, align_corners):
    """A float64 input as the kernels read it: the values of ``F.interpolate(t.float(), size)`` (float32
    interpolation; what L_semi's keep rule and argmax decide on), the gradient of the float64 interpolation."""
    x = t if t.dim() == 4 else t.unsqueeze(1)
    exact = F.interpolate(x, size, mode="bilinear", align_corners=align_corners)
    in_float32 = F.interpolate(x.detach().float(), size, mode="bilinear", align_corners=align_corners).double()
    out = exact + (in_float32 - exact).detach()
    return out if t.dim() == 4 else out.squeeze(1)


def _as64(v):
    if not isinstance(v, torch.Tensor):
        return v
    if v.is_floating_point():
        return v.detach().double().cpu().requires_grad_(v.requires_grad)
    return v.cpu()


def check(fn, low, full, size, align_corners, backend, dtype, gen, slack=1.0):
    """``fn(inputs, **kw)`` (a list of outputs) on ``backend`` with ``size`` against the same on the reference
    backend in float64, its ``low`` inputs upsampled first: every output, and the gradient of a random weighting
    of the differentiable outputs w.r.t. every ``low`` input that requires grad (shape and dtype of that input)."""
    ours = fn({**low, **full}, backend=backend, size=size, align_corners=align_corners)
    low64 = {k: _as64(v) for k, v in low.items()}
    theirs = fn({**{k: upsampled64(v, size, align_corners) for k, v in low64.items()},
                 **{k: _as64(v) for k, v in full.items()}}, backend="reference")
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape, f"output {i}: shape {tuple(a.shape)}, expected {tuple(b.shape)}"
        assert_close(a, b, dtype, f"output {i}")
    leaves = [k for k, v in low.items() if v.requires_grad]
    pairs = [(a, b) for a, b in zip(ours, theirs) if a.requires_grad]
    if not leaves or not pairs:
        return ours
    weights = [torch.rand(a.shape, generator=gen, dtype=torch.float64) * 2 - 0.5 for a, _ in pairs]
    got = torch.autograd.grad(sum((a.double() * w.to(a.device)).sum() for (a, _), w in zip(pairs, weights)),
                              [low[k] for k in leaves], allow_unused=True)
    want = torch.autograd.grad(sum((b * w).sum() for (_, b), w in zip(pairs, weights)),
                               [low64[k] for k in leaves], allow_unused=True)
    for k, a, b in zip(leaves, got, want):
        assert a is not None, f"no gradient for {k}"
        assert a.shape == low[k].shape and a.dtype == low[k].dtype, f"gradient of {k}: {a.shape}, {a.dtype}"
        assert_close(a, b, dtype, f"gradient of {k}", slack)
    return ours


# ------------------------------------------------------------------------------------------------------ the ops

# (dtype, layout of the logits, align_corners): every dtype, every layout, both align_corners
VARIANTS = [(torch.float32, "contiguous", False), (torch.float32, "channels_last", True),
            (torch.float16, "sliced", False), (torch.bfloat16, "channels_last", True),
            (torch.float32, "sliced", True), (torch.float16, "contiguous", True)]


def _variant_id(v):
    return f"{str(v[0]).replace('torch.', '')}-{v[1]}-align_corners_{v[2]}"


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
@pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)
def test_softmax2d(case, variant, gen):
    backend, device = case
    dtype, layout, ac = variant
    low, _, size = _grid(backend)
    x = _logits((2, 3, *low), dtype, layout, device, gen)
    (p,) = check(lambda a, **kw: [fas.softmax2d(a["x"], **kw)], {"x": x}, {}, size, ac, backend, dtype, gen)
    assert p.dtype == dtype and p.shape == (2, 3, *size)
    if layout == "channels_last":
        assert p.is_contiguous(memory_format=torch.channels_last), "softmax2d lost channels_last"


# (reduction, class weights, label_smoothing, ignore_index)
CE_OPTIONS = [("mean", False, 0.0, IGNORE), ("sum", True, 0.0, IGNORE), ("none", False, 0.1, -100),
              ("mean", True, 0.2, 1), ("none", True, 0.0, IGNORE), ("mean", False, 0.1, IGNORE)]


@pytest.mark.parametrize("options", range(len(CE_OPTIONS)), ids=lambda i: "-".join(map(str, CE_OPTIONS[i])))
@pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)
def test_cross_entropy2d(case, options, gen):
    backend, device = case
    reduction, weighted, smoothing, ignore_index = CE_OPTIONS[options]
    dtype, layout, ac = VARIANTS[options % len(VARIANTS)]
    low, _, size = _grid(backend)
    c = 4
    x = _logits((2, c, *low), dtype, layout, device, gen)
    t = _labels((2, *size), c, device, gen, ignore_index)
    w = (torch.rand(c, generator=gen) + 0.5).to(device) if weighted else None

    def ce(a, **kw):
        return [fas.cross_entropy2d(a["x"], a["t"], a["w"], ignore_index=ignore_index, reduction=reduction,
                                    label_smoothing=smoothing, **kw)]
    (loss,) = check(ce, {"x": x}, {"t": t, "w": w}, size, ac, backend, dtype, gen)
    assert loss.dtype == torch.float32 and loss.shape == ((2, *size) if reduction == "none" else ())


# (reduction, D map form, target: "float", "0d" or "map", ignore mask, align_corners)
BCE_OPTIONS = [("mean", "3d", "float", False, False), ("sum", "4d", "map", True, True),
               ("none", "3d", "map", True, False), ("none", "4d", "float", False, True),
               ("mean", "4d", "0d", True, True)]


@pytest.mark.parametrize("options", range(len(BCE_OPTIONS)), ids=lambda i: "-".join(map(str, BCE_OPTIONS[i])))
@pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)
def test_bce_with_logits2d(case, options, gen):
    backend, device = case
    reduction, form, target_kind, masked, ac = BCE_OPTIONS[options]
    dtype = (torch.float32, torch.bfloat16, torch.float16)[options % 3]
    _, low_d, size = _grid(backend)
    d = _dmap((2, *low_d), dtype, device, gen, layout="sliced" if options % 2 else "contiguous", grad=False)
    d = (d.unsqueeze(1) if form == "4d" else d).detach().requires_grad_()
    target = {"float": 0.7, "0d": torch.tensor(0.3, device=device),
              "map": torch.rand((2, *size), generator=gen).to(device)}[target_kind]
    mask = _mask((2, *size), device, gen) if masked else None

    def bce(a, **kw):
        return [fas.bce_with_logits2d(a["d"], a["target"], ignore_mask=a["mask"], reduction=reduction, **kw)]
    (loss,) = check(bce, {"d": d}, {"target": target, "mask": mask}, size, ac, backend, dtype, gen)
    if reduction == "none":
        assert loss.shape == ((2, 1, *size) if form == "4d" else (2, *size))


# (reduction, threshold, ignore mask, return_ratio)
SEMI_OPTIONS = [("mean", 0.2, False, True), ("sum", 0.0, True, False), ("none", 0.7, True, True),
                ("mean", 0.5, True, True)]


@pytest.mark.parametrize("options", range(len(SEMI_OPTIONS)), ids=lambda i: "-".join(map(str, SEMI_OPTIONS[i])))
@pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)
def test_semi_cross_entropy2d_with_d_at_its_own_resolution(case, options, gen):
    """Logits and D's output each at its own low resolution; the keep mask is sigmoid(upsampled d) > T."""
    backend, device = case
    reduction, threshold, masked, ratio = SEMI_OPTIONS[options]
    dtype, layout, ac = VARIANTS[(options + 1) % len(VARIANTS)]
    low, low_d, size = _grid(backend)
    x = _logits((2, 3, *low), dtype, layout, device, gen)
    d = _dmap((2, *low_d), torch.float32, device, gen, grad=False)
    mask = _mask((2, *size), device, gen) if masked else None

    def semi(a, **kw):
        out = fas.semi_cross_entropy2d(a["x"], a["d"], threshold=threshold, ignore_mask=a["mask"],
                                       reduction=reduction, return_ratio=ratio, **kw)
        return list(out) if ratio else [out]
    outs = check(semi, {"x": x, "d": d}, {"mask": mask}, size, ac, backend, dtype, gen)
    if ratio:
        assert not outs[1].requires_grad


@pytest.mark.parametrize("labelled", [True, False], ids=["labelled", "unlabelled"])
@pytest.mark.parametrize("variant", VARIANTS[:4], ids=_variant_id)
@pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)
def test_generator_loss_with_logits_and_d_at_different_resolutions(case, variant, labelled, gen):
    """Logits at 1/2-ish, D at 1/4-ish of the labels (1/8 and 1/32 in the paper's nets): both gradients."""
    backend, device = case
    dtype, layout, ac = variant
    low, low_d, size = _grid(backend)
    x = _logits((2, 3, *low), dtype, layout, device, gen)
    d = _dmap((2, *low_d), dtype, device, gen, layout="sliced" if labelled else "contiguous", grad=False)
    d = (d.unsqueeze(1) if ac else d).detach().requires_grad_()  # both D map forms
    t = _labels((2, *size), 3, device, gen) if labelled else None

    def gen_loss(a, **kw):
        return list(fas.generator_loss(a["x"], a["d"], a["t"], lambda_adv=0.3, lambda_semi=0.7, threshold=0.3, **kw))
    out = check(gen_loss, {"x": x, "d": d}, {"t": t}, size, ac, backend, dtype, gen)
    assert not out[4].requires_grad


@pytest.mark.parametrize("ac", [False, True], ids=["align_corners_false", "align_corners_true"])
@pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)
def test_discriminator_loss_with_maps_at_different_resolutions(case, ac, gen):
    """Fake and real maps of different batches and low resolutions, both upsampled; masks at size."""
    backend, device = case
    low, low_d, size = _grid(backend)
    fake = _dmap((2, *low_d), torch.float32, device, gen, layout="sliced")
    real = _dmap((1, *low), torch.bfloat16 if ac else torch.float32, device, gen).detach().unsqueeze(1)
    real.requires_grad_()
    masks = {"mf": _mask((2, *size), device, gen), "mr": _mask((1, 1, *size), device, gen) if ac else None}

    def disc(a, **kw):
        return [fas.discriminator_loss(a["fake"], a["real"], ignore_mask_fake=a["mf"], ignore_mask_real=a["mr"],
                                       **kw)]
    check(disc, {"fake": fake, "real": real}, masks, size, ac, backend, real.dtype, gen)


@pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)
def test_downsampling_and_mixed_directions(case, gen):
    """A size smaller than the input (PyTorch allows it; the same formulas), and one axis up, the other down."""
    backend, device = case
    for low, size in (((7, 9), (4, 5)), ((3, 9), (7, 4))):
        x = _logits((2, 3, *low), torch.float32, "contiguous", device, gen)
        d = _dmap((2, 2, 3), torch.float32, device, gen)
        t = _labels((2, *size), 3, device, gen)
        check(lambda a, **kw: [fas.cross_entropy2d(a["x"], a["t"], **kw)], {"x": x}, {"t": t}, size, False,
              backend, torch.float32, gen)
        check(lambda a, **kw: list(fas.generator_loss(a["x"], a["d"], None, lambda_adv=0.5, **kw)),
              {"x": x, "d": d}, {}, size, True, backend, torch.float32, gen)


# ----------------------------------------------------------------------------- an input already at size: the plain op

def _all_ops(x, d, t, mask, backend, **kw):
    """Every op's outputs on the same inputs (logits x and D map d at the labels' size)."""
    return [fas.softmax2d(x, backend=backend, **kw),
            fas.cross_entropy2d(x, t, label_smoothing=0.1, backend=backend, **kw),
            fas.cross_entropy2d(x, t, reduction="none", backend=backend, **kw),
            fas.bce_with_logits2d(d, 1.0, ignore_mask=mask, backend=backend, **kw),
            fas.semi_cross_entropy2d(x, d, ignore_mask=mask, reduction="none", backend=backend, **kw),
            *fas.generator_loss(x, d, t, lambda_adv=0.1, backend=backend, **kw)[:3],
            *fas.generator_loss(x, d, None, lambda_adv=0.1, backend=backend, **kw)[:4],
            fas.discriminator_loss(d, d * 2, ignore_mask_real=mask, backend=backend, **kw)]


@pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)
def test_size_equal_to_the_input_is_the_plain_op_bit_for_bit(case, gen):
    backend, device = case
    shape = (2, 3, 4, 5)
    x = _logits(shape, torch.float32, "channels_last", device, gen)
    d = _dmap((2, 4, 5), torch.float32, device, gen)
    t = _labels((2, 4, 5), 3, device, gen)
    mask = _mask((2, 4, 5), device, gen)
    plain = _all_ops(x, d, t, mask, backend)
    for size in ((4, 5), [4, 5], t.shape[-2:]):
        for ac in (False, True):
            same = _all_ops(x, d, t, mask, backend, size=size, align_corners=ac)
            for i, (a, b) in enumerate(zip(plain, same)):
                assert torch.equal(a, b), f"output {i} with size={size!r}, align_corners={ac}"
                if not a.requires_grad:  # a term the batch does not have (the unlabelled batch's ce)
                    continue
                ga = torch.autograd.grad(a.sum(), [x, d], allow_unused=True, retain_graph=True)
                gb = torch.autograd.grad(b.sum(), [x, d], allow_unused=True, retain_graph=True)
                for u, v in zip(ga, gb):
                    assert (u is None) == (v is None) and (u is None or torch.equal(u, v)), f"gradient of {i}"


@pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)
def test_empty_batch_with_size(case, gen):
    backend, device = case
    x = torch.zeros((0, 3, 2, 3), device=device, requires_grad=True)
    t = torch.zeros((0, 5, 7), dtype=torch.long, device=device)
    d = torch.zeros((0, 2, 2), device=device, requires_grad=True)
    kw = dict(size=(5, 7), backend=backend)
    assert fas.softmax2d(x, **kw).shape == (0, 3, 5, 7)
    assert fas.cross_entropy2d(x, t, reduction="none", **kw).shape == (0, 5, 7)
    assert fas.bce_with_logits2d(d.unsqueeze(1), 1.0, reduction="none", **kw).shape == (0, 1, 5, 7)
    assert fas.semi_cross_entropy2d(x, d, reduction="none", **kw).shape == (0, 5, 7)
    total = fas.cross_entropy2d(x, t, **kw) + fas.generator_loss(x, d, t, lambda_adv=0.1, **kw).total \
        + fas.discriminator_loss(d, d, **kw)
    assert total.item() == 0.0
    gx, gd = torch.autograd.grad(total, [x, d])
    assert gx.shape == x.shape and not gx.any() and gd.shape == d.shape


# ---------------------------------------------------------------------------------- the autograd rule, transforms

@pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)
def test_double_backward_and_func_grad(case, gen):
    """create_graph=True and torch.func.grad through the upsampling ops: first and second order against the
    float64 composition."""
    backend, device = case
    low, low_d, size = _grid(backend)
    x = _logits((2, 3, *low), torch.float32, "channels_last", device, gen)
    d = _dmap((2, *low_d), torch.float32, device, gen)
    t = _labels((2, *size), 3, device, gen)
    v = torch.rand((2, *size), generator=gen, dtype=torch.float64)
    kw = dict(size=size, align_corners=True)

    def objective(x, d, b, **kw):
        return (fas.cross_entropy2d(x, t.to(x.device), label_smoothing=0.1, backend=b, **kw)
                + (fas.softmax2d(x, backend=b, **kw)[:, 1] * v.to(x.device, x.dtype)).sum()
                + (fas.cross_entropy2d(x, t.to(x.device), reduction="none", backend=b, **kw)
                   * v.to(x.device, x.dtype)).sum()
                + fas.generator_loss(x, d, None, lambda_adv=0.5, backend=b, **kw).total
                + fas.discriminator_loss(d, d * 3, backend=b, **kw))

    x64, d64 = _as64(x), _as64(d)
    want = torch.autograd.grad(objective(upsampled64(x64, size, True), upsampled64(d64, size, True), "reference"),
                               [x64, d64], create_graph=True)
    got = torch.autograd.grad(objective(x, d, backend, **kw), [x, d], create_graph=True)
    for a, b, what in zip(got, want, ("logits", "d")):
        assert_close(a, b, torch.float32, f"first order, {what}")
    u = [torch.rand(a.shape, generator=gen, dtype=torch.float64) for a in got]
    second = torch.autograd.grad(sum((a.double() * w.to(a.device)).sum() for a, w in zip(got, u)), [x, d])
    second64 = torch.autograd.grad(sum((a * w).sum() for a, w in zip(want, u)), [x64, d64])
    for a, b, what in zip(second, second64, ("logits", "d")):
        assert_close(a, b, torch.float32, f"second order, {what}", slack=5.0)

    func = torch.func.grad(lambda x, d: objective(x, d, backend, **kw), argnums=(0, 1))(x.detach(), d.detach())
    for a, b, what in zip(func, want, ("logits", "d")):
        assert_close(a, b, torch.float32, f"torch.func.grad, {what}")


@pytest.mark.parametrize("case", KERNEL_CASES, ids=ids)
def test_per_pixel_map_of_upsampled_logits_takes_the_reference_gradient(case, gen, monkeypatch):
    """reduction="none" of upsampled logits: the kernel is not asked to store a gradient it could not scale pixel
    by pixel, and the gradient (also for a second backward) is the float64 composition's."""
    backend, device = case
    low, _, size = _grid(backend)
    x = _logits((2, 3, *low), torch.float32, "contiguous", device, gen)
    t = _labels((2, *size), 3, device, gen)
    asked = []
    real = _ops.cross_entropy2d

    def spy(*args):
        asked.append(args[6])
        return real(*args)
    monkeypatch.setattr(_ops, "cross_entropy2d", spy)
    loss = fas.cross_entropy2d(x, t, reduction="none", size=size, backend=backend)
    assert asked == [False]
    v = torch.rand(loss.shape, generator=gen).to(device)
    first = torch.autograd.grad((loss * v).sum(), x, retain_graph=True)[0]
    again = torch.autograd.grad((loss * v).sum(), x)[0]
    assert torch.equal(first, again)
    x64 = _as64(x)
    want = torch.autograd.grad((F.cross_entropy(upsampled64(x64, size, False), t.cpu(), ignore_index=IGNORE,
                                                reduction="none") * v.double().cpu()).sum(), x64)[0]
    assert_close(first, want, torch.float32, "gradient")


@pytest.mark.parametrize("case", [c for c in KERNEL_CASES if c[0] == "cpu"], ids=ids)
def test_compiled_fullgraph_with_size(case, gen):
    """torch.compile(fullgraph=True), static and dynamic shapes (size from target.shape: symbolic ints), against
    eager: values and gradients."""
    backend, device = case

    def losses(x, d, t):
        size = t.shape[-2:]
        p = fas.softmax2d(x, size=size, align_corners=True, backend=backend)
        out = fas.generator_loss(x, d, t, lambda_adv=0.01, size=size, align_corners=True, backend=backend)
        unl = fas.generator_loss(x, d, None, lambda_adv=0.01, size=size, align_corners=True, backend=backend)
        ce = fas.cross_entropy2d(x, t, reduction="none", size=size, backend=backend)
        return out.total + unl.total + (p[:, 0] * ce).mean() + fas.discriminator_loss(d, d * 2, size=size,
                                                                                       backend=backend)

    for dynamic in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(losses, fullgraph=True, dynamic=dynamic)
        for low, size in (((5, 7), (17, 23)), ((4, 6), (11, 13))):
            x = _logits((2, 3, *low), torch.float32, "contiguous", device, gen)
            d = _dmap((2, 3, 4), torch.float32, device, gen)
            t = _labels((2, *size), 3, device, gen)
            got, want = compiled(x, d, t), losses(x, d, t)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            for a, b in zip(torch.autograd.grad(got, [x, d]), torch.autograd.grad(want, [x, d])):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("case", KERNEL_CASES, ids=ids)
def test_deterministic_gradients(case, gen):
    """Under torch.use_deterministic_algorithms(True) every upsampling loss runs on the kernel backend (no
    nondeterministic op refuses), and two runs give bit-identical values and gradients."""
    backend, device = case
    low, low_d, size = _grid(backend)
    x = _logits((2, 3, *low), torch.float32, "contiguous", device, gen)
    d = _dmap((2, *low_d), torch.float32, device, gen)
    t = _labels((2, *size), 3, device, gen)
    v = torch.rand((2, *size), generator=gen).to(device)
    kw = dict(size=size, align_corners=False, backend=backend)
    losses = [lambda: fas.softmax2d(x, **kw)[:, 0].mul(v).sum(),
              lambda: fas.cross_entropy2d(x, t, **kw),
              lambda: fas.cross_entropy2d(x, t, reduction="none", **kw).mul(v).sum(),
              lambda: fas.semi_cross_entropy2d(x, d, **kw),
              lambda: fas.bce_with_logits2d(d, 0.4, **kw),
              lambda: fas.bce_with_logits2d(d, 1.0, reduction="none", **kw).mul(v).sum(),
              lambda: fas.generator_loss(x, d, t, lambda_adv=0.1, **kw).total,
              lambda: fas.generator_loss(x, d, None, lambda_adv=0.1, **kw).total,
              lambda: fas.discriminator_loss(d, d * 2, **kw)]
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for k, loss in enumerate(losses):
            runs = []
            for _ in range(2):
                value = loss()
                runs.append([value.detach().clone()] + [g for g in torch.autograd.grad(value, [x, d],
                                                                                       allow_unused=True)])
            for a, b in zip(*runs):
                assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), f"loss {k} differs"
    finally:
        torch.use_deterministic_algorithms(was)


@pytest.mark.parametrize("case", KERNEL_CASES, ids=ids)
def test_opcheck_with_size(case, gen):
    """Schema, fake tensors (outputs at size, gradient buffers at the inputs' low resolution), autograd
    registration and AOT dispatch with dynamic shapes of every op called with size and align_corners."""
    backend, device = case
    x = _logits((2, 3, 3, 4), torch.float32, "contiguous", device, gen)
    xc = _logits((2, 3, 3, 4), torch.bfloat16, "channels_last", device, gen)
    d = _dmap((2, 2, 3), torch.float32, device, gen)
    size = [5, 7]
    t = _labels((2, *size), 3, device, gen)
    mask = _mask((2, *size), device, gen)
    p = torch.softmax(torch.randn((2, 3, *size), generator=gen), 1).to(device)
    samples = {
        "softmax2d": [(x, backend, size, False), (xc, backend, size, True)],
        "softmax2d_backward": [(p, torch.randn(p.shape, generator=gen).to(device), backend, [3, 4], True)],
        "cross_entropy2d": [(x, t, None, IGNORE, 0.0, "mean", True, True, backend, size, True),
                            (xc, t, torch.rand(3).to(device), IGNORE, 0.1, "none", False, True, backend, size,
                             False)],
        "bce_with_logits2d": [(d, None, 1.0, mask, "mean", True, backend, size, False),
                              (d, torch.rand((2, *size)).to(device), 0.0, None, "none", False, backend, size, True)],
        "semi_cross_entropy2d": [(x, d.detach(), 0.2, mask, "sum", True, backend, size, True),
                                 (xc, d.detach(), 0.2, None, "none", False, backend, size, False)],
        "generator_loss": [(x, d, t, 0.01, 0.1, 0.2, IGNORE, True, True, True, backend, size, True),
                           (xc, d, None, 0.01, 0.1, 0.2, IGNORE, False, False, True, backend, size, False)],
        "discriminator_loss": [(d, _dmap((1, 4, 2), torch.float32, device, gen), mask, None, True, False, backend,
                                size, True)],
    }
    for name, calls in samples.items():
        op = getattr(OPS, name).default
        flags = [i for i, a in enumerate(op._schema.arguments) if a.name.startswith("store_grad")]
        for args in calls:
            stores = any(args[i] for i in flags)
            utils = ("test_schema", "test_autograd_registration", "test_faketensor") + \
                (() if stores else ("test_aot_dispatch_dynamic",))
            torch.library.opcheck(op, args, test_utils=utils)
    # fake tensors: shapes without a launch
    sums, loss_map, grad, scales = _ops.cross_entropy2d(x.to("meta"), t.to("meta"), None, IGNORE, 0.0, "none", True,
                                                         True, backend, size, False)
    assert tuple(loss_map.shape) == (2, *size) and grad.shape == x.shape
    assert tuple(_ops.softmax2d(xc.to("meta"), backend, size, True).shape) == (2, 3, *size)


@pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)
def test_modules_take_size_at_construction_or_per_call(case, gen):
    backend, device = case
    low, low_d, size = _grid(backend)
    x = _logits((2, 3, *low), torch.float32, "contiguous", device, gen)
    d = _dmap((2, *low_d), torch.float32, device, gen)
    t = _labels((2, *size), 3, device, gen)
    kw = dict(size=size, align_corners=True, backend=backend)
    pairs = [(fnn.CrossEntropy2d(**kw)(x, t), fas.cross_entropy2d(x, t, **kw)),
             (fnn.CrossEntropy2d(align_corners=True, backend=backend)(x, t, size=size),
              fas.cross_entropy2d(x, t, **kw)),
             (fnn.Softmax2d(**kw)(x), fas.softmax2d(x, **kw)),
             (fnn.BCEWithLogits2d(backend=backend, size=(1, 1))(d, 1.0, size=size),
              fas.bce_with_logits2d(d, 1.0, size=size, backend=backend)),
             (fnn.SemiCrossEntropy2d(**kw)(x, d), fas.semi_cross_entropy2d(x, d, **kw)),
             (fnn.GeneratorLoss(lambda_adv=0.1, **kw)(x, d, t).total,
              fas.generator_loss(x, d, t, lambda_adv=0.1, **kw).total),
             (fnn.DiscriminatorLoss(**kw)(d, d), fas.discriminator_loss(d, d, **kw))]
    for i, (a, b) in enumerate(pairs):
        assert torch.equal(a, b), f"module {i}"


# ------------------------------------------------------------------------------------------------------ errors

def test_mismatch_without_size_says_how_to_opt_in():
    x, d = torch.randn(2, 3, 5, 7), torch.randn(2, 1, 3, 4)
    t = torch.randint(0, 3, (2, 17, 23))
    with pytest.raises(ValueError, match=r"target .*\(2, 3, 5, 7\), got \(2, 17, 23\); pass size=target\.shape\[-2:\]"):
        fas.cross_entropy2d(x, t)
    with pytest.raises(ValueError, match=r"d_logits \(2, 1, 3, 4\).*\(2, 3, 5, 7\).*pass size="):
        fas.generator_loss(x, d, None, lambda_adv=0.1)
    with pytest.raises(ValueError, match=r"d_logits \(2, 1, 3, 4\).*pass size="):
        fas.semi_cross_entropy2d(x, d)
    with pytest.raises(ValueError, match=r"ignore_mask \(2, 17, 23\).*pass size=ignore_mask\.shape\[-2:\]"):
        fas.bce_with_logits2d(d, 1.0, ignore_mask=torch.zeros(2, 17, 23, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"target \(2, 17, 23\).*pass size=target\.shape\[-2:\]"):
        fas.bce_with_logits2d(d, torch.rand(2, 17, 23))
    with pytest.raises(ValueError, match=r"ignore_mask_real \(2, 17, 23\).*pass size="):
        fas.discriminator_loss(d, d, ignore_mask_real=torch.zeros(2, 17, 23, dtype=torch.bool))


@pytest.mark.parametrize("backend", [b for b, dev in BACKEND_CASES if dev == "cpu"])
def test_bad_size_and_maps_not_at_size_are_one_line_errors(backend):
    x, d = torch.randn(2, 3, 5, 7), torch.randn(2, 3, 4)
    t = torch.randint(0, 3, (2, 17, 23))
    for bad, error in (((17.0, 23), TypeError), ((17,), ValueError), ((17, 23, 1), ValueError), ((0, 23), ValueError),
                       ((-1, 23), ValueError), ((True, 23), TypeError), ("17x23", TypeError), (17, TypeError),
                       (torch.tensor([17, 23]), TypeError)):
        with pytest.raises(error, match="size"):
            fas.cross_entropy2d(x, t, size=bad, backend=backend)
    with pytest.raises(TypeError, match="align_corners must be a bool"):
        fas.softmax2d(x, size=(17, 23), align_corners=1, backend=backend)
    cases = [
        (lambda: fas.cross_entropy2d(x, t, size=(17, 22), backend=backend), r"target.*\(2, 17, 22\).*\(2, 17, 23\)"),
        (lambda: fas.generator_loss(x, d, t[:1], lambda_adv=0.1, size=(17, 23), backend=backend),
         r"target.*\(2, 17, 23\).*\(1, 17, 23\)"),
        (lambda: fas.generator_loss(x, d[:1], t, lambda_adv=0.1, size=(17, 23), backend=backend),
         r"d_logits \(1, 3, 4\).*batch N = 2"),
        (lambda: fas.semi_cross_entropy2d(x, d, ignore_mask=torch.zeros(2, 5, 7, dtype=torch.bool), size=(17, 23),
                                          backend=backend), r"ignore_mask \(2, 5, 7\) must be at size \(17, 23\)"),
        (lambda: fas.bce_with_logits2d(d, torch.rand(2, 3, 4), size=(17, 23), backend=backend),
         r"target \(2, 3, 4\) must be at size \(17, 23\)"),
        (lambda: fas.discriminator_loss(d, d, ignore_mask_fake=torch.zeros(2, 3, 4, dtype=torch.bool),
                                        size=(17, 23), backend=backend), r"ignore_mask_fake.*size \(17, 23\)"),
        (lambda: fas.cross_entropy2d(torch.randn(2, 3, 0, 7), t, size=(17, 23), backend=backend),
         r"cannot upsample logits \(2, 3, 0, 7\) to size \(17, 23\)"),
    ]
    for call, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as info:
            call()
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("case", KERNEL_CASES, ids=ids)
def test_registered_ops_check_maps_against_size(case):
    backend, _ = case
    x, d = torch.randn(2, 3, 5, 7), torch.randn(2, 3, 4)
    t = torch.randint(0, 3, (2, 17, 23))
    with pytest.raises(ValueError, match=r"target \(2, 5, 7\).*\(2, 17, 23\)"):
        OPS.cross_entropy2d(x, t[:, :5, :7].contiguous(), None, IGNORE, 0.0, "sum", False, False, backend,
                            [17, 23], False)
    with pytest.raises(ValueError, match=r"d_logits \(3, 3, 4\).*N = 2"):
        OPS.generator_loss(x, torch.randn(3, 3, 4), t, 0.1, 0.1, 0.2, IGNORE, False, False, False, backend,
                           [17, 23], False)
    with pytest.raises(ValueError, match=r"ignore_mask \(2, 3, 4\).*\(2, 17, 23\)"):
        OPS.bce_with_logits2d(d, None, 1.0, torch.zeros(2, 3, 4, dtype=torch.bool), "sum", False, backend,
                              [17, 23], False)
    with pytest.raises(ValueError, match="size"):
        OPS.softmax2d(x, backend, [17, 0], False)
