"""Autograd behaviour: float64 gradcheck, logits shared by several losses (no in-place corruption of saved
tensors), retain_graph, and torch.compile around code that calls the ops."""
import pytest
import torch

import fastadvseg as fas
from helpers import BACKEND_CASES, KERNEL_CASES, assert_close, ids, make_d_logits, make_logits, make_target


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


class TinyD(torch.nn.Module):
    """A 1x1-conv stand-in for the discriminator, so the adversarial gradient flows back into the logits."""

    def __init__(self, c):
        super().__init__()
        self.conv = torch.nn.Conv2d(c, 1, 1)
        torch.nn.init.normal_(self.conv.weight, std=1.0)

    def forward(self, p):
        return self.conv(p.float())


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


def _train_step(x, d, t, backend):
    out = fas.generator_loss(x, d, t, lambda_adv=0.01, backend=backend)
    return out.total * 2 + fas.discriminator_loss(d.detach(), d, backend=backend)


@pytest.mark.parametrize("case", [c for c in BACKEND_CASES if c[1] == "cpu"], ids=ids)
def test_torch_compile_wraps_the_ops(case, gen):
    """Compiled code that calls our ops works (kernel backends are an explicit graph break, see _dispatch)."""
    backend, device = case
    shape = (2, 3, 4, 5)
    x = make_logits(shape, torch.float32, "contiguous", device, generator=gen)
    d = make_d_logits((2, 4, 5), torch.float32, device, generator=gen).unsqueeze(1)
    t = make_target(shape, device, generator=gen)
    torch._dynamo.reset()
    compiled = torch.compile(_train_step, backend="aot_eager")
    got = compiled(x, d, t, backend)
    want = _train_step(x, d, t, backend)
    gx, gd = torch.autograd.grad(got, [x, d])
    wx, wd = torch.autograd.grad(want, [x, d])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx, wx)
    torch.testing.assert_close(gd, wd)


def test_torch_compile_inductor_default_backend(gen):
    """The default backend under the default inductor compiler, as a user would write it."""
    shape = (2, 3, 4, 5)
    x = make_logits(shape, torch.float32, "contiguous", "cpu", generator=gen)
    t = make_target(shape, "cpu", generator=gen)
    torch._dynamo.reset()
    fn = torch.compile(lambda x, t: fas.cross_entropy2d(x, t) * 3)
    torch.testing.assert_close(fn(x, t), fas.cross_entropy2d(x, t) * 3)


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
