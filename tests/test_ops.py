"""The registered ops and the rules shared by every backend (cpu, reference, triton under TRITON_INTERPRET=1;
cuda and triton on a GPU): torch.library.opcheck of every op, torch.compile(fullgraph=True) and torch.export,
F.cross_entropy parity (positional weight, signed weight totals, label smoothing), learnt class weights, double
backward, the hand-over of the gradient buffer, logits never written, and label errors that never make the host
wait for the device."""
import pytest
import torch
import torch.nn.functional as F

import fastadvseg as fas
from fastadvseg import _labels, _ops
from helpers import BACKEND_CASES, KERNEL_CASES, assert_close, ids, make_d_logits, make_logits, make_target

OPS = torch.ops.fastadvseg


class TinyD(torch.nn.Module):
    """A fully convolutional discriminator small enough for the interpreter: conv, LeakyReLU, conv, upsample."""

    def __init__(self, c):
        super().__init__()
        self.a = torch.nn.Conv2d(c, 4, 3, stride=2, padding=1)
        self.b = torch.nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, p):
        y = self.b(F.leaky_relu(self.a(p.float()), 0.2))
        return F.interpolate(y, size=p.shape[-2:], mode="bilinear", align_corners=True)


def _gan_losses(x, t, d_net, backend):
    """The loss code of one GAN step, as the training loop writes it."""
    c = x.shape[1]
    lab = fas.generator_loss(x, d_net(fas.softmax2d(x, backend=backend)), t, lambda_adv=0.01, backend=backend)
    unl = fas.generator_loss(x, d_net(fas.softmax2d(x, backend=backend)), None, lambda_adv=0.001, lambda_semi=0.1,
                             backend=backend)
    d_fake = d_net(fas.softmax2d(x.detach(), backend=backend))
    d_real = d_net(fas.one_hot2d(t, c, backend=backend))
    loss_d = fas.discriminator_loss(d_fake, d_real, ignore_mask_real=(t == 255), backend=backend) / 2
    ce = fas.cross_entropy2d(x, t, None, label_smoothing=0.1, backend=backend)
    return lab.total + unl.total + ce, loss_d


# --------------------------------------------------------------------------------------------------- opcheck

def _op_samples(device, gen):
    shape = (2, 3, 4, 5)
    x = make_logits(shape, torch.float32, "contiguous", device, generator=gen)
    xc = make_logits(shape, torch.bfloat16, "channels_last", device, generator=gen)
    d = make_d_logits((2, 4, 5), torch.float32, device, generator=gen)
    t = make_target(shape, device, generator=gen)
    w = torch.rand(3, generator=gen).to(device) + 0.5
    mask = (torch.rand((2, 4, 5), generator=gen) < 0.3).to(device)
    p = torch.softmax(x.detach(), 1)
    return {
        "softmax2d": [(x, "B"), (xc, "B")],
        "softmax2d_backward": [(p, torch.randn(shape, generator=gen).to(device), "B")],
        "cross_entropy2d": [(x, t, None, 255, 0.0, "mean", True, True, "B"),
                            (xc, t, w, 255, 0.2, "none", True, True, "B"),
                            (x, t, w, 255, 0.0, "sum", False, False, "B")],
        "bce_with_logits2d": [(d, None, 1.0, mask, "mean", True, "B"),
                              (d, torch.rand((2, 4, 5), generator=gen).to(device), 0.0, None, "none", True, "B")],
        "semi_cross_entropy2d": [(x, d.detach(), 0.2, mask, "mean", True, "B"),
                                 (xc, d.detach(), 0.2, None, "none", True, "B")],
        "generator_loss": [(x, d, t, 0.01, 0.1, 0.2, 255, True, True, True, "B"),
                           (xc, d, None, 0.01, 0.1, 0.2, 255, True, True, True, "B")],
        "discriminator_loss": [(d, d.detach() * 2, mask, None, True, False, "B")],
        "one_hot2d": [(t, 3, 255, torch.float32, True, "B")],
    }


_STORE_FLAGS = {"cross_entropy2d": (6,), "bce_with_logits2d": (5,), "semi_cross_entropy2d": (5,),
                "generator_loss": (7, 8), "discriminator_loss": (4, 5)}


