"""The registered ops as the dispatcher sees them: eager calls (which skip the dispatcher) and the registered ops
agree bit for bit, dispatch modes and meta tensors get the registered ops, and the GPU path of the shared rules,
checked on CPU tensors treated as a device's: label errors deferred to the next call without a host read, and the
shared backward's device-side scaling."""
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

