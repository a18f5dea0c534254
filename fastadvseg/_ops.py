"""The registered PyTorch ops (``torch.ops.fastadvseg.*``) of the kernel backends, and their one autograd rule.

Every op is a ``torch.library.custom_op`` with a fake (meta) implementation, so ``torch.compile(fullgraph=True)``
and ``torch.export`` see one opaque node per call. Its device implementation (CPU and CUDA tensors) looks the
``backend`` argument up in the backend table (``fastadvseg/_dispatch.py``) and calls that backend's launch, which
only runs kernels and returns what they computed:

* the loss **sums** and the counts a mean divides by (a float32 vector per op, documented in each schema below);
* the per-pixel loss map for ``reduction="none"``;
* the **gradient buffers** written in the same pass: the gradient of the first sum (``scales[i]`` times it:
  a backend may pre-scale, as ``cpu`` does with 1/count, so that a plain ``loss.backward()`` needs no extra pass);
* the count and first value of bad labels, which :mod:`fastadvseg._labels` turns into the public error.

Written once here, for every backend: the autograd rule (:func:`_backward`): the incoming gradient of the sum
(or of the loss map) times the stored buffer, scaled in place and handed over, so one gradient-sized buffer
exists at peak; a second backward through the same graph (``retain_graph=True``) relaunches the op. Gradients
the kernels do not write (learnt class weights, BCE target maps) and double backward (``create_graph=True``)
differentiate the reference backend's formula on the saved inputs instead, so they work on every backend.
The means themselves are formed from the sums by ``fastadvseg/functional.py``.

The public functions call the ops through :func:`call`: in plain eager code it runs an op's implementation and
autograd rule (the very functions registered with the op) directly, which saves the dispatcher's round trip
through Python on every call; whatever traces or intercepts (``torch.compile``, ``torch.export``, dispatch modes,
fake tensors, subclasses) gets the registered op.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from . import _labels
from . import _validate as V
from ._dispatch import launcher
from .backends import reference

NS = "fastadvseg"
_DEVICES = ("cpu", "cuda")
# Every kernel takes any strides (contiguous and channels_last natively, other layouts copied by its launch) and
# every fake implementation gives the outputs the real one gives for those strides: so compiled code may hand an op
# its inputs in the layout Inductor chose (channels_last after a conv) instead of copying them to the traced one.
_TAGS = (torch.Tag.flexible_layout,)


# ------------------------------------------------------------------------------------ registration, eager calls

_IMPLS: dict = {}  # op name -> its device implementation, a plain function (what the dispatcher runs)
_CUSTOM_OPS: dict = {}  # op name -> its registered op (torch.library.custom_op)
_FUNCTIONS: dict = {}  # op name -> (eager, functorch) autograd.Functions of the op's one autograd rule


def _custom_op(name: str):
    """``torch.library.custom_op`` in our namespace, keeping the plain function for :func:`call`."""
    def register(fn):
        _IMPLS[name] = fn
        _CUSTOM_OPS[name] = torch.library.custom_op(f"{NS}::{name}", mutates_args=(), device_types=_DEVICES,
                                                    tags=_TAGS)(fn)
        return _CUSTOM_OPS[name]
    return register


def _register_autograd(name: str, backward: Callable, setup_context: Callable) -> None:
    """The autograd rule of op ``name``, registered with the op and given to its eager Function: the same two
    functions serve both."""
    _CUSTOM_OPS[name].register_autograd(backward, setup_context=setup_context)

    def vmap(info, in_dims, *args):
        raise NotImplementedError(
            f"fastadvseg.{name}: the fused kernels have no batching rule, so torch.vmap (and jacrev, jacfwd, "
            f"hessian, which use it) cannot run them; under vmap pass backend='reference' (plain PyTorch), or "
            f"compute per-sample losses in a loop (torch.func.grad and vjp work with every backend)")

    impl = _IMPLS[name]

    def forward(ctx, *args):
        out = impl(*args)
        setup_context(ctx, args, out)
        return out

    # Two classes of one rule: autograd.Function.apply binds the arguments to forward's signature (inspect, ~40 us
    # a call) whenever setup_context is a separate method, which functorch requires and plain autograd does not.
    eager = type(f"{NS}_{name}", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward)})
    functorch = type(f"{NS}_{name}_functorch", (torch.autograd.Function,), {
        "forward": staticmethod(impl), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward), "vmap": staticmethod(vmap)})
    _FUNCTIONS[name] = (eager, functorch)


def _plain_eager(args) -> bool:
    """Whether this call can skip the dispatcher: eager code on plain CPU/CUDA tensors, nothing tracing it, no
    mode or tensor subclass that must see the op. Everything else (torch.compile, torch.export, jit tracing,
    fake or meta tensors, subclasses, dispatch and function modes) calls ``torch.ops.fastadvseg.*``."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack() \
            or torch._C._is_torch_function_mode_enabled():
        return False
    for a in args:
        if isinstance(a, Tensor) and (type(a) not in _PLAIN or a.device.type not in _DEVICES):
            return False
    return True