@pytest.mark.parametrize("case", KERNEL_CASES, ids=ids)
def test_opcheck_every_registered_op(case, gen):
    """Schema, fake tensors, autograd registration, and AOT dispatch with dynamic shapes of every op.

    A stored gradient buffer is an output that the backward scales in place and hands to autograd (never seen by
    users: the public functions drop it), so opcheck's comparison of outputs *after* backward applies only to
    calls that store none; compiled code with stored gradients is checked end to end below."""
    backend, device = case
    for name, samples in _op_samples(device, gen).items():
        for args in samples:
            args = tuple(backend if a == "B" else a for a in args)
            stores = any(args[i] for i in _STORE_FLAGS.get(name, ()))
            utils = ("test_schema", "test_autograd_registration", "test_faketensor") + \
                (() if stores else ("test_aot_dispatch_dynamic",))
            torch.library.opcheck(getattr(OPS, name).default, args, test_utils=utils)
            if stores:  # the same call without stored gradients, through AOT dispatch
                args = tuple(False if i in _STORE_FLAGS[name] else a for i, a in enumerate(args))
                torch.library.opcheck(getattr(OPS, name).default, args, test_utils="test_aot_dispatch_dynamic")


def test_opcheck_shared_helpers(gen):
    torch.library.opcheck(OPS.valid_labels.default, (make_target((2, 3, 4, 5), "cpu", generator=gen), 3, 255))


# ----------------------------------------------------------------------------------- torch.compile, torch.export

@pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)
def test_gan_step_has_no_graph_break_and_compiles_fullgraph(case, gen):
    """With label validation on: no graph break from fastadvseg; compiled values and gradients are eager's."""
    backend, device = case
    assert fas.label_validation_enabled()
    shape = (2, 3, 6, 7)
    x = make_logits(shape, torch.float32, "contiguous", device, generator=gen)
    t = make_target(shape, device, generator=gen)
    d_net = TinyD(3).to(device)
    params = list(d_net.parameters())
    torch._dynamo.reset()
    explained = torch._dynamo.explain(_gan_losses)(x, t, d_net, backend)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(_gan_losses, fullgraph=True, backend="aot_eager" if backend == "triton" else "inductor")
    got = compiled(x, t, d_net, backend)
    want = _gan_losses(x, t, d_net, backend)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    g_got = torch.autograd.grad(got[0] + got[1], [x] + params)
    g_want = torch.autograd.grad(want[0] + want[1], [x] + params)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)
