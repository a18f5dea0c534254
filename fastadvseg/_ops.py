"""The registered PyTorch ops ``torch.ops.fastadvseg.*``: one block per op, with its schema, device implementation,
fake implementation and autograd rule.

The public functions (``fastadvseg/functional.py``) call the module attributes defined here (``_ops.generator_loss``
is ``torch.ops.fastadvseg.generator_loss.default``), so every call, eager or traced, goes through the dispatcher:

* **Autograd** key: the op's rule (:class:`_StoredGradientRule` for the losses, :class:`_SoftmaxRule`), one
  ``autograd.Function`` per op, which also serves ``torch.func.grad``/``vjp``; ``torch.vmap`` gets a clear
  error. Without a gradient to record, the call passes straight on to the keys below.
* **CPU/CUDA** keys: the device implementation. It checks what the kernels will read (the ops are a public entry
  point too), calls ``launcher(backend).<op>(...)`` (the backend table of ``fastadvseg/_dispatch.py``; what a
  launch receives and returns is written in ``fastadvseg/backends/_launch.py``) and hands the bad-label report to
  :mod:`fastadvseg._labels`.
* **Meta** key / fake tensors: the fake implementation, so ``torch.compile(fullgraph=True)`` and ``torch.export``
  see one opaque node per call.

The rule of a loss, written once for every kernel backend: the kernel wrote the gradient of a loss sum in the
forward pass; backward multiplies it by the incoming gradient of that sum (or of the loss map) in place and hands
the buffer over, so one gradient-sized buffer exists at peak. A second backward through the same graph
(``retain_graph=True``) relaunches the op. Gradients the kernels do not write (learnt class weights, BCE target
maps) and double backward (``create_graph=True``) differentiate the reference backend's formula on the saved
inputs instead, so they work on every backend. The means are formed from the sums by ``functional.py``.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch._functorch.utils import enable_single_level_autograd_function as _single_level_autograd_function

from . import _labels
from . import _validate as V
from ._dispatch import launcher
from .backends import reference

NS = "fastadvseg"
_LIB = torch.library.Library(NS, "DEF")
# Every kernel takes any strides (contiguous and channels_last natively, other layouts copied by its launch) and
# every fake implementation gives the outputs the real one gives for those strides: so compiled code may hand an op
# its inputs in the layout Inductor chose (channels_last after a conv) instead of copying them to the traced one.
_TAGS = (torch.Tag.flexible_layout,)
_BELOW_AUTOGRAD = torch._C._after_autograd_keyset


# ------------------------------------------------------------------------------------------------- registration

def _define(schema: str) -> torch._ops.OpOverload:
    """Declare ``fastadvseg::<schema>``; returns the op to call (``torch.ops.fastadvseg.<name>.default``)."""
    _LIB.define(schema, tags=_TAGS)
    return getattr(getattr(torch.ops, NS), schema.split("(", 1)[0]).default


def _device(op: torch._ops.OpOverload):
    """Decorator: ``fn`` runs ``op`` on CPU and CUDA tensors."""
    def register(fn: Callable) -> Callable:
        for key in ("CPU", "CUDA"):
            _LIB.impl(op._schema.name, fn, key)
        return fn
    return register


def _fake(op: torch._ops.OpOverload):
    """Decorator: ``fn`` gives ``op``'s outputs on fake and meta tensors (shapes, dtypes, strides)."""
    return lambda fn: torch.library.register_fake(op, fn, lib=_LIB)


def _op_name(op: torch._ops.OpOverload) -> str:
    return op._schema.name.split("::", 1)[1]


def _index(names: Sequence[str], name: str, what: str, op: torch._ops.OpOverload) -> int:
    if name not in names:
        raise ValueError(f"{op._schema.name} has no {what} named {name!r} ({', '.join(names)})")
    return list(names).index(name)


