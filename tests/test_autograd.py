"""Autograd behaviour of every op on every backend: float64 gradcheck (reference), logits shared by several losses
(no in-place corruption of saved tensors), backward twice with retain_graph, a second backward after an in-place
change refused, no_grad forwards, mixed dtypes, double backward, torch.func.grad/vjp (and vmap's message), the
gradient buffer handed over to .grad without a copy, logits never written, graphs freed without the garbage
collector."""
import pytest
import torch

import fastadvseg as fas
from fastadvseg import _ops
from helpers import BACKEND_CASES, KERNEL_CASES, TinyD, assert_close, ids, make_d_logits, make_logits, make_target


@pytest.fixture
def small(gen):
    shape = (2, 3, 2, 3)
    x = torch.randn(shape, dtype=torch.float64, generator=gen).requires_grad_()
    d = (torch.randn((2, 2, 3), dtype=torch.float64, generator=gen) * 2).requires_grad_()
    t = make_target(shape, "cpu", generator=gen)
    return x, d, t



def test_gradcheck_float64_reference(small):
    x, d, t = small
    w = torch.rand(3, dtype=torch.float64) + 0.5
    mask = torch.tensor([[[True, False, False], [False, True, False]]] * 2)
    checks = {
        "softmax2d": (lambda x: fas.softmax2d(x, backend="reference"), (x,)),
        "ce": (lambda x: fas.cross_entropy2d(x, t, weight=w, backend="reference"), (x,)),
        "ce none": (lambda x: fas.cross_entropy2d(x, t, reduction="none", backend="reference"), (x,)),
        "bce": (lambda d: fas.bce_with_logits2d(d, 0.3, ignore_mask=mask, backend="reference"), (d,)),
        "semi": (lambda x: fas.semi_cross_entropy2d(x, d.detach(), backend="reference"), (x,)),
        "generator labelled": (
            lambda x, d: fas.generator_loss(x, d, t, lambda_adv=0.5, backend="reference").total, (x, d)),
        "generator unlabelled": (
            lambda x, d: fas.generator_loss(x, d, None, lambda_adv=0.5, lambda_semi=0.7, backend="reference").total,
            (x, d)),
        "discriminator": (lambda a, b: fas.discriminator_loss(a, b, ignore_mask_real=mask, backend="reference"), (d, d)),
    }
    for name, (fn, inputs) in checks.items():
        assert torch.autograd.gradcheck(fn, inputs), name



def _shared_logits_loss(x, t, d_net, backend):
    """One logits tensor feeding generator_loss, softmax2d -> D, and a plain cross-entropy on top."""
    p = fas.softmax2d(x, backend=backend)
    out = fas.generator_loss(x, d_net(p), t, lambda_adv=0.5, backend=backend)
    extra = fas.cross_entropy2d(x, t, reduction="sum", backend=backend) * 0.01
    plain = torch.nn.functional.cross_entropy(x.float(), t, ignore_index=255) * 0.3  # a PyTorch op on the same x
    return out.total + extra + plain



@pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_logits_shared_by_several_losses(case, layout, gen):
    backend, device = case
    shape = (2, 5, 3, 7)
    x = make_logits(shape, torch.float32, layout, device, generator=gen)
    before = x.detach().clone()
    t = make_target(shape, device, generator=gen)
    torch.manual_seed(0)
    d_net = TinyD(5).to(device)
    loss = _shared_logits_loss(x, t, d_net, backend)
    (gx,) = torch.autograd.grad(loss, [x])
    assert torch.equal(x.detach(), before), "an op wrote into the logits"
    x_ref = x.detach().clone().requires_grad_()
    loss_ref = _shared_logits_loss(x_ref, t, d_net, "reference")
    (gx_ref,) = torch.autograd.grad(loss_ref, [x_ref])
    assert_close(loss, loss_ref.double(), torch.float32, "shared loss")
    assert_close(gx, gx_ref.double(), torch.float32, "shared grad")



@pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)
def test_retain_graph_backward_twice(case, gen):
    backend, device = case
    shape = (1, 4, 3, 5)
    x = make_logits(shape, torch.float32, "contiguous", device, generator=gen)
    d = make_d_logits((1, 3, 5), torch.float32, device, generator=gen)
    t = make_target(shape, device, generator=gen)
    for make in (lambda: fas.generator_loss(x, d, t, lambda_adv=0.1, backend=backend).total,
                 lambda: fas.generator_loss(x, d, None, lambda_adv=0.1, backend=backend).total,
                 lambda: fas.cross_entropy2d(x, t, backend=backend),
                 lambda: fas.softmax2d(x, backend=backend).pow(2).sum()):
        loss = make()
        g1 = torch.autograd.grad(loss, [x], retain_graph=True)[0].clone()
        g2 = torch.autograd.grad(loss, [x])[0]
        assert torch.equal(g1, g2), "a second backward over the same graph gave a different gradient"



@pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)
def test_retain_graph_backward_twice_on_discriminator_maps(case, gen):
    """The BCE ops hand their gradient buffer to autograd: a second backward must recompute it, not reuse the
    buffer the first one gave away (here accumulated into .grad, i.e. written by autograd)."""
    backend, device = case
    d = make_d_logits((2, 3, 5), torch.float32, device, generator=gen)
    other = make_d_logits((2, 3, 5), torch.float32, device, generator=gen)
    mask = (torch.rand((2, 3, 5), generator=gen) < 0.3).to(device)
    weights = torch.rand((2, 3, 5), generator=gen).to(device)
    for make in (lambda: fas.bce_with_logits2d(d, 1.0, backend=backend),
                 lambda: fas.bce_with_logits2d(d, 0.0, ignore_mask=mask, reduction="sum", backend=backend) * 3,
                 lambda: (fas.bce_with_logits2d(d, 1.0, reduction="none", backend=backend) * weights).sum(),
                 lambda: fas.discriminator_loss(d, other, ignore_mask_real=mask, backend=backend) * 0.5):
        d.grad = other.grad = None
        loss = make()
        loss.backward(retain_graph=True)
        g1 = d.grad.clone()
        loss.backward()
        torch.testing.assert_close(d.grad, 2 * g1)
        d.grad = None
        expected = torch.autograd.grad(make(), [d])[0]
        torch.testing.assert_close(g1, expected)



@pytest.mark.parametrize("case", KERNEL_CASES, ids=ids)
def test_second_backward_after_in_place_change_is_refused(case, gen):
    """The kernel backends hand their gradient buffer to the first backward and relaunch the kernel for a second
    one: if the logits changed in place in between, that would silently give the gradient at other logits."""
    backend, device = case
    shape = (1, 4, 3, 5)
    x = make_logits(shape, torch.float32, "contiguous", device, generator=gen)
    d = make_d_logits((1, 3, 5), torch.float32, device, generator=gen)
    t = make_target(shape, device, generator=gen)
    for make in (lambda: fas.cross_entropy2d(x, t, backend=backend),
                 lambda: fas.generator_loss(x, d, t, lambda_adv=0.1, backend=backend).total):
        loss = make()
        torch.autograd.grad(loss, [x], retain_graph=True)
        with torch.no_grad():
            x.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(loss, [x])



@pytest.mark.parametrize("case", BACKEND_CASES, ids=ids)
def test_no_grad_forward(case, gen):
    backend, device = case
    shape = (1, 4, 3, 5)
    x = make_logits(shape, torch.float32, "contiguous", device, generator=gen)
    t = make_target(shape, device, generator=gen)
    with torch.no_grad():
        loss = fas.cross_entropy2d(x, t, backend=backend)
    assert not loss.requires_grad
    assert_close(loss, fas.cross_entropy2d(x.detach(), t, backend="reference").double(), torch.float32, "no_grad")



@pytest.mark.parametrize("case", KERNEL_CASES, ids=ids)
def test_kernel_backends_handle_mixed_dtypes(case, gen):
    """bf16 logits with a float32 discriminator map (the usual autocast situation)."""
    backend, device = case
    shape = (1, 5, 3, 4)
    x = make_logits(shape, torch.bfloat16, "contiguous", device, generator=gen)
    d = make_d_logits((1, 3, 4), torch.float32, device, generator=gen)
    for t in (make_target(shape, device, generator=gen), None):
        ours = fas.generator_loss(x, d, t, lambda_adv=0.1, backend=backend)
        ref = fas.generator_loss(x, d, t, lambda_adv=0.1, backend="reference")
        for a, b in zip(ours, ref):
            assert_close(a, b.double(), torch.bfloat16, "mixed dtypes")



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
    _, vjp64 = torch.func.vjp(lambda d: fas.discriminator_loss(d, d * 2, backend="reference"), d64.detach())
    want = vjp64(torch.full((), 0.7, dtype=torch.float64, device=device))[0]
    for primal in (d, d.detach()):  # with and without a graph outside the transform
        out, vjp = torch.func.vjp(lambda d: fas.discriminator_loss(d, d * 2, backend=backend), primal)
        assert_close(vjp(torch.full_like(out, 0.7))[0], want, torch.float32, "vjp")
    batch = torch.stack([x, x.flip(0)])
    refused = "fastadvseg.cross_entropy2d: .*torch.vmap.*backend='reference'"
    if backend == "reference":
        torch.vmap(lambda x: fas.cross_entropy2d(x, t, backend=backend))(batch)
    else:
        with pytest.raises(NotImplementedError, match=refused):
            torch.vmap(lambda x: fas.cross_entropy2d(x, t, backend=backend))(batch)
        with pytest.raises(NotImplementedError, match=refused):  # jacrev: a vjp under vmap
            torch.func.jacrev(lambda x: fas.cross_entropy2d(x, t, backend=backend))(x)



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