def test_compiled_with_dynamic_shapes_matches_eager(case, gen):
    """One compiled graph serves batches of other sizes and resolutions (torch.compile(dynamic=True)): values and
    gradients of the logits and of D's map are eager's at each shape."""
    backend, device = case

    def losses(x, z, t):
        lab = fas.generator_loss(x, z, t, lambda_adv=0.01, backend=backend)
        unl = fas.generator_loss(x, z, None, lambda_adv=0.001, lambda_semi=0.1, backend=backend)
        return lab.total + unl.total + fas.cross_entropy2d(x, t, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(losses, dynamic=True, fullgraph=True,
                             backend="aot_eager" if backend == "triton" else "inductor")
    for shape in [(2, 3, 5, 7), (3, 3, 9, 4), (1, 3, 6, 11)]:
        x = make_logits(shape, torch.float32, "contiguous", device, generator=gen)
        z = make_d_logits((shape[0], shape[2], shape[3]), torch.float32, device, generator=gen).unsqueeze(1)
        t = make_target(shape, device, generator=gen)
        got, want = compiled(x, z, t), losses(x, z, t)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for a, b in zip(torch.autograd.grad(got, [x, z]), torch.autograd.grad(want, [x, z])):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def _layout_losses(img, t, conv, dconv, backend):
    """Logits from a conv and an upsample (channels_last when Inductor picks it), a sliced and a transposed view."""
    x = F.interpolate(conv(img), scale_factor=2, mode="bilinear", align_corners=True)
    z = dconv(fas.softmax2d(x, backend=backend))
    lab = fas.generator_loss(x, z, t, lambda_adv=0.01, backend=backend)
    unl = fas.generator_loss(x[:, :, 1:, :-1], z[..., 1:, :-1], None, lambda_adv=0.001, lambda_semi=0.1,
                             backend=backend)
    d = fas.discriminator_loss(dconv(fas.softmax2d(x.detach(), backend=backend)),
                               dconv(fas.one_hot2d(t, x.shape[1], backend=backend)), ignore_mask_real=t == 255,
                               backend=backend)
    ce = fas.cross_entropy2d(x.transpose(2, 3), t.transpose(1, 2), backend=backend)
    return lab.total + unl.total + ce + d


@pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)
@pytest.mark.parametrize("layout_optimization", [False, True])
def test_compiled_ops_take_the_layout_inductor_chooses(case, layout_optimization, gen):
    """The ops are tagged flexible_layout: Inductor hands them channels_last, sliced or transposed inputs as they
    are. Values and gradients must stay eager's whatever layout it picks (forced channels_last after convs too)."""
    backend, device = case
    conv, dconv = torch.nn.Conv2d(3, 5, 3, padding=1).to(device), torch.nn.Conv2d(5, 1, 3, padding=1).to(device)
    params = list(conv.parameters()) + list(dconv.parameters())
    img = torch.randn(2, 3, 5, 6, generator=gen).to(device).to(memory_format=torch.channels_last)
    t = make_target((2, 5, 10, 12), device, generator=gen)
    torch._dynamo.reset()
    compiled = torch.compile(_layout_losses, fullgraph=True,
                             backend="aot_eager" if backend == "triton" else "inductor",
                             options=None if backend == "triton" else {"force_layout_optimization": layout_optimization})
    got, want = compiled(img, t, conv, dconv, backend), _layout_losses(img, t, conv, dconv, backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert all(torch.Tag.flexible_layout in getattr(OPS, name).default.tags
               for name in ("softmax2d", "softmax2d_backward", "generator_loss", "discriminator_loss", "one_hot2d",
                            "cross_entropy2d"))


class _LossModule(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        self.head = torch.nn.Conv2d(3, 3, 1)

    def forward(self, x, d, t):
        logits = self.head(x)
        lab = fas.generator_loss(logits, d, t, lambda_adv=0.01, backend=self.backend)
        ce = fas.cross_entropy2d(logits, t, reduction="none", label_smoothing=0.1, backend=self.backend)
        return lab.total, lab.ce, ce, fas.one_hot2d(t, 3, backend=self.backend)


@pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)
def test_torch_export_runs_and_matches_eager(case, gen):
    backend, device = case
    shape = (2, 3, 4, 5)
    x = torch.randn(shape, generator=gen).to(device)
    d = torch.randn((2, 1, 4, 5), generator=gen).to(device)
    t = make_target(shape, device, generator=gen)
    module = _LossModule(backend).to(device)
    n, h, w = torch.export.Dim("n"), torch.export.Dim("h", min=2), torch.export.Dim("w", min=2)
    exported = torch.export.export(module, (x, d, t), dynamic_shapes=({0: n, 2: h, 3: w}, {0: n, 2: h, 3: w},
                                                                        {0: n, 1: h, 2: w}))
    assert any("fastadvseg" in str(node.target) for node in exported.graph.nodes) or backend == "reference"
    for a, b in zip(exported.module()(x, d, t), module(x, d, t)):
        torch.testing.assert_close(a, b)
    other = (3, 3, 7, 2)  # another batch size and resolution through the same exported program
    x2, d2 = torch.randn(other, generator=gen).to(device), torch.randn((3, 1, 7, 2), generator=gen).to(device)
    t2 = make_target(other, device, generator=gen)
    for a, b in zip(exported.module()(x2, d2, t2), module(x2, d2, t2)):
        torch.testing.assert_close(a, b)
    t_bad = t.clone()
    t_bad[0, 0, 0] = 7
    with pytest.raises(ValueError, match="label 7"):
        exported.module()(x, d, t_bad)


# ------------------------------------------------------------------------------ F.cross_entropy parity (NCHW)

WEIGHTS = {"none": None, "positive": [0.3, 1.0, 2.5, 0.7, 1.2], "signed": [-2.0, 1.0, 0.5, -0.4, 0.1]}


@pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.37])
@pytest.mark.parametrize("weights", list(WEIGHTS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_f_cross_entropy(case, eps, weights, reduction, gen):
    """Value and logits gradient of F.cross_entropy (float64), weight as the third positional argument."""
    backend, device = case
    shape = (2, 5, 3, 7)
    x = make_logits(shape, torch.float32, "sliced", device, generator=gen)
    t = make_target(shape, device, ignore_index=250, generator=gen)
    w = None if WEIGHTS[weights] is None else torch.tensor(WEIGHTS[weights], device=device)
    loss = fas.cross_entropy2d(x, t, w, ignore_index=250, reduction=reduction, label_smoothing=eps, backend=backend)
    x64 = x.detach().double().cpu().requires_grad_()
    w64 = None if w is None else w.double().cpu()
    want = F.cross_entropy(x64, t.cpu(), w64, ignore_index=250, reduction=reduction, label_smoothing=eps)
    assert_close(loss, want, torch.float32, "value")
    up = torch.rand(want.shape, generator=gen, dtype=torch.float64) + 0.5
    (gx,) = torch.autograd.grad((loss.double().cpu() * up).sum(), [x])
    (gx64,) = torch.autograd.grad((want * up).sum(), [x64])
    assert_close(gx, gx64, torch.float32, "gradient")


@pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)
def test_signed_weight_total_and_zero_total(case):
    backend, device = case
    x = torch.tensor([[1, 2, .5], [.3, -1, 2]], device=device).reshape(2, 3, 1, 1).requires_grad_()
    t = torch.tensor([0, 2], device=device).reshape(2, 1, 1)
    w = torch.tensor([-2, 1, .5], device=device)
    loss = fas.cross_entropy2d(x, t, w, backend=backend)
    torch.testing.assert_close(loss.cpu(), F.cross_entropy(x.detach().cpu(), t.cpu(), w.cpu()))
    zero_total = torch.tensor([1.0, 1.0, -1.0], device=device)  # w[0] + w[2] == 0: our rule, 0 and no gradient
    loss = fas.cross_entropy2d(x, t, zero_total, label_smoothing=0.2, backend=backend)
    (g,) = torch.autograd.grad(loss, [x])
    assert loss.item() == 0.0 and torch.count_nonzero(g) == 0


def _weighted_ce_float64(x, t, w, eps, ignore_index):
    """F.cross_entropy's weighted, smoothed mean written out, so that the weight gets a float64 gradient
    (PyTorch's own op refuses a weight that requires grad)."""
    logp = torch.log_softmax(x, 1)
    valid = t != ignore_index
    y = torch.where(valid, t, 0)
    w_y = torch.where(valid, w[y], 0.0)
    nll = -logp.gather(1, y.unsqueeze(1)).squeeze(1)
    smooth = -(logp * w.view(1, -1, 1, 1)).sum(1)
    per_pixel = torch.where(valid, (1 - eps) * w_y * nll + eps / x.shape[1] * smooth, 0.0)
    return per_pixel.sum() / w_y.sum()


@pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)
@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_learnt_class_weights_get_the_same_gradient_everywhere(case, eps, gen):
    backend, device = case
    shape = (2, 4, 3, 5)
    x = make_logits(shape, torch.float32, "channels_last", device, generator=gen)
    t = make_target(shape, device, generator=gen)
    w = (torch.rand(4, generator=gen) + 0.2).to(device).requires_grad_()
    loss = fas.cross_entropy2d(x, t, w, label_smoothing=eps, backend=backend)
    gx, gw = torch.autograd.grad(loss * 0.7, [x, w])
    x64, w64 = x.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
    gx64, gw64 = torch.autograd.grad(_weighted_ce_float64(x64, t.cpu(), w64, eps, 255) * 0.7, [x64, w64])
    assert_close(gx, gx64, torch.float32, "logits gradient")
    assert_close(gw, gw64, torch.float32, "weight gradient")