class _Rule:
    """An op's autograd rule (``setup_context`` and ``backward`` of an ``autograd.Function``), registered as the
    op's Autograd kernel when constructed."""

    def __init__(self, op: torch._ops.OpOverload):
        self.op = op
        self.arg_names = [a.name for a in op._schema.arguments]
        self.output_names = [r.name for r in op._schema.returns]

        def forward(*args):
            with torch._C._AutoDispatchBelowAutograd():
                return op(*args)

        def vmap(info, in_dims, *args):
            raise self.no_batching_rule()

        # One Function per op, named after it: autograd's node is "fastadvseg_<op>Backward". It is applied by
        # autograd's C++ core directly: Function.apply would bind the arguments to forward's signature (inspect,
        # on every call) and, under torch.func, hand the call to functorch's own dispatch, which cannot run from
        # inside an op's kernel. Under torch.func.grad/vjp this kernel runs at the transform's level, on its wrapped
        # tensors, as the autograd kernel of any op does, so the node is recorded at that level.
        function = type(f"{NS}_{_op_name(op)}", (torch.autograd.Function,), {
            "forward": staticmethod(forward), "setup_context": staticmethod(self.setup_context),
            "backward": staticmethod(self.backward)})
        apply = super(torch.autograd.Function, function).apply

        def autograd_kernel(keyset, *args):
            if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
                if torch._C._are_functorch_transforms_active():
                    with _single_level_autograd_function():
                        return apply(*args)
                return apply(*args)
            return op.redispatch(keyset & _BELOW_AUTOGRAD, *args)

        _LIB.impl(op._schema.name, autograd_kernel, "Autograd", with_keyset=True)
        torch.library.register_vmap(op, vmap, lib=_LIB)

    def arg(self, name: str) -> int:
        """The position of the op's argument ``name``."""
        return _index(self.arg_names, name, "argument", self.op)

    def output(self, name: str) -> int:
        """The position of the op's output ``name``."""
        return _index(self.output_names, name, "output", self.op)

    def no_batching_rule(self) -> NotImplementedError:
        return NotImplementedError(
            f"fastadvseg.{_op_name(self.op)}: the fused kernels have no batching rule, so torch.vmap (and jacrev, "
            f"jacfwd, hessian, which use it) cannot run them; under vmap pass backend='reference' (plain PyTorch), "
            f"or compute per-sample losses in a loop (torch.func.grad and vjp work with every backend)")

    def setup_context(self, ctx, inputs: tuple, output) -> None:
        raise NotImplementedError

    def backward(self, ctx, *grads):
        raise NotImplementedError


# --------------------------------------------------------------------------------------------- the losses' rule

class _StoredGrad(NamedTuple):
    """A gradient the kernel writes in the forward pass: the output ``buffer`` holds the gradient of the sum named
    ``of_sum`` w.r.t. the input ``input`` (times ``scales[k]`` for the op's k-th stored gradient), written when the
    bool argument ``asked_by`` is true."""
    input: str
    buffer: str
    of_sum: str
    asked_by: str


