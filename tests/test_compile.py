"""torch.compile and torch.export around code that calls the ops, and torch.library.opcheck of every registered
op: no graph break with label validation on, fullgraph compiles, dynamic shapes, the layouts Inductor chooses,
exported programs at other shapes, on every backend (cpu, reference, triton under TRITON_INTERPRET=1; cuda and
triton on a GPU)."""
import pytest
import torch
import torch.nn.functional as F

import fastadvseg as fas
from helpers import BACKEND_CASES, KERNEL_CASES, TinyD, ids, make_d_logits, make_logits, make_target

OPS = torch.ops.fastadvseg



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


def _store_flags(op) -> list:
    """Positions of the op's arguments that ask a kernel to store a gradient."""
    return [i for i, a in enumerate(op._schema.arguments) if a.name.startswith("store_grad")]


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
            op = getattr(OPS, name).default
            flags = _store_flags(op)
            stores = any(args[i] for i in flags)
            utils = ("test_schema", "test_autograd_registration", "test_faketensor") + \
                (() if stores else ("test_aot_dispatch_dynamic",))
            torch.library.opcheck(op, args, test_utils=utils)
            if stores:  # the same call without stored gradients, through AOT dispatch
                args = tuple(False if i in flags else a for i, a in enumerate(args))
                torch.library.opcheck(op, args, test_utils="test_aot_dispatch_dynamic")


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



def _train_step(x, d, t, backend):
    out = fas.generator_loss(x, d, t, lambda_adv=0.01, backend=backend)
    return out.total * 2 + fas.discriminator_loss(d.detach(), d, backend=backend)



@pytest.mark.parametrize("case", [c for c in BACKEND_CASES if c[1] == "cpu"], ids=ids)
def test_torch_compile_wraps_the_ops(case, gen):
    """Compiled code that calls our ops works under the aot_eager compiler too (each op one opaque node)."""
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