_PLAIN = (Tensor, torch.nn.Parameter)  # Parameter: a marked Tensor, no __torch_function__ of its own (learnt weights)


def call(name: str, *args):
    """``torch.ops.fastadvseg.<name>(*args)``, with the same implementation and autograd rule, but in plain eager
    code without the dispatcher's round trip through Python (measured on 2 CPU cores at a tiny shape, where the
    kernel costs little: cross_entropy2d forward+backward 147 -> 98 us a call, generator_loss 236 -> 164 us).

    An op's device implementation and its autograd rule are one pair of Python functions either way: the
    registered op runs them from the dispatcher, and this runs them directly (through an ``autograd.Function``
    when a gradient is wanted). It also makes ``torch.func.grad``/``vjp`` work in eager code."""
    functions = _FUNCTIONS.get(name)
    functorch = torch._C._are_functorch_transforms_active()  # torch.func.grad, vjp, vmap: their wrapped tensors
    if not _plain_eager(args) or (functorch and functions is None):
        return getattr(torch.ops.fastadvseg, name)(*args)
    if functions is not None and (functorch or (torch.is_grad_enabled() and any(
            isinstance(a, Tensor) and a.requires_grad for a in args))):
        return functions[functorch].apply(*args)
    return _IMPLS[name](*args)