# ------------------------------------------------------------------------------------------------ double backward

def _second_order(fn, x, v):
    (g,) = torch.autograd.grad(fn(x), [x], create_graph=True)
    (h,) = torch.autograd.grad((g.double() * v).sum(), [x])
    return h


@pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)
def test_double_backward_works_on_every_backend(case, gen):
    backend, device = case
    shape = (1, 3, 2, 3)
    x = make_logits(shape, torch.float32, "contiguous", device, generator=gen)
    d = make_d_logits((1, 2, 3), torch.float32, device, generator=gen)
    t = make_target(shape, device, generator=gen)
    v = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)
    fns = {
        "softmax2d": lambda x, b: (fas.softmax2d(x, backend=b) ** 2).sum(),
        "cross_entropy2d": lambda x, b: fas.cross_entropy2d(x, t, label_smoothing=0.1, backend=b),
        "semi": lambda x, b: fas.semi_cross_entropy2d(x, d, backend=b),
        "generator": lambda x, b: fas.generator_loss(x, d * x.sum((1,)), t, lambda_adv=0.3, backend=b).total,
    }
    for name, fn in fns.items():
        got = _second_order(lambda y: fn(y, backend), x, v)
        x64 = x.detach().double().requires_grad_()
        want = _second_order(lambda y: fn(y, "reference"), x64, v)
        assert_close(got, want, torch.float32, name)


