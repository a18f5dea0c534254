"""The registered ops as the dispatcher sees them: the public functions reach them in plain eager code, dispatch
modes and meta tensors get them too, and the GPU path of the shared rules, checked on CPU tensors treated as a
device's: label errors deferred to the next call without a host read, and the shared backward's device-side
scaling."""
import pytest
import torch

import fastadvseg as fas
from fastadvseg import _labels, _ops
from helpers import BACKEND_CASES, KERNEL_CASES, assert_close, ids, make_d_logits, make_logits, make_target


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



def _autograd_nodes(t):
    """The class names of the nodes of t's graph."""
    # the nodes are kept alive while walking: their Python objects are made on demand, and the id of one that is
    # freed may be reused by the next (seen on torch 2.11), which would cut the walk short
    seen, todo = {}, [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = (node, type(node).__name__)
            todo.extend(n for n, _ in node.next_functions)
    return {name for _, name in seen.values()}



@pytest.mark.parametrize("case", KERNEL_CASES, ids=ids)
def test_the_public_function_reaches_the_registered_op_in_plain_eager_code(case, gen, monkeypatch):
    """fastadvseg.functional.generator_loss -> torch.ops.fastadvseg.generator_loss (the dispatcher's record of the
    call, seen by the profiler, which changes no dispatch) -> the op's autograd rule (its node in the graph) -> the
    backend's launch, on plain tensors in eager code: no mode, no tracer, no subclass. Values and gradients are the
    float64 reference's."""
    backend, device = case
    shape = (2, 3, 4, 5)
    x = make_logits(shape, torch.float32, "contiguous", device, generator=gen)
    d = make_d_logits((2, 4, 5), torch.float32, device, generator=gen)
    t = make_target(shape, device, generator=gen)
    launched = []
    real = _ops.launcher
    monkeypatch.setattr(_ops, "launcher", lambda name: launched.append(name) or real(name))
    assert _ops.generator_loss is torch.ops.fastadvseg.generator_loss.default
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fas.functional.generator_loss(x, d, t, lambda_adv=0.1, backend=backend)
    assert "fastadvseg::generator_loss" in {e.name for e in prof.events()}
    assert "fastadvseg_generator_lossBackward" in _autograd_nodes(out.total)
    assert launched == [backend]
    got = torch.autograd.grad(out.total, [x, d])
    x64, d64 = x.detach().double().requires_grad_(), d.detach().double().requires_grad_()
    want = fas.generator_loss(x64, d64, t, lambda_adv=0.1, backend="reference")
    assert_close(out.total, want.total, torch.float32, "total")
    for g, w, what in zip(got, torch.autograd.grad(want.total, [x64, d64]), ("logits", "d_logits")):
        assert_close(g, w, torch.float32, what)



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
    # meta tensors get the fake implementation: the outputs' shapes, no launch
    sums, loss_map, grad, scales = _ops.cross_entropy2d(x.to("meta"), t.to("meta"), None, 255, 0.0, "none", True,
                                                         True, backend)
    assert [tuple(o.shape) for o in (sums, loss_map, grad, scales)] == [(2,), (2, 4, 5), shape, (1,)]
    assert grad.device.type == "meta"