class _StoredGradientRule(_Rule):
    """The autograd rule of a loss op whose kernels write gradients in the forward pass.

    ``sums`` names the entries of the op's output ``sums``; ``stored`` lists the gradients the kernels write, and
    the output ``scales`` their scales; ``loss_map`` is the output of per-pixel losses (``reduction="none"``), if
    any, whose incoming gradient multiplies a stored gradient pixel by pixel; ``validation_flag`` is the argument
    that asks for label validation, switched off when backward relaunches the op (the first call reported).
    ``reference(**arguments)`` returns the differentiable outputs (sums, and the loss map if any) by the reference
    formula: gradients the kernels do not store, and every gradient under ``create_graph=True``, come from it."""

    def __init__(self, op: torch._ops.OpOverload, *, sums: Sequence[str], stored: Sequence[_StoredGrad],
                 reference: Callable, loss_map: Optional[str] = None, validation_flag: Optional[str] = None):
        super().__init__(op)
        self.inputs = [self.arg(s.input) for s in stored]
        self.asked_by = [self.arg(s.asked_by) for s in stored]
        self.buffers = [self.output(s.buffer) for s in stored]
        self.of_sums = [_index(sums, s.of_sum, "sum", op) for s in stored]
        self.sums, self.scales = self.output("sums"), self.output("scales")
        self.loss_map = None if loss_map is None else self.output(loss_map)
        self.validation_flag = None if validation_flag is None else self.arg(validation_flag)
        self.reference = reference
        # the outputs that carry gradient, in the order reference() returns them
        self.differentiable = [self.sums] + ([] if self.loss_map is None else [self.loss_map])

    def setup_context(self, ctx, inputs: tuple, output) -> None:
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*(output[b] for b in self.buffers), output[self.scales])
        ctx.save_for_backward(*(a for a in inputs if isinstance(a, Tensor)))
        ctx.template = [_SAVED if isinstance(a, Tensor) else a for a in inputs]
        # Only what the call was asked to store (the other buffer outputs are stand-ins). Nothing on ctx refers back
        # to ctx: a cycle would keep the buffers alive until the garbage collector runs, so every call would get
        # fresh pages from the OS (measured: 8 ms instead of 1.6 ms per cross_entropy2d at N=2, C=21, 321x321).
        ctx.asked = [bool(inputs[a]) for a in self.asked_by]
        ctx.buffers = self._asked(ctx, output)
        ctx.scales = output[self.scales]

    def _asked(self, ctx, output) -> List[Optional[Tensor]]:
        return [output[b] if asked else None for b, asked in zip(self.buffers, ctx.asked)]

    def _take(self, ctx) -> Tuple[List[Optional[Tensor]], Tensor]:
        """The gradient buffers of the forward call, handed over once; a second backward (``retain_graph``)
        relaunches the op, since autograd may own (and have changed) the first buffers."""
        if ctx.buffers is not None:
            buffers, ctx.buffers = ctx.buffers, None
            return buffers, ctx.scales
        args = _inputs(ctx)
        for i, asked_by in zip(self.inputs, self.asked_by):
            args[asked_by] = ctx.needs_input_grad[i]
        if self.validation_flag is not None:
            args[self.validation_flag] = False
        with torch.no_grad():
            out = self.op(*args)
        return self._asked(ctx, out), out[self.scales]

    def backward(self, ctx, *grads):
        _labels.check_pending()
        need = ctx.needs_input_grad
        result: list = [None] * len(need)
        if torch.is_grad_enabled():  # create_graph=True: every gradient from the (differentiable) reference formula
            by_reference = [i for i, n in enumerate(need) if n]
        else:
            if any(need[i] for i in self.inputs):
                buffers, scales = self._take(ctx)
                # the loss map's gradient (reduction="none", whose stored gradient is not pre-scaled) and the sum's
                per_pixel = None if self.loss_map is None else grads[self.loss_map]
                per_pixel = per_pixel if per_pixel is not None and per_pixel.dim() == 3 else None
                sums = grads[self.sums]
                for k, i in enumerate(self.inputs):
                    if need[i]:
                        upstream = per_pixel
                        if sums is not None:
                            of_sum = sums[self.of_sums[k]]
                            upstream = of_sum if upstream is None else upstream + of_sum
                        result[i] = _scaled(buffers[k], scales[k], upstream)
            # learnt class weights, BCE target maps: rare, from the reference formula
            by_reference = [i for i, n in enumerate(need) if n and i not in self.inputs]
        if by_reference:
            for i, g in zip(by_reference, self._reference_vjp(ctx, grads, by_reference)):
                result[i] = g
        return tuple(result)

    def _reference_vjp(self, ctx, grads, wanted: List[int]) -> list:
        """Gradients of the differentiable outputs w.r.t. the inputs ``wanted`` (in that order), through the
        reference formula.

        With grad mode on (``create_graph=True``) the saved inputs keep their graph, so the result is
        differentiable again; otherwise the wanted inputs are fresh leaves and nothing else is differentiated."""
        args = _inputs(ctx)
        create = torch.is_grad_enabled()
        if not create:
            args = [a.detach() if isinstance(a, Tensor) else a for a in args]
            for i in wanted:
                args[i] = args[i].requires_grad_()
        else:  # fresh views: gradients w.r.t. them are this op's partial derivatives (an input may depend on another)
            for i in wanted:
                view = args[i].view_as(args[i])
                if not view.requires_grad:  # its graph is gone (torch.func.vjp's, once the transform has returned)
                    if torch._C._are_functorch_transforms_active():  # jacrev: that vjp under vmap
                        raise self.no_batching_rule()
                    view = view.detach().requires_grad_()
                args[i] = view
        with torch.enable_grad():
            outs = self.reference(**dict(zip(self.arg_names, args)))
        pairs = [(o, g) for o, g in zip(outs, (grads[i] for i in self.differentiable))
                 if g is not None and o is not None]
        if not pairs:
            return [None] * len(wanted)
        got = torch.autograd.grad([o for o, _ in pairs], [args[i] for i in wanted],
                                  [g.to(o.dtype) for o, g in pairs], create_graph=create, allow_unused=True)
        return [None if g is None else g.to(args[i].dtype) for i, g in zip(wanted, got)]