# ------------------------------------------------------------------------------ buffers: handed over, not written

@pytest.mark.parametrize("case", KERNEL_CASES, ids=ids)
def test_gradient_buffer_is_handed_over_not_copied(case, gen, monkeypatch):
    """A leaf's .grad is the very buffer the kernel wrote (one gradient-sized buffer at peak)."""
    backend, device = case
    written = []
    real = _ops.launcher

    class Recording:
        def __init__(self, module):
            self.module = module

        def __getattr__(self, name):
            launch = getattr(self.module, name)
            if name in ("DTYPES", "supports_device"):
                return launch

            def record(*args):
                out = launch(*args)
                written.extend(g.data_ptr() for g in out[1:3] if isinstance(g, torch.Tensor) and g.dim() == 4)
                return out
            return record

    monkeypatch.setattr(_ops, "launcher", lambda name: Recording(real(name)))
    shape = (2, 3, 4, 5)
    for make in (lambda x, t, d: fas.cross_entropy2d(x, t, backend=backend),
                 lambda x, t, d: fas.generator_loss(x, d, t, lambda_adv=0.1, backend=backend).total * 3):
        written.clear()
        x = make_logits(shape, torch.float32, "channels_last", device, generator=gen)
        d = make_d_logits((2, 4, 5), torch.float32, device, generator=gen)
        make(x, make_target(shape, device, generator=gen), d).backward()
        assert x.grad.data_ptr() in written


@pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_logits_never_written(case, dtype, gen):
    backend, device = case
    shape = (2, 3, 4, 5)
    x = make_logits(shape, dtype, "sliced", device, generator=gen)
    d = make_d_logits((2, 4, 5), torch.float32, device, generator=gen)
    t = make_target(shape, device, generator=gen)
    before = x.detach().clone()
    losses = [fas.cross_entropy2d(x, t, backend=backend), fas.semi_cross_entropy2d(x, d, backend=backend),
              fas.generator_loss(x, d, t, lambda_adv=0.1, backend=backend).total,
              fas.generator_loss(x, d, None, lambda_adv=0.1, backend=backend).total,
              fas.softmax2d(x, backend=backend).float().sum()]
    torch.autograd.grad(sum(losses), [x, d])
    assert torch.equal(x.detach(), before)


# ------------------------------------------------------------------------------------ label errors, deferred

@pytest.fixture
def deferred_cpu(monkeypatch):
    """Treat CPU tensors the way CUDA tensors are treated: reports checked later, never read at the call."""
    monkeypatch.setattr(_labels, "ASYNC_DEVICE_TYPES", {"cpu", "cuda"})
    _labels._pending.clear()
    yield
    _labels._pending.clear()