def _empty(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The stand-in of an output a call did not ask for (custom ops return tensors, never None)."""
    return like.new_empty((0,), dtype=dtype or like.dtype)


def _or_empty(t: Optional[Tensor], like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return _empty(like, dtype) if t is None else t


def _map_grad(grad: Optional[Tensor], d: Tensor) -> Tensor:
    """A discriminator map's gradient as every backend returns it: contiguous (N, H, W), in d's dtype."""
    if grad is None:
        return _empty(d)
    return grad.to(d.dtype).contiguous()


def _grad_like(x: Tensor) -> Tensor:
    return torch.empty_like(x)


def _loss_map(x: Tensor, per_pixel: bool) -> Tensor:
    n, _, h, w = x.shape
    return x.new_empty((n, h, w) if per_pixel else (0,), dtype=torch.float32)


# --------------------------------------------------------------------------------------------- the autograd rule

_ONE_WITHIN = 2.0 ** -22  # two float32 ulps above 1


def _scaled(buffer: Optional[Tensor], scale: Tensor, upstream: Optional[Tensor]) -> Optional[Tensor]:
    """``buffer`` (scale x the gradient of a sum) times ``upstream`` (the gradient of that sum, 0-dim, or of the
    per-pixel map), in place: the buffer itself becomes the input's gradient."""
    if buffer is None or upstream is None:
        return None
    if upstream.dim() == 0 and type(buffer) is Tensor and buffer.device.type not in _labels.ASYNC_DEVICE_TYPES:
        # eager, where reading the numbers never waits for a device: the common loss.backward() of a pre-scaled
        # gradient finds a factor of 1 and skips the pass over the buffer. "1" within two float32 roundings: the
        # backend and autograd may form k / count in different orders, and the buffer is float32-accurate anyway.
        up, pre = float(upstream), float(scale)
        factor = up / pre if pre != 0 else up
        return buffer if abs(factor - 1.0) <= _ONE_WITHIN else buffer.mul_(factor)
    factor = upstream if upstream.dim() else torch.where(scale != 0, upstream / scale, upstream)
    if type(buffer) is not Tensor:
        # Traced (torch.compile's backward graph works on functional/fake tensors): out of place. Scaling a saved
        # forward output in place gave wrong gradients under Inductor (torch 2.13, when another branch of the graph
        # was live); a product is what the compiler fuses anyway.
        return buffer * (factor.unsqueeze(1) if buffer.dim() == factor.dim() + 1 else factor)
    if factor.dim() == 0:
        return buffer.mul_(factor)
    return buffer.mul_(factor.unsqueeze(1) if buffer.dim() == factor.dim() + 1 else factor)


class _Op:
    """What the autograd rule needs to know about one registered loss op."""

    def __init__(self, name: str, reference_outputs: Callable, grad_of: dict, stores: dict,
                 differentiable: Tuple[int, ...]):
        self.name = name
        self.reference_outputs = reference_outputs  # (op inputs) -> the differentiable outputs, by the reference
        self.grad_of = grad_of  # input index -> (index of its buffer, index of the sum it is the gradient of)
        self.stores = stores  # input index -> index of the op's "store this gradient" flag
        self.differentiable = differentiable  # output indices that carry gradient (the rest are buffers/scales)

    def register(self, buffer_outputs: Tuple[int, ...], scales_output: int, validate_arg: Optional[int]):
        self.buffer_outputs, self.scales_output, self.validate_arg = buffer_outputs, scales_output, validate_arg

        def setup_context(ctx, inputs, output):
            ctx.set_materialize_grads(False)
            ctx.mark_non_differentiable(*(output[i] for i in buffer_outputs), output[scales_output])
            ctx.save_for_backward(*(a for a in inputs if isinstance(a, Tensor)))
            ctx.template = [_SAVED if isinstance(a, Tensor) else a for a in inputs]
            ctx.spec = self
            # the buffers the call was asked to store (the others are stand-ins). Nothing on ctx refers back to
            # ctx: a cycle would keep the buffers alive until the garbage collector runs, so every call would get
            # fresh pages from the OS (measured: 8 ms instead of 1.6 ms per cross_entropy2d at N=2, C=21, 321x321)
            ctx.stored_flags = [False] * len(buffer_outputs)
            for i, (b, _) in self.grad_of.items():
                ctx.stored_flags[b] = bool(inputs[self.stores[i]])
            ctx.buffers = self._buffers(ctx, output)
            ctx.scales = output[scales_output]

        _register_autograd(self.name, _backward, setup_context)

    def _buffers(self, ctx, output) -> List[Optional[Tensor]]:
        return [output[j] if ctx.stored_flags[b] else None for b, j in enumerate(self.buffer_outputs)]

    def take(self, ctx) -> Tuple[List[Optional[Tensor]], Tensor]:
        """The gradient buffers the forward call wrote, handed over once; a second backward (``retain_graph``)
        relaunches the op, since autograd may own (and have changed) the first buffers."""
        if ctx.buffers is not None:
            buffers, ctx.buffers = ctx.buffers, None
            return buffers, ctx.scales
        args = _inputs(ctx)
        for i, flag in self.stores.items():
            args[flag] = ctx.needs_input_grad[i]
        if self.validate_arg is not None:
            args[self.validate_arg] = False  # (reported by the first call)
        with torch.no_grad():
            out = call(self.name, *args)
        return self._buffers(ctx, out), out[self.scales_output]


_SAVED = object()  # where a tensor input sits in ctx.template


def _inputs(ctx) -> list:
    """The op's inputs as they were (the saved tensors: autograd refuses them if changed in place since)."""
    saved = iter(ctx.saved_tensors)
    return [next(saved) if a is _SAVED else a for a in ctx.template]


def _backward(ctx, *grads):
    spec: _Op = ctx.spec
    _labels.check_pending()
    need = ctx.needs_input_grad
    result: list = [None] * len(need)
    if torch.is_grad_enabled():  # create_graph=True: every gradient from the (differentiable) reference formula
        by_reference = [i for i, n in enumerate(need) if n]
    else:
        kernel_inputs = [i for i in spec.grad_of if need[i]]
        if kernel_inputs:
            buffers, scales = spec.take(ctx)
            # the gradient of the loss map (reduction="none"; its stored gradient is not pre-scaled) and of the sum
            per_pixel = grads[1] if len(spec.differentiable) > 1 and grads[1] is not None and grads[1].dim() == 3 \
                else None
            for i in kernel_inputs:
                b, sum_index = spec.grad_of[i]
                upstream = per_pixel
                if grads[0] is not None:
                    upstream = grads[0][sum_index] if upstream is None else upstream + grads[0][sum_index]
                result[i] = _scaled(buffers[b], scales[b], upstream)
        # learnt class weights, BCE target maps: rare, from the reference formula
        by_reference = [i for i, n in enumerate(need) if n and i not in spec.grad_of]
    if by_reference:
        for i, g in zip(by_reference, _reference_vjp(ctx, grads, by_reference)):
            result[i] = g
    return tuple(result)


def _reference_vjp(ctx, grads, wanted: List[int]) -> list:
    """Gradients of the op's differentiable outputs w.r.t. its inputs ``wanted`` (in that order), through the
    reference formula.

    With grad mode on (``create_graph=True``) the saved inputs keep their graph, so the result is differentiable
    again; otherwise the wanted inputs are fresh leaves and nothing else is differentiated.
    """
    spec: _Op = ctx.spec
    args = _inputs(ctx)
    create = torch.is_grad_enabled()
    if not create:
        args = [a.detach() if isinstance(a, Tensor) else a for a in args]
        for i in wanted:
            args[i] = args[i].requires_grad_()
    else:  # fresh views: gradients w.r.t. them are this op's partial derivatives (an input may depend on another)
        for i in wanted:
            args[i] = args[i].view_as(args[i])
    with torch.enable_grad():
        outs = spec.reference_outputs(*args)
    pairs = [(o, g) for o, g in zip(outs, (grads[i] for i in spec.differentiable)) if g is not None and o is not None]
    if not pairs:
        return [None] * len(wanted)
    got = torch.autograd.grad([o for o, _ in pairs], [args[i] for i in wanted], [g.to(o.dtype) for o, g in pairs],
                              create_graph=create, allow_unused=True)
    return [None if g is None else g.to(args[i].dtype) for i, g in zip(wanted, got)]


def _launch(backend: str):
    _labels.check_pending()
    return launcher(backend)


def _launch_for(backend: str, first: Tensor, name: str, dims: int = 4):
    """The backend's launch module, after checking the op's first tensor (its logits, or its (N, H, W) D map):
    its dimensions, a dtype the backend runs and a device it runs on. Returns (module, (N, H, W))."""
    module = _launch(backend)
    V.check_tensor(first, name)
    if first.dim() != dims:
        raise ValueError(f"{name} must be {'4-D (N, C, H, W)' if dims == 4 else '(N, H, W)'}, got shape "
                         f"{tuple(first.shape)}")
    if first.dtype not in module.DTYPES:
        runs = ", ".join(str(d).replace("torch.", "") for d in module.DTYPES)
        raise TypeError(f"{name} must be {runs} for backend '{backend}', got {first.dtype}")
    if not module.supports_device(first.device):
        raise ValueError(f"backend '{backend}' does not run tensors on {first.device} ({name})")
    n_h_w = tuple(first.shape) if dims == 3 else (first.shape[0], first.shape[2], first.shape[3])
    return module, n_h_w


# ----------------------------------------------------------------------------------------------------- softmax2d

@_custom_op("softmax2d")
def softmax2d(logits: Tensor, backend: str) -> Tensor:
    """Channel softmax of (N, C, H, W) logits, in their dtype; dense layouts keep their memory format."""
    module, _ = _launch_for(backend, logits, "logits")
    return module.softmax2d(logits)


@softmax2d.register_fake
def _(logits, backend):
    return torch.empty_like(logits)


@_custom_op("softmax2d_backward")
def softmax2d_backward(probs: Tensor, grad_probs: Tensor, backend: str) -> Tensor:
    """p * (g - sum_c p g), from the saved probabilities p."""
    module, _ = _launch_for(backend, probs, "probs")
    V.op_same(grad_probs, probs, "grad_probs", "probs")
    return module.softmax2d_backward(probs, grad_probs.to(probs.dtype))


@softmax2d_backward.register_fake
def _(probs, grad_probs, backend):
    return torch.empty_like(probs)


def _softmax_setup(ctx, inputs, output):
    ctx.save_for_backward(output)
    ctx.backend = inputs[1]


def _softmax_backward(ctx, grad_probs):
    (p,) = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: the same formula in differentiable torch ops, in float32
        # as the kernels compute it (in float16/bfloat16 arithmetic the channel sum alone misses their tolerance)
        p32, g = p.float(), grad_probs.float()
        return (p32 * (g - (p32 * g).sum(1, keepdim=True))).to(p.dtype), None
    return call("softmax2d_backward", p, grad_probs, ctx.backend), None


_register_autograd("softmax2d", _softmax_backward, _softmax_setup)


# ----------------------------------------------------------------------------------------------- cross_entropy2d

@_custom_op("cross_entropy2d")
def cross_entropy2d(logits: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                    label_smoothing: float, reduction: str, store_grad: bool, validate: bool,
                    backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (sums = [loss sum, sum of w[y] over counted pixels], loss map (N, H, W) for reduction "none",
    gradient of the loss sum (x scales[0]) if store_grad, scales (1,))."""
    module, n_h_w = _launch_for(backend, logits, "logits")
    V.op_labels(target, n_h_w, logits.device)
    V.op_weight(weight, logits.shape[1], logits.device)
    out = module.cross_entropy2d(logits, target, weight, ignore_index, label_smoothing, reduction, store_grad)
    if validate:
        _labels.report(out.bad, logits.shape[1], ignore_index, device=logits.device)
    return out.sums, _or_empty(out.loss_map, logits, torch.float32), _or_empty(out.grad, logits), out.scales


@cross_entropy2d.register_fake
def _(logits, target, weight, ignore_index, label_smoothing, reduction, store_grad, validate, backend):
    grad = _grad_like(logits) if store_grad else _empty(logits)
    return (logits.new_empty((2,), dtype=torch.float32), _loss_map(logits, reduction == "none"), grad,
            logits.new_empty((1,), dtype=torch.float32))


def _ce_reference(logits, target, weight, ignore_index, label_smoothing, reduction, store_grad, validate, backend):
    return reference.cross_entropy2d(logits, target, weight, ignore_index, label_smoothing)


_Op("cross_entropy2d", _ce_reference, grad_of={0: (0, 0)}, stores={0: 6}, differentiable=(0, 1)).register(
    buffer_outputs=(2,), scales_output=3, validate_arg=7)


# --------------------------------------------------------------------------------------------- bce_with_logits2d

@_custom_op("bce_with_logits2d")
def bce_with_logits2d(d_logits: Tensor, target_map: Optional[Tensor], target_value: float,
                      ignore_mask: Optional[Tensor], reduction: str, store_grad: bool,
                      backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (sums = [loss sum, counted pixels], loss map for "none", gradient of the loss sum, scales (1,)).

    ``d_logits`` (N, H, W); ``target_map`` an (N, H, W) float map or None for the constant ``target_value``."""
    module, n_h_w = _launch_for(backend, d_logits, "d_logits", dims=3)
    if target_map is not None:
        V.op_float_map(target_map, n_h_w, d_logits.device, "target_map", "d_logits")
    V.op_mask(ignore_mask, n_h_w, d_logits.device, ref_name="d_logits")
    out = module.bce_with_logits2d(d_logits, target_map, target_value, ignore_mask, reduction, store_grad)
    return (out.sums, _or_empty(out.loss_map, d_logits, torch.float32), _map_grad(out.grad, d_logits), out.scales)


@bce_with_logits2d.register_fake
def _(d_logits, target_map, target_value, ignore_mask, reduction, store_grad, backend):
    loss_map = d_logits.new_empty(tuple(d_logits.shape) if reduction == "none" else (0,), dtype=torch.float32)
    grad = d_logits.new_empty(d_logits.shape) if store_grad else _empty(d_logits)
    return d_logits.new_empty((2,), dtype=torch.float32), loss_map, grad, d_logits.new_empty((1,), dtype=torch.float32)


def _bce_reference(d_logits, target_map, target_value, ignore_mask, reduction, store_grad, backend):
    return reference.bce_with_logits2d(d_logits, target_map, target_value, ignore_mask)


_Op("bce_with_logits2d", _bce_reference, grad_of={0: (0, 0)}, stores={0: 5}, differentiable=(0, 1)).register(
    buffer_outputs=(2,), scales_output=3, validate_arg=None)


# ------------------------------------------------------------------------------------------ semi_cross_entropy2d

@_custom_op("semi_cross_entropy2d")
def semi_cross_entropy2d(logits: Tensor, d_logits: Tensor, threshold: float, ignore_mask: Optional[Tensor],
                         reduction: str, store_grad: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (sums = [loss sum, kept pixels, considered pixels], loss map for "none", gradient of the loss sum,
    scales (1,)). ``d_logits`` and the pseudo-labels are constants: no gradient for d_logits."""
    module, n_h_w = _launch_for(backend, logits, "logits")
    V.op_float_map(d_logits, n_h_w, logits.device, "d_logits")
    V.op_mask(ignore_mask, n_h_w, logits.device)
    out = module.semi_cross_entropy2d(logits, d_logits, threshold, ignore_mask, reduction, store_grad)
    return out.sums, _or_empty(out.loss_map, logits, torch.float32), _or_empty(out.grad, logits), out.scales


@semi_cross_entropy2d.register_fake
def _(logits, d_logits, threshold, ignore_mask, reduction, store_grad, backend):
    grad = _grad_like(logits) if store_grad else _empty(logits)
    return (logits.new_empty((3,), dtype=torch.float32), _loss_map(logits, reduction == "none"), grad,
            logits.new_empty((1,), dtype=torch.float32))


def _semi_reference(logits, d_logits, threshold, ignore_mask, reduction, store_grad, backend):
    return reference.semi_cross_entropy2d(logits, d_logits, threshold, ignore_mask)


_Op("semi_cross_entropy2d", _semi_reference, grad_of={0: (0, 0)}, stores={0: 5}, differentiable=(0, 1)).register(
    buffer_outputs=(2,), scales_output=3, validate_arg=None)


# ------------------------------------------------------------------------------------------------ generator_loss

@_custom_op("generator_loss")
def generator_loss(logits: Tensor, d_logits: Tensor, target: Optional[Tensor], lambda_adv: float,
                   lambda_semi: float, threshold: float, ignore_index: int, store_grad_logits: bool,
                   store_grad_d: bool, validate: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (sums = [term sum, term count, adv sum, adv count, kept, considered], gradient of the term sum,
    gradient of the adv sum, scales (2,)).

    The term is the cross-entropy (labelled: ``target`` given) or L_semi (unlabelled). The lambdas are the weights
    the caller gives the terms: a backend may pre-scale its stored gradients by them."""
    module, n_h_w = _launch_for(backend, logits, "logits")
    V.op_float_map(d_logits, n_h_w, logits.device, "d_logits")
    if target is not None:
        V.op_labels(target, n_h_w, logits.device)
    out = module.generator_loss(logits, d_logits, target, lambda_adv, lambda_semi, threshold, ignore_index,
                                store_grad_logits, store_grad_d)
    if validate and target is not None:
        _labels.report(out.bad, logits.shape[1], ignore_index, device=logits.device)
    return out.sums, _or_empty(out.grad, logits), _map_grad(out.grad_d, d_logits), out.scales


@generator_loss.register_fake
def _(logits, d_logits, target, lambda_adv, lambda_semi, threshold, ignore_index, store_grad_logits, store_grad_d,
      validate, backend):
    gx = _grad_like(logits) if store_grad_logits else _empty(logits)
    gz = d_logits.new_empty(d_logits.shape) if store_grad_d else _empty(d_logits)
    return logits.new_empty((6,), dtype=torch.float32), gx, gz, logits.new_empty((2,), dtype=torch.float32)


def _generator_reference(logits, d_logits, target, lambda_adv, lambda_semi, threshold, ignore_index, *_):
    return (reference.generator_loss(logits, d_logits, target, threshold, ignore_index),)


_Op("generator_loss", _generator_reference, grad_of={0: (0, 0), 1: (1, 2)}, stores={0: 7, 1: 8},
    differentiable=(0,)).register(buffer_outputs=(1, 2), scales_output=3, validate_arg=9)


# -------------------------------------------------------------------------------------------- discriminator_loss

@_custom_op("discriminator_loss")
def discriminator_loss(d_fake: Tensor, d_real: Tensor, ignore_mask_fake: Optional[Tensor],
                       ignore_mask_real: Optional[Tensor], store_grad_fake: bool, store_grad_real: bool,
                       backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (sums = [fake sum, fake count, real sum, real count] of BCE(d_fake, 0) and BCE(d_real, 1), gradient of
    the fake sum, gradient of the real sum, scales (2,))."""
    module, fake_n_h_w = _launch_for(backend, d_fake, "d_fake", dims=3)
    _, real_n_h_w = _launch_for(backend, d_real, "d_real", dims=3)
    V.check_same_device_as(d_real, d_fake.device, "d_real")
    V.op_mask(ignore_mask_fake, fake_n_h_w, d_fake.device, "ignore_mask_fake", "d_fake")
    V.op_mask(ignore_mask_real, real_n_h_w, d_fake.device, "ignore_mask_real", "d_real")
    out = module.discriminator_loss(d_fake, d_real, ignore_mask_fake, ignore_mask_real, store_grad_fake,
                                    store_grad_real)
    return out.sums, _map_grad(out.grad_fake, d_fake), _map_grad(out.grad_real, d_real), out.scales


@discriminator_loss.register_fake
def _(d_fake, d_real, ignore_mask_fake, ignore_mask_real, store_grad_fake, store_grad_real, backend):
    gf = d_fake.new_empty(d_fake.shape) if store_grad_fake else _empty(d_fake)
    gr = d_real.new_empty(d_real.shape) if store_grad_real else _empty(d_real)
    return d_fake.new_empty((4,), dtype=torch.float32), gf, gr, d_fake.new_empty((2,), dtype=torch.float32)


def _discriminator_reference(d_fake, d_real, ignore_mask_fake, ignore_mask_real, *_):
    return (reference.discriminator_loss(d_fake, d_real, ignore_mask_fake, ignore_mask_real),)


_Op("discriminator_loss", _discriminator_reference, grad_of={0: (0, 0), 1: (1, 2)}, stores={0: 4, 1: 5},
    differentiable=(0,)).register(buffer_outputs=(1, 2), scales_output=3, validate_arg=None)


# ----------------------------------------------------------------------------------------------------- one_hot2d

@_custom_op("one_hot2d")
def one_hot2d(target: Tensor, num_classes: int, ignore_index: int, dtype: torch.dtype, validate: bool,
              backend: str) -> Tensor:
    """(N, H, W) labels -> contiguous (N, C, H, W) one-hot of ``dtype``; ignored pixels all zero."""
    module = _launch(backend)
    V.check_tensor(target, "target")
    if target.dim() != 3:
        raise ValueError(f"target must be (N, H, W), got shape {tuple(target.shape)}")
    V.op_labels(target, tuple(target.shape), target.device)
    if not module.supports_device(target.device):
        raise ValueError(f"backend '{backend}' does not run tensors on {target.device} (target)")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    if validate:
        find = getattr(module, "find_bad_labels", _labels.find_bad_labels)
        _labels.report(find(target, num_classes, ignore_index), num_classes, ignore_index, device=target.device)
    return module.one_hot2d(target, num_classes, ignore_index, dtype)


@one_hot2d.register_fake
def _(target, num_classes, ignore_index, dtype, validate, backend):
    n, h, w = target.shape
    return target.new_empty((n, num_classes, h, w), dtype=dtype)