_SAVED = object()  # where a tensor input sits in ctx.template


def _inputs(ctx) -> list:
    """The op's inputs as they were (the saved tensors: autograd refuses them if changed in place since)."""
    saved = iter(ctx.saved_tensors)
    return [next(saved) if a is _SAVED else a for a in ctx.template]


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


# ------------------------------------------------------------------------------------------ shared by the ops

def _launch_for(backend: str, first: Tensor, name: str, dims: int = 4):
    """The backend's launch module, after checking the op's first tensor (its logits, or its (N, H, W) D map):
    its dimensions, a dtype the backend runs and a device it runs on. Returns (module, (N, H, W))."""
    _labels.check_pending()
    module = launcher(backend)
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


def _empty(like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The stand-in of an output a call did not ask for (ops return tensors, never None)."""
    return like.new_empty((0,), dtype=dtype or like.dtype)


def _or_empty(t: Optional[Tensor], like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return _empty(like, dtype) if t is None else t


def _map_grad_as_output(grad: Optional[Tensor], d: Tensor) -> Tensor:
    """A discriminator map's gradient converted to what the op returns: contiguous (N, H, W) in d's dtype (a
    backend may return it in float32)."""
    if grad is None:
        return _empty(d)
    return grad.to(d.dtype).contiguous()


def _fake_grad(x: Tensor, stored: bool) -> Tensor:
    return torch.empty_like(x) if stored else _empty(x)


def _fake_map_grad(d: Tensor, stored: bool) -> Tensor:
    return d.new_empty(d.shape) if stored else _empty(d)


def _fake_loss_map(first: Tensor, reduction: str) -> Tensor:
    """(N, H, W) float32 for reduction="none" (of the logits or of a D map), else a stand-in."""
    n_h_w = tuple(first.shape) if first.dim() == 3 else (first.shape[0], first.shape[2], first.shape[3])
    return first.new_empty(n_h_w if reduction == "none" else (0,), dtype=torch.float32)


def _fake_vector(like: Tensor, n: int) -> Tensor:
    return like.new_empty((n,), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------- softmax2d

softmax2d = _define("softmax2d(Tensor logits, str backend) -> Tensor")
softmax2d_backward = _define("softmax2d_backward(Tensor probs, Tensor grad_probs, str backend) -> Tensor")


@_device(softmax2d)
def _softmax2d_impl(logits, backend):
    """Channel softmax of (N, C, H, W) logits, in their dtype; dense layouts keep their memory format."""
    module, _ = _launch_for(backend, logits, "logits")
    return module.softmax2d(logits)


@_fake(softmax2d)
def _softmax2d_fake(logits, backend):
    return torch.empty_like(logits)


@_device(softmax2d_backward)
def _softmax2d_backward_impl(probs, grad_probs, backend):
    """p * (g - sum_c p g), from the saved probabilities p."""
    module, _ = _launch_for(backend, probs, "probs")
    V.op_same(grad_probs, probs, "grad_probs", "probs")
    return module.softmax2d_backward(probs, grad_probs.to(probs.dtype))


@_fake(softmax2d_backward)
def _softmax2d_backward_fake(probs, grad_probs, backend):
    return torch.empty_like(probs)


class _SoftmaxRule(_Rule):
    """Backward from the saved probabilities, by the backend's fused kernel (softmax2d_backward)."""

    def setup_context(self, ctx, inputs: tuple, output) -> None:
        ctx.save_for_backward(output)
        ctx.backend = inputs[self.arg("backend")]

    def backward(self, ctx, grad_probs):
        (p,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the same formula in differentiable torch ops, in float32
            # as the kernels compute it (in float16/bfloat16 arithmetic the channel sum alone misses their tolerance)
            p32, g = p.float(), grad_probs.float()
            return (p32 * (g - (p32 * g).sum(1, keepdim=True))).to(p.dtype), None
        return softmax2d_backward(p, grad_probs, ctx.backend), None


_SoftmaxRule(softmax2d)


# ----------------------------------------------------------------------------------------------- cross_entropy2d

cross_entropy2d = _define(
    "cross_entropy2d(Tensor logits, Tensor target, Tensor? weight, int ignore_index, float label_smoothing, "
    "str reduction, bool store_grad, bool validate, str backend) "
    "-> (Tensor sums, Tensor loss_map, Tensor grad, Tensor scales)")


@_device(cross_entropy2d)
def _cross_entropy2d_impl(logits, target, weight, ignore_index, label_smoothing, reduction, store_grad, validate,
                          backend):
    """sums = [loss sum, sum of w[y] over counted pixels]; loss_map (N, H, W) for reduction "none"."""
    module, n_h_w = _launch_for(backend, logits, "logits")
    V.op_labels(target, n_h_w, logits.device)
    V.op_weight(weight, logits.shape[1], logits.device)
    out = module.cross_entropy2d(logits, target, weight, ignore_index, label_smoothing, reduction, store_grad)
    if validate:
        _labels.report(out.bad, logits.shape[1], ignore_index, device=logits.device)
    return out.sums, _or_empty(out.loss_map, logits, torch.float32), _or_empty(out.grad, logits), out.scales


@_fake(cross_entropy2d)
def _cross_entropy2d_fake(logits, target, weight, ignore_index, label_smoothing, reduction, store_grad, validate,
                          backend):
    return (_fake_vector(logits, 2), _fake_loss_map(logits, reduction), _fake_grad(logits, store_grad),
            _fake_vector(logits, 1))


_StoredGradientRule(
    cross_entropy2d, sums=("loss", "weight"), loss_map="loss_map", validation_flag="validate",
    stored=[_StoredGrad(input="logits", buffer="grad", of_sum="loss", asked_by="store_grad")],
    reference=lambda logits, target, weight, ignore_index, label_smoothing, **_: reference.cross_entropy2d(
        logits, target, weight, ignore_index, label_smoothing))


# --------------------------------------------------------------------------------------------- bce_with_logits2d

bce_with_logits2d = _define(
    "bce_with_logits2d(Tensor d_logits, Tensor? target_map, float target_value, Tensor? ignore_mask, "
    "str reduction, bool store_grad, str backend) -> (Tensor sums, Tensor loss_map, Tensor grad, Tensor scales)")


@_device(bce_with_logits2d)
def _bce_with_logits2d_impl(d_logits, target_map, target_value, ignore_mask, reduction, store_grad, backend):
    """sums = [loss sum, counted pixels] over the (N, H, W) ``d_logits``; ``target_map`` an (N, H, W) float map,
    or None for the constant ``target_value``."""
    module, n_h_w = _launch_for(backend, d_logits, "d_logits", dims=3)
    if target_map is not None:
        V.op_float_map(target_map, n_h_w, d_logits.device, "target_map", "d_logits")
    V.op_mask(ignore_mask, n_h_w, d_logits.device, ref_name="d_logits")
    out = module.bce_with_logits2d(d_logits, target_map, target_value, ignore_mask, reduction, store_grad)
    return (out.sums, _or_empty(out.loss_map, d_logits, torch.float32), _map_grad_as_output(out.grad, d_logits),
            out.scales)


@_fake(bce_with_logits2d)
def _bce_with_logits2d_fake(d_logits, target_map, target_value, ignore_mask, reduction, store_grad, backend):
    return (_fake_vector(d_logits, 2), _fake_loss_map(d_logits, reduction), _fake_map_grad(d_logits, store_grad),
            _fake_vector(d_logits, 1))


_StoredGradientRule(
    bce_with_logits2d, sums=("loss", "count"), loss_map="loss_map",
    stored=[_StoredGrad(input="d_logits", buffer="grad", of_sum="loss", asked_by="store_grad")],
    reference=lambda d_logits, target_map, target_value, ignore_mask, **_: reference.bce_with_logits2d(
        d_logits, target_map, target_value, ignore_mask))


# ------------------------------------------------------------------------------------------ semi_cross_entropy2d

semi_cross_entropy2d = _define(
    "semi_cross_entropy2d(Tensor logits, Tensor d_logits, float threshold, Tensor? ignore_mask, str reduction, "
    "bool store_grad, str backend) -> (Tensor sums, Tensor loss_map, Tensor grad, Tensor scales)")


@_device(semi_cross_entropy2d)
def _semi_cross_entropy2d_impl(logits, d_logits, threshold, ignore_mask, reduction, store_grad, backend):
    """sums = [loss sum, kept pixels, considered pixels]. ``d_logits`` and the pseudo-labels are constants: no
    gradient for d_logits."""
    module, n_h_w = _launch_for(backend, logits, "logits")
    V.op_float_map(d_logits, n_h_w, logits.device, "d_logits")
    V.op_mask(ignore_mask, n_h_w, logits.device)
    out = module.semi_cross_entropy2d(logits, d_logits, threshold, ignore_mask, reduction, store_grad)
    return out.sums, _or_empty(out.loss_map, logits, torch.float32), _or_empty(out.grad, logits), out.scales


@_fake(semi_cross_entropy2d)
def _semi_cross_entropy2d_fake(logits, d_logits, threshold, ignore_mask, reduction, store_grad, backend):
    return (_fake_vector(logits, 3), _fake_loss_map(logits, reduction), _fake_grad(logits, store_grad),
            _fake_vector(logits, 1))


_StoredGradientRule(
    semi_cross_entropy2d, sums=("loss", "kept", "considered"), loss_map="loss_map",
    stored=[_StoredGrad(input="logits", buffer="grad", of_sum="loss", asked_by="store_grad")],
    reference=lambda logits, d_logits, threshold, ignore_mask, **_: reference.semi_cross_entropy2d(
        logits, d_logits, threshold, ignore_mask))


# ------------------------------------------------------------------------------------------------ generator_loss

generator_loss = _define(
    "generator_loss(Tensor logits, Tensor d_logits, Tensor? target, float lambda_adv, float lambda_semi, "
    "float threshold, int ignore_index, bool store_grad_logits, bool store_grad_d, bool validate, str backend) "
    "-> (Tensor sums, Tensor grad_logits, Tensor grad_d, Tensor scales)")


@_device(generator_loss)
def _generator_loss_impl(logits, d_logits, target, lambda_adv, lambda_semi, threshold, ignore_index,
                         store_grad_logits, store_grad_d, validate, backend):
    """sums = [term sum, term count, adv sum, adv count, kept, considered]. The term is the cross-entropy
    (labelled: ``target`` given) or L_semi (unlabelled). The lambdas are the weights the caller gives the terms:
    a backend may pre-scale its stored gradients by them."""
    module, n_h_w = _launch_for(backend, logits, "logits")
    V.op_float_map(d_logits, n_h_w, logits.device, "d_logits")
    if target is not None:
        V.op_labels(target, n_h_w, logits.device)
    out = module.generator_loss(logits, d_logits, target, lambda_adv, lambda_semi, threshold, ignore_index,
                                store_grad_logits, store_grad_d)
    if validate and target is not None:
        _labels.report(out.bad, logits.shape[1], ignore_index, device=logits.device)
    return out.sums, _or_empty(out.grad, logits), _map_grad_as_output(out.grad_d, d_logits), out.scales


@_fake(generator_loss)
def _generator_loss_fake(logits, d_logits, target, lambda_adv, lambda_semi, threshold, ignore_index,
                         store_grad_logits, store_grad_d, validate, backend):
    return (_fake_vector(logits, 6), _fake_grad(logits, store_grad_logits), _fake_map_grad(d_logits, store_grad_d),
            _fake_vector(logits, 2))


_StoredGradientRule(
    generator_loss, sums=("term", "term_count", "adv", "adv_count", "kept", "considered"),
    validation_flag="validate",
    stored=[_StoredGrad(input="logits", buffer="grad_logits", of_sum="term", asked_by="store_grad_logits"),
            _StoredGrad(input="d_logits", buffer="grad_d", of_sum="adv", asked_by="store_grad_d")],
    reference=lambda logits, d_logits, target, threshold, ignore_index, **_: (reference.generator_loss(
        logits, d_logits, target, threshold, ignore_index),))


# -------------------------------------------------------------------------------------------- discriminator_loss

discriminator_loss = _define(
    "discriminator_loss(Tensor d_fake, Tensor d_real, Tensor? ignore_mask_fake, Tensor? ignore_mask_real, "
    "bool store_grad_fake, bool store_grad_real, str backend) "
    "-> (Tensor sums, Tensor grad_fake, Tensor grad_real, Tensor scales)")


@_device(discriminator_loss)
def _discriminator_loss_impl(d_fake, d_real, ignore_mask_fake, ignore_mask_real, store_grad_fake, store_grad_real,
                             backend):
    """sums = [fake sum, fake count, real sum, real count] of BCE(d_fake, 0) and BCE(d_real, 1)."""
    module, fake_n_h_w = _launch_for(backend, d_fake, "d_fake", dims=3)
    _, real_n_h_w = _launch_for(backend, d_real, "d_real", dims=3)
    V.check_same_device_as(d_real, d_fake.device, "d_real")
    V.op_mask(ignore_mask_fake, fake_n_h_w, d_fake.device, "ignore_mask_fake", "d_fake")
    V.op_mask(ignore_mask_real, real_n_h_w, d_fake.device, "ignore_mask_real", "d_real")
    out = module.discriminator_loss(d_fake, d_real, ignore_mask_fake, ignore_mask_real, store_grad_fake,
                                    store_grad_real)
    return out.sums, _map_grad_as_output(out.grad_fake, d_fake), _map_grad_as_output(out.grad_real, d_real), \
        out.scales


@_fake(discriminator_loss)
def _discriminator_loss_fake(d_fake, d_real, ignore_mask_fake, ignore_mask_real, store_grad_fake, store_grad_real,
                             backend):
    return (_fake_vector(d_fake, 4), _fake_map_grad(d_fake, store_grad_fake), _fake_map_grad(d_real, store_grad_real),
            _fake_vector(d_fake, 2))


_StoredGradientRule(
    discriminator_loss, sums=("fake", "fake_count", "real", "real_count"),
    stored=[_StoredGrad(input="d_fake", buffer="grad_fake", of_sum="fake", asked_by="store_grad_fake"),
            _StoredGrad(input="d_real", buffer="grad_real", of_sum="real", asked_by="store_grad_real")],
    reference=lambda d_fake, d_real, ignore_mask_fake, ignore_mask_real, **_: (reference.discriminator_loss(
        d_fake, d_real, ignore_mask_fake, ignore_mask_real),))


# ----------------------------------------------------------------------------------------------------- one_hot2d

one_hot2d = _define(
    "one_hot2d(Tensor target, int num_classes, int ignore_index, ScalarType dtype, bool validate, str backend) "
    "-> Tensor")


@_device(one_hot2d)
def _one_hot2d_impl(target, num_classes, ignore_index, dtype, validate, backend):
    """(N, H, W) labels -> contiguous (N, C, H, W) one-hot of ``dtype``; ignored pixels all zero. No gradient."""
    _labels.check_pending()
    module = launcher(backend)
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


@_fake(one_hot2d)
def _one_hot2d_fake(target, num_classes, ignore_index, dtype, validate, backend):
    n, h, w = target.shape
    return target.new_empty((n, num_classes, h, w), dtype=dtype)