@pytest.mark.parametrize("case", [c for c in BACKEND_CASES if c[1] == "cpu"], ids=ids)
def test_deferred_label_error_surfaces_at_the_next_call(case, deferred_cpu, gen):
    backend, device = case
    shape = (1, 3, 4, 5)
    x = make_logits(shape, torch.float32, "contiguous", device, generator=gen)
    t = make_target(shape, device, generator=gen)
    t[0, 2, 3] = 9
    loss = fas.cross_entropy2d(x, t, backend=backend)  # no error yet: the report is queued
    with pytest.raises(ValueError, match=r"label 9 \(1 pixel"):
        loss.backward()  # ... and checked at the next backward of a kernel op, or the next op call
        fas.cross_entropy2d(x, t, backend=backend)
    fas.cross_entropy2d(x, t, backend=backend)
    with pytest.raises(ValueError, match=r"label 9 \(1 pixel"):
        fas.check_labels_now()
    fas.check_labels_now()  # nothing left


def test_no_host_read_of_device_values_on_the_gpu_path(deferred_cpu, gen, monkeypatch):
    """What runs for CUDA tensors (the shared layer, the triton launches, deferred label reports) never reads a
    device value on the host: .item(), float(), int(), bool() and .tolist() of a tensor are refused here."""
    if ("triton", "cpu") not in BACKEND_CASES:
        pytest.skip("needs the triton backend under TRITON_INTERPRET=1")
    shape = (2, 3, 4, 5)
    x = make_logits(shape, torch.float32, "contiguous", "cpu", generator=gen)
    d = make_d_logits((2, 4, 5), torch.float32, "cpu", generator=gen)
    t = make_target(shape, "cpu", generator=gen)
    fas.cross_entropy2d(x, t, backend="triton")  # compile the kernels (the interpreter) before the watch

    def refuse(*_):
        raise AssertionError("a device value was read on the host")

    deferred = []
    real_defer = _labels._defer
    monkeypatch.setattr(_labels, "_defer", lambda *a: deferred.append(a) or real_defer(*a))
    for name in ("item", "__float__", "__int__", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    losses = [fas.cross_entropy2d(x, t, None, label_smoothing=0.1, backend="triton"),
              fas.generator_loss(x, d, t, lambda_adv=0.1, backend="triton").total,
              fas.generator_loss(x, d, None, lambda_adv=0.1, backend="triton").total,
              fas.discriminator_loss(d, d * 2, backend="triton"),
              fas.bce_with_logits2d(d, 1.0, backend="triton")]
    torch.autograd.grad(sum(losses), [x, d])
    monkeypatch.undo()
    assert len(deferred) == 2  # the two labelled losses queued their reports instead of reading them
    fas.check_labels_now()


@pytest.mark.parametrize("case", [c for c in KERNEL_CASES if c[1] == "cpu"], ids=ids)
def test_gpu_path_of_the_shared_backward_gives_the_reference_gradients(case, deferred_cpu, gen):
    """The backward that CUDA tensors take (the stored gradient scaled by a factor that stays on the device, never
    read on the host) runs here on CPU tensors: every op, with upstream gradients other than 1 and per-pixel ones,
    against the float64 reference."""
    backend, device = case
    shape = (2, 3, 4, 5)
    x = make_logits(shape, torch.float32, "channels_last", device, generator=gen)
    d = make_d_logits((2, 4, 5), torch.float32, device, generator=gen)
    t = make_target(shape, device, generator=gen)
    v = torch.rand((2, 4, 5), generator=gen).to(device) + 0.5

    def weighted(x, d, b):
        losses = [fas.softmax2d(x, backend=b).square().sum(),
                  fas.cross_entropy2d(x, t, label_smoothing=0.1, backend=b),
                  (fas.cross_entropy2d(x, t, reduction="none", backend=b) * v.to(x.dtype)).sum(),
                  fas.semi_cross_entropy2d(x, d, backend=b),
                  (fas.bce_with_logits2d(d, 1.0, reduction="none", backend=b) * v.to(d.dtype)).sum(),
                  fas.bce_with_logits2d(d, 0.0, backend=b),
                  fas.generator_loss(x, d, t, lambda_adv=0.1, backend=b).total,
                  fas.generator_loss(x, d, None, lambda_adv=0.1, backend=b).total,
                  fas.discriminator_loss(d, d * 2, backend=b)]
        return [torch.autograd.grad(loss * (0.5 + k), [x, d], allow_unused=True) for k, loss in enumerate(losses)]

    got = weighted(x, d, backend)
    want = weighted(x.detach().double().requires_grad_(), d.detach().double().requires_grad_(), "reference")
    for k, (g, w) in enumerate(zip(got, want)):
        for a, b in zip(g, w):
            assert (a is None) == (b is None), k
            if a is not None:
                assert_close(a, b, torch.float32, f"loss {k}")
    fas.check_labels_now()


@pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)
def test_graphs_are_freed_without_the_garbage_collector(case, gen):
    """No reference cycle through an op's autograd context: a dropped loss frees its gradient buffers at once
    (with a cycle they wait for the collector, and every call then pays for fresh pages from the OS)."""
    import gc
    backend, device = case
    shape = (2, 3, 4, 5)
    x = make_logits(shape, torch.float32, "contiguous", device, generator=gen)
    d = make_d_logits((2, 4, 5), torch.float32, device, generator=gen)
    t = make_target(shape, device, generator=gen)
    gc.collect()
    gc.disable()
    try:
        for retain in (False, True):
            losses = [fas.cross_entropy2d(x, t, backend=backend), fas.softmax2d(x, backend=backend).sum(),
                      fas.generator_loss(x, d, t, lambda_adv=0.1, backend=backend).total,
                      fas.generator_loss(x, d, None, lambda_adv=0.1, backend=backend).total,
                      fas.semi_cross_entropy2d(x, d, backend=backend), fas.bce_with_logits2d(d, 1.0, backend=backend),
                      fas.discriminator_loss(d, d * 2, backend=backend)]
            if retain:
                torch.autograd.grad(sum(losses), [x, d], retain_graph=True)
            del losses
        gc.set_debug(gc.DEBUG_SAVEALL)  # what only the collector would free stays in gc.garbage
        gc.collect()
        cyclic = [type(o).__name__ for o in gc.garbage if "fastadvseg" in type(o).__name__]
        assert cyclic == []  # (the Triton interpreter makes cyclic garbage of its own; ours must not be in it)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


# ------------------------------------------------------------------------ eager calls: the same rule, no dispatcher

def _every_op(x, t, d, backend):
    """Values, and gradients w.r.t. x and d, of every public op on one batch."""
    losses = [fas.softmax2d(x, backend=backend).square().sum(),
              fas.cross_entropy2d(x, t, label_smoothing=0.1, backend=backend),
              fas.cross_entropy2d(x, t, reduction="none", backend=backend).sum(),
              fas.semi_cross_entropy2d(x, d, backend=backend),
              fas.bce_with_logits2d(d, 1.0, backend=backend),
              fas.generator_loss(x, d, t, lambda_adv=0.1, backend=backend).total,
              fas.generator_loss(x, d, None, lambda_adv=0.1, backend=backend).total,
              fas.discriminator_loss(d, d * 2, backend=backend),
              fas.one_hot2d(t, x.shape[1], backend=backend).sum()]
    grads = torch.autograd.grad(sum(losses), [x, d])
    return [l.detach() for l in losses] + list(grads)


def _autograd_nodes(t):
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in seen:
            seen.add(type(node).__name__)
            todo.extend(n for n, _ in node.next_functions)
    return seen


@pytest.mark.parametrize("case", KERNEL_CASES, ids=ids)
def test_eager_calls_and_the_registered_ops_agree_bit_for_bit(case, gen, monkeypatch):
    """Eager code runs an op's implementation and autograd rule without the dispatcher's round trip; the
    registered op runs the same two functions. Both paths, on one batch: identical values and gradients."""
    backend, device = case
    shape = (2, 3, 4, 5)
    x = make_logits(shape, torch.float32, "channels_last", device, generator=gen)
    d = make_d_logits((2, 4, 5), torch.float32, device, generator=gen)
    t = make_target(shape, device, generator=gen)
    assert "fastadvseg_cross_entropy2dBackward" in _autograd_nodes(fas.cross_entropy2d(x, t, backend=backend))
    direct = _every_op(x, t, d, backend)
    monkeypatch.setattr(_ops, "_plain_eager", lambda args: False)
    assert "GeneratedBackwardFor_fastadvseg_cross_entropy2d_defaultBackward" in _autograd_nodes(
        fas.cross_entropy2d(x, t, backend=backend))
    via_dispatcher = _every_op(x, t, d, backend)
    for a, b in zip(direct, via_dispatcher):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", KERNEL_CASES, ids=ids)
def test_dispatch_modes_and_meta_tensors_get_the_registered_ops(case, gen):
    """A dispatch mode (what profilers, FLOP counters and tracers use) sees torch.ops.fastadvseg.* in eager code."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func))
            return func(*args, **(kwargs or {}))

    backend, device = case
    shape = (2, 3, 4, 5)
    x = make_logits(shape, torch.float32, "contiguous", device, generator=gen)
    t = make_target(shape, device, generator=gen)
    with Seen() as mode:
        fas.cross_entropy2d(x, t, backend=backend).backward()
        fas.softmax2d(x, backend=backend).sum().backward()
    assert {"fastadvseg.cross_entropy2d.default", "fastadvseg.softmax2d.default",
            "fastadvseg.softmax2d_backward.default"} <= mode.ops
    assert _ops._plain_eager((x, torch.nn.Parameter(x.detach()))) and not _ops._plain_eager((x.to("meta"),))

    class Sub(torch.Tensor):
        pass
    assert not _ops._plain_eager((x.as_subclass(Sub),))


@pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)
def test_torch_func_grad_and_vjp_work_and_vmap_says_what_to_do(case, gen):
    backend, device = case
    shape = (2, 3, 4, 5)
    x = make_logits(shape, torch.float32, "contiguous", device, generator=gen).detach()
    d = make_d_logits((2, 4, 5), torch.float32, device, generator=gen)
    t = make_target(shape, device, generator=gen)
    x64, d64 = x.double(), d.double()
    for name, fn in {
        "generator_loss": lambda x, d, b: fas.generator_loss(x, d, t, lambda_adv=0.3, backend=b).total,
        "cross_entropy2d": lambda x, d, b: fas.cross_entropy2d(x, t, label_smoothing=0.1, backend=b),
        "semi_cross_entropy2d": lambda x, d, b: fas.semi_cross_entropy2d(x, d, backend=b),
        "softmax2d": lambda x, d, b: fas.softmax2d(x, backend=b)[:, 0].sum(),
    }.items():
        got = torch.func.grad(fn)(x, d, backend)
        assert_close(got, torch.func.grad(fn)(x64, d64, "reference"), torch.float32, name)
    v = torch.randn(shape, generator=gen, dtype=torch.float64).to(device)

    def hvp(x, b):  # grad of grad: the inner gradient is differentiated again (the reference formula)
        inner = torch.func.grad(lambda x: fas.cross_entropy2d(x, t, label_smoothing=0.1, backend=b))
        return torch.func.grad(lambda x: (inner(x) * v.to(x.dtype)).sum())(x)
    assert_close(hvp(x, backend), hvp(x64, "reference"), torch.float32, "hessian-vector product")
    out, vjp = torch.func.vjp(lambda d: fas.discriminator_loss(d, d * 2, backend=backend), d)
    (got,) = vjp(torch.ones_like(out))
    _, vjp64 = torch.func.vjp(lambda d: fas.discriminator_loss(d, d * 2, backend="reference"), d64)
    assert_close(got, vjp64(torch.ones((), dtype=torch.float64, device=device))[0], torch.float32, "vjp")
    batch = torch.stack([x, x.flip(0)])
    if backend == "reference":
        torch.vmap(lambda x: fas.cross_entropy2d(x, t, backend=backend))(batch)
    else:
        with pytest.raises(NotImplementedError, match="fastadvseg.cross_entropy2d: .*torch.vmap.*backend='reference'"):
            torch.vmap(lambda x: fas.cross_entropy2d(x, t, backend=backend))(batch)
