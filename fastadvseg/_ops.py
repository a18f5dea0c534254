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

Fused upsampling: the ops over logits or discriminator maps end with ``SymInt[]? size=None, bool align_corners=False``
(``softmax2d_backward``: ``low_size``, the logits' own (h, w)). With ``size``, inputs at another spatial size are
read bilinearly upsampled to it (``reference.upsample`` says exactly how); labels, masks, target maps, loss maps and
softmax2d's output are at ``size``, and the stored gradients at their inputs' own (low) resolution. One case of the
rule materialises the full-resolution logits and their gradient: a per-pixel loss map (``reduction="none"``) of
upsampled logits, whose incoming gradient is at full resolution while the stored buffer is not, so it cannot scale
that buffer pixel by pixel; that gradient comes from the reference formula (the public functions then do not ask
the kernel to store one).
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
        # stored inputs read upsampled: their buffers are at their own resolution, not the loss map's
        size = _given(self, inputs, "size") if "size" in self.arg_names else None
        ctx.low_res = [_differs(inputs[i], size) for i in self.inputs]

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
            # the loss map's gradient (reduction="none", whose stored gradient is not pre-scaled) and the sum's
            per_pixel = None if self.loss_map is None else grads[self.loss_map]
            per_pixel = per_pixel if per_pixel is not None and per_pixel.dim() == 3 else None
            # a full-resolution per-pixel gradient cannot scale the buffer of an upsampled input pixel by pixel
            from_buffer = [need[i] and not (per_pixel is not None and low) for i, low in zip(self.inputs, ctx.low_res)]
            if any(from_buffer):
                buffers, scales = self._take(ctx)
                sums = grads[self.sums]
                for k, i in enumerate(self.inputs):
                    if from_buffer[k]:
                        upstream = per_pixel
                        if sums is not None:
                            of_sum = sums[self.of_sums[k]]
                            upstream = of_sum if upstream is None else upstream + of_sum
                        result[i] = _scaled(buffers[k], scales[k], upstream)
            # learnt class weights, BCE target maps, upsampled inputs of a loss map: from the reference formula
            stored = {i for i, b in zip(self.inputs, from_buffer) if b}
            by_reference = [i for i, n in enumerate(need) if n and i not in stored]
        if by_reference:
            for i, g in zip(by_reference, self._reference_vjp(ctx, grads, by_reference)):
                result[i] = g
        return tuple(result)

    def _reference_vjp(self, ctx, grads, wanted: List[int]) -> list:
        """Gradients of the differentiable outputs w.r.t. the inputs ``wanted`` (in that order), through the
        reference formula.

        With grad mode on (``create_graph=True``) the saved inputs keep their graph, so the result is
        differentiable again; otherwise the wanted inputs are fresh leaves and nothing else is differentiated. An
        upsampled input is then a leaf at full resolution, whose gradient is taken back to the input's own by
        :func:`_upsample_adjoint` (deterministic, where F.interpolate's backward on CUDA is not)."""
        args = _inputs(ctx)
        dtypes = [a.dtype if isinstance(a, Tensor) else None for a in args]
        create = torch.is_grad_enabled()
        lifted = {}
        size = _given(self, args, "size") if "size" in self.arg_names else None
        align_corners = bool(_given(self, args, "align_corners", False)) if size is not None else False
        if not create:
            args = [a.detach() if isinstance(a, Tensor) else a for a in args]
            for k, i in enumerate(self.inputs):
                if i in wanted and ctx.low_res[k]:
                    lifted[i] = tuple(args[i].shape[-2:])
                    args[i] = reference.upsample(args[i], size, align_corners)
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
        got = [g if g is None or i not in lifted else _upsample_adjoint(g, lifted[i], align_corners)
               for i, g in zip(wanted, got)]
        return [None if g is None else g.to(dtypes[i]) for i, g in zip(wanted, got)]


def _source_taps(n_in: int, n_out: int, align_corners: bool, device) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(i0, i1, lambda0, lambda1) of each output index of PyTorch's bilinear resize along one axis, ``size`` given
    (no scale factor), computed in float32 as its CPU kernel does."""
    dst = torch.arange(n_out, device=device, dtype=torch.float32)
    if align_corners:
        scale = torch.tensor(n_in - 1, dtype=torch.float32).div(n_out - 1).item() if n_out > 1 else 0.0
        src = dst * scale
    else:
        scale = torch.tensor(n_in, dtype=torch.float32).div(n_out).item()
        src = ((dst + 0.5) * scale - 0.5).clamp_min(0.0)
    i0 = src.floor().long().clamp_max(n_in - 1)
    i1 = (i0 + 1).clamp_max(n_in - 1)
    lambda1 = src - i0
    return i0, i1, 1.0 - lambda1, lambda1


def _upsample_adjoint(grad: Tensor, low_hw: Tuple[int, int], align_corners: bool) -> Tensor:
    """The adjoint of ``reference.upsample`` from ``low_hw``: the gradient of the low-resolution input, given the
    gradient ``grad`` of the (N, C, H, W) or (N, H, W) result. Sums by ``index_add_``, which PyTorch runs
    deterministically under ``torch.use_deterministic_algorithms(True)``."""
    for dim, n_in in zip((grad.dim() - 2, grad.dim() - 1), low_hw):
        n_out = grad.shape[dim]
        if n_out == n_in:
            continue
        i0, i1, lambda0, lambda1 = _source_taps(n_in, n_out, align_corners, grad.device)
        along = [1] * grad.dim()
        along[dim] = n_out
        out = grad.new_zeros(grad.shape[:dim] + (n_in,) + grad.shape[dim + 1:])
        out.index_add_(dim, i0, grad * lambda0.to(grad.dtype).view(along))
        out.index_add_(dim, i1, grad * lambda1.to(grad.dtype).view(along))
        grad = out
    return grad


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

def _differs(x: Tensor, size) -> bool:
    """Whether ``size`` resamples ``x`` (an (N, C, h, w) or (N, h, w) input): given, and not x's own (h, w)."""
    return size is not None and tuple(x.shape[-2:]) != tuple(size)


def _given(rule: _Rule, inputs: tuple, name: str, default=None):
    """The op's argument ``name`` as called (a trailing argument left at its default is not passed)."""
    i = rule.arg(name)
    return inputs[i] if i < len(inputs) else default


def _grid(size, n_h_w: tuple, **resampled: Tensor):
    """(the ``size`` to launch with, the (N, H, W) of the maps over the pixels): without ``size``, (None, n_h_w);
    with it, the maps are at (N, *size), and the launch gets ``size`` only where it resamples an input (each of
    which must have pixels), so that inputs already at ``size`` run the plain op."""
    size = V.op_size(size)
    if size is None:
        return None, tuple(n_h_w)
    for name, t in resampled.items():
        V.check_resizable(t, name, size)
    return (size if any(_differs(t, size) for t in resampled.values()) else None), (n_h_w[0], *size)


def _resize(size, align_corners) -> dict:
    """The keywords of a launch that upsamples (none for the plain op)."""
    return {} if size is None else dict(size=tuple(size), align_corners=bool(align_corners))


def _check_d_map(d: Tensor, n_h_w: tuple, size, device) -> None:
    """A generator-side D map: at the logits' (N, H, W), or, with ``size``, at any (h, w) of their batch."""
    if size is None:
        V.op_float_map(d, n_h_w, device, "d_logits")
    else:
        V.op_low_map(d, n_h_w[0], device, "d_logits")


def _launch_for(backend: str, first: Tensor, name: str, dims: int = 4):
    """The backend's launch module, after checking the op's first tensor (its logits, or its (N, H, W) D map): its
    dimensions, a dtype the backend runs and a device it runs on. Returns (module, (N, H, W))."""
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


def _fake_loss_map(first: Tensor, reduction: str, size=None) -> Tensor:
    """(N, H, W) float32 for reduction="none" (of the logits or of a D map, or (N, *size)), else a stand-in."""
    n_h_w = (first.shape[0], *(first.shape[-2:] if size is None else size))
    return first.new_empty(n_h_w if reduction == "none" else (0,), dtype=torch.float32)


def _like_4d(x: Tensor, h_w) -> Tensor:
    """An (N, C, *h_w) tensor of x's dtype, channels_last where x is (as the launches and F.interpolate give it)."""
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.empty((x.shape[0], x.shape[1], *h_w), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _fake_vector(like: Tensor, n: int) -> Tensor:
    return like.new_empty((n,), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------- softmax2d

softmax2d = _define(
    "softmax2d(Tensor logits, str backend, SymInt[]? size=None, bool align_corners=False) -> Tensor")
softmax2d_backward = _define(
    "softmax2d_backward(Tensor probs, Tensor grad_probs, str backend, SymInt[]? low_size=None, "
    "bool align_corners=False) -> Tensor")


@_device(softmax2d)
def _softmax2d_impl(logits, backend, size=None, align_corners=False):
    """Channel softmax of (N, C, H, W) logits (upsampled to ``size``), in their dtype; dense layouts keep their
    memory format."""
    module, n_h_w = _launch_for(backend, logits, "logits")
    size, _ = _grid(size, n_h_w, logits=logits)
    return module.softmax2d(logits, **_resize(size, align_corners))


@_fake(softmax2d)
def _softmax2d_fake(logits, backend, size=None, align_corners=False):
    return torch.empty_like(logits) if not _differs(logits, size) else _like_4d(logits, size)


@_device(softmax2d_backward)
def _softmax2d_backward_impl(probs, grad_probs, backend, low_size=None, align_corners=False):
    """p * (g - sum_c p g), from the saved probabilities p; with ``low_size``, the adjoint of the upsampling of
    the logits applied to it: the gradient of the logits at their own (h, w)."""
    module, _ = _launch_for(backend, probs, "probs")
    V.op_same(grad_probs, probs, "grad_probs", "probs")
    low_size = V.op_size(low_size, "low_size")
    if not _differs(probs, low_size):
        return module.softmax2d_backward(probs, grad_probs.to(probs.dtype))
    return module.softmax2d_backward(probs, grad_probs.to(probs.dtype), low_size=low_size,
                                     align_corners=bool(align_corners))


@_fake(softmax2d_backward)
def _softmax2d_backward_fake(probs, grad_probs, backend, low_size=None, align_corners=False):
    return torch.empty_like(probs) if not _differs(probs, low_size) else _like_4d(probs, low_size)


class _SoftmaxRule(_Rule):
    """Backward from the saved probabilities, by the backend's fused kernel (softmax2d_backward); for upsampled
    logits, the kernel also applies the adjoint of the upsampling (the logits' size is saved for it)."""

    def setup_context(self, ctx, inputs: tuple, output) -> None:
        ctx.save_for_backward(output)
        ctx.backend = inputs[self.arg("backend")]
        logits, size = inputs[self.arg("logits")], _given(self, inputs, "size")
        ctx.low_size = list(logits.shape[-2:]) if _differs(logits, size) else None
        ctx.align_corners = bool(_given(self, inputs, "align_corners", False))

    def backward(self, ctx, grad_probs):
        (p,) = ctx.saved_tensors
        rest = (None,) * (len(ctx.needs_input_grad) - 1)
        if torch.is_grad_enabled():  # create_graph=True: the same formula in differentiable torch ops, in float32
            # as the kernels compute it (in float16/bfloat16 arithmetic the channel sum alone misses their tolerance)
            p32, g = p.float(), grad_probs.float()
            grad = p32 * (g - (p32 * g).sum(1, keepdim=True))
            if ctx.low_size is not None:  # the adjoint of the upsampling, differentiable again
                n, c, h, w = grad.shape
                grad = torch.ops.aten.upsample_bilinear2d_backward(grad, [h, w], [n, c, *ctx.low_size],
                                                                   ctx.align_corners)
            return (grad.to(p.dtype),) + rest
        return (softmax2d_backward(p, grad_probs, ctx.backend, ctx.low_size, ctx.align_corners),) + rest


_SoftmaxRule(softmax2d)


# ----------------------------------------------------------------------------------------------- cross_entropy2d

cross_entropy2d = _define(
    "cross_entropy2d(Tensor logits, Tensor target, Tensor? weight, int ignore_index, float label_smoothing, "
    "str reduction, bool store_grad, bool validate, str backend, SymInt[]? size=None, bool align_corners=False) "
    "-> (Tensor sums, Tensor loss_map, Tensor grad, Tensor scales)")


@_device(cross_entropy2d)
def _cross_entropy2d_impl(logits, target, weight, ignore_index, label_smoothing, reduction, store_grad, validate,
                          backend, size=None, align_corners=False):
    """sums = [loss sum, sum of w[y] over counted pixels]; loss_map (N, H, W) for reduction "none"."""
    module, n_h_w = _launch_for(backend, logits, "logits")
    size, full = _grid(size, n_h_w, logits=logits)
    V.op_labels(target, full, logits.device)
    V.op_weight(weight, logits.shape[1], logits.device)
    out = module.cross_entropy2d(logits, target, weight, ignore_index, label_smoothing, reduction, store_grad,
                                 **_resize(size, align_corners))
    if validate:
        _labels.report(out.bad, logits.shape[1], ignore_index, device=logits.device)
    return out.sums, _or_empty(out.loss_map, logits, torch.float32), _or_empty(out.grad, logits), out.scales


@_fake(cross_entropy2d)
def _cross_entropy2d_fake(logits, target, weight, ignore_index, label_smoothing, reduction, store_grad, validate,
                          backend, size=None, align_corners=False):
    return (_fake_vector(logits, 2), _fake_loss_map(logits, reduction, size), _fake_grad(logits, store_grad),
            _fake_vector(logits, 1))


_StoredGradientRule(
    cross_entropy2d, sums=("loss", "weight"), loss_map="loss_map", validation_flag="validate",
    stored=[_StoredGrad(input="logits", buffer="grad", of_sum="loss", asked_by="store_grad")],
    reference=lambda logits, target, weight, ignore_index, label_smoothing, size=None, align_corners=False, **_:
    reference.cross_entropy2d(logits, target, weight, ignore_index, label_smoothing, size=size,
                              align_corners=align_corners))


# --------------------------------------------------------------------------------------------- bce_with_logits2d

bce_with_logits2d = _define(
    "bce_with_logits2d(Tensor d_logits, Tensor? target_map, float target_value, Tensor? ignore_mask, "
    "str reduction, bool store_grad, str backend, SymInt[]? size=None, bool align_corners=False) "
    "-> (Tensor sums, Tensor loss_map, Tensor grad, Tensor scales)")


@_device(bce_with_logits2d)
def _bce_with_logits2d_impl(d_logits, target_map, target_value, ignore_mask, reduction, store_grad, backend,
                            size=None, align_corners=False):
    """sums = [loss sum, counted pixels] over the (N, H, W) ``d_logits`` (upsampled to ``size``); ``target_map``
    an (N, H, W) float map, or None for the constant ``target_value``."""
    module, n_h_w = _launch_for(backend, d_logits, "d_logits", dims=3)
    size, full = _grid(size, n_h_w, d_logits=d_logits)
    if target_map is not None:
        V.op_float_map(target_map, full, d_logits.device, "target_map", "d_logits")
    V.op_mask(ignore_mask, full, d_logits.device, ref_name="d_logits")
    out = module.bce_with_logits2d(d_logits, target_map, target_value, ignore_mask, reduction, store_grad,
                                   **_resize(size, align_corners))
    return (out.sums, _or_empty(out.loss_map, d_logits, torch.float32), _map_grad_as_output(out.grad, d_logits),
            out.scales)


@_fake(bce_with_logits2d)
def _bce_with_logits2d_fake(d_logits, target_map, target_value, ignore_mask, reduction, store_grad, backend,
                            size=None, align_corners=False):
    return (_fake_vector(d_logits, 2), _fake_loss_map(d_logits, reduction, size),
            _fake_map_grad(d_logits, store_grad), _fake_vector(d_logits, 1))


_StoredGradientRule(
    bce_with_logits2d, sums=("loss", "count"), loss_map="loss_map",
    stored=[_StoredGrad(input="d_logits", buffer="grad", of_sum="loss", asked_by="store_grad")],
    reference=lambda d_logits, target_map, target_value, ignore_mask, size=None, align_corners=False, **_:
    reference.bce_with_logits2d(d_logits, target_map, target_value, ignore_mask, size=size,
                                align_corners=align_corners))


# ------------------------------------------------------------------------------------------ semi_cross_entropy2d

semi_cross_entropy2d = _define(
    "semi_cross_entropy2d(Tensor logits, Tensor d_logits, float threshold, Tensor? ignore_mask, str reduction, "
    "bool store_grad, str backend, SymInt[]? size=None, bool align_corners=False) "
    "-> (Tensor sums, Tensor loss_map, Tensor grad, Tensor scales)")


@_device(semi_cross_entropy2d)
def _semi_cross_entropy2d_impl(logits, d_logits, threshold, ignore_mask, reduction, store_grad, backend, size=None,
                               align_corners=False):
    """sums = [loss sum, kept pixels, considered pixels]. ``d_logits`` and the pseudo-labels are constants: no
    gradient for d_logits. With ``size``, the logits and d_logits each at their own resolution."""
    module, n_h_w = _launch_for(backend, logits, "logits")
    _check_d_map(d_logits, n_h_w, size, logits.device)
    size, full = _grid(size, n_h_w, logits=logits, d_logits=d_logits)
    V.op_mask(ignore_mask, full, logits.device)
    out = module.semi_cross_entropy2d(logits, d_logits, threshold, ignore_mask, reduction, store_grad,
                                      **_resize(size, align_corners))
    return out.sums, _or_empty(out.loss_map, logits, torch.float32), _or_empty(out.grad, logits), out.scales


@_fake(semi_cross_entropy2d)
def _semi_cross_entropy2d_fake(logits, d_logits, threshold, ignore_mask, reduction, store_grad, backend, size=None,
                               align_corners=False):
    return (_fake_vector(logits, 3), _fake_loss_map(logits, reduction, size), _fake_grad(logits, store_grad),
            _fake_vector(logits, 1))


_StoredGradientRule(
    semi_cross_entropy2d, sums=("loss", "kept", "considered"), loss_map="loss_map",
    stored=[_StoredGrad(input="logits", buffer="grad", of_sum="loss", asked_by="store_grad")],
    reference=lambda logits, d_logits, threshold, ignore_mask, size=None, align_corners=False, **_:
    reference.semi_cross_entropy2d(logits, d_logits, threshold, ignore_mask, size=size, align_corners=align_corners))


# ---------------------------------------------------------------------------------- pseudo_label_cross_entropy2d

pseudo_label_cross_entropy2d = _define(
    "pseudo_label_cross_entropy2d(Tensor logits, Tensor? teacher_logits, Tensor? d_logits, "
    "float? confidence_threshold, float d_threshold, Tensor? ignore_mask, str reduction, bool store_grad, "
    "str backend, SymInt[]? size=None, bool align_corners=False) "
    "-> (Tensor sums, Tensor loss_map, Tensor grad, Tensor scales)")


@_device(pseudo_label_cross_entropy2d)
def _pseudo_label_cross_entropy2d_impl(logits, teacher_logits, d_logits, confidence_threshold, d_threshold,
                                       ignore_mask, reduction, store_grad, backend, size=None, align_corners=False):
    """sums = [loss sum, kept pixels, considered pixels]. The teacher's logits (the logits themselves when None),
    its pseudo-labels and ``d_logits`` are constants: the gradient is the logits' only. With ``size``, the logits,
    the teacher and d_logits each at their own resolution."""
    module, n_h_w = _launch_for(backend, logits, "logits")
    resampled = dict(logits=logits)
    if teacher_logits is not None:
        V.op_teacher(teacher_logits, logits, size)
        resampled["teacher_logits"] = teacher_logits
    if d_logits is not None:
        _check_d_map(d_logits, n_h_w, size, logits.device)
        resampled["d_logits"] = d_logits
    size, full = _grid(size, n_h_w, **resampled)
    V.op_mask(ignore_mask, full, logits.device)
    out = module.pseudo_label_cross_entropy2d(logits, teacher_logits, d_logits, confidence_threshold, d_threshold,
                                              ignore_mask, reduction, store_grad, **_resize(size, align_corners))
    return out.sums, _or_empty(out.loss_map, logits, torch.float32), _or_empty(out.grad, logits), out.scales


@_fake(pseudo_label_cross_entropy2d)
def _pseudo_label_cross_entropy2d_fake(logits, teacher_logits, d_logits, confidence_threshold, d_threshold,
                                       ignore_mask, reduction, store_grad, backend, size=None, align_corners=False):
    return (_fake_vector(logits, 3), _fake_loss_map(logits, reduction, size), _fake_grad(logits, store_grad),
            _fake_vector(logits, 1))


_StoredGradientRule(
    pseudo_label_cross_entropy2d, sums=("loss", "kept", "considered"), loss_map="loss_map",
    stored=[_StoredGrad(input="logits", buffer="grad", of_sum="loss", asked_by="store_grad")],
    reference=lambda logits, teacher_logits, d_logits, confidence_threshold, d_threshold, ignore_mask, size=None,
    align_corners=False, **_:
    reference.pseudo_label_cross_entropy2d(logits, teacher_logits, d_logits, confidence_threshold, d_threshold,
                                           ignore_mask, size=size, align_corners=align_corners))


# ------------------------------------------------------------------------------------------------ generator_loss

generator_loss = _define(
    "generator_loss(Tensor logits, Tensor d_logits, Tensor? target, float lambda_adv, float lambda_semi, "
    "float threshold, int ignore_index, bool store_grad_logits, bool store_grad_d, bool validate, str backend, "
    "SymInt[]? size=None, bool align_corners=False) -> (Tensor sums, Tensor grad_logits, Tensor grad_d, Tensor scales)")


@_device(generator_loss)
def _generator_loss_impl(logits, d_logits, target, lambda_adv, lambda_semi, threshold, ignore_index,
                         store_grad_logits, store_grad_d, validate, backend, size=None, align_corners=False):
    """sums = [term sum, term count, adv sum, adv count, kept, considered]. The term is the cross-entropy
    (labelled: ``target`` given) or L_semi (unlabelled). The lambdas are the weights the caller gives the terms:
    a backend may pre-scale its stored gradients by them. With ``size``, the logits and d_logits each at their own
    resolution."""
    module, n_h_w = _launch_for(backend, logits, "logits")
    _check_d_map(d_logits, n_h_w, size, logits.device)
    size, full = _grid(size, n_h_w, logits=logits, d_logits=d_logits)
    if target is not None:
        V.op_labels(target, full, logits.device)
    out = module.generator_loss(logits, d_logits, target, lambda_adv, lambda_semi, threshold, ignore_index,
                                store_grad_logits, store_grad_d, **_resize(size, align_corners))
    if validate and target is not None:
        _labels.report(out.bad, logits.shape[1], ignore_index, device=logits.device)
    return out.sums, _or_empty(out.grad, logits), _map_grad_as_output(out.grad_d, d_logits), out.scales


@_fake(generator_loss)
def _generator_loss_fake(logits, d_logits, target, lambda_adv, lambda_semi, threshold, ignore_index,
                         store_grad_logits, store_grad_d, validate, backend, size=None, align_corners=False):
    return (_fake_vector(logits, 6), _fake_grad(logits, store_grad_logits), _fake_map_grad(d_logits, store_grad_d),
            _fake_vector(logits, 2))


_StoredGradientRule(
    generator_loss, sums=("term", "term_count", "adv", "adv_count", "kept", "considered"),
    validation_flag="validate",
    stored=[_StoredGrad(input="logits", buffer="grad_logits", of_sum="term", asked_by="store_grad_logits"),
            _StoredGrad(input="d_logits", buffer="grad_d", of_sum="adv", asked_by="store_grad_d")],
    reference=lambda logits, d_logits, target, threshold, ignore_index, size=None, align_corners=False, **_: (
        reference.generator_loss(logits, d_logits, target, threshold, ignore_index, size=size,
                                 align_corners=align_corners),))


# -------------------------------------------------------------------------------------------- discriminator_loss

discriminator_loss = _define(
    "discriminator_loss(Tensor d_fake, Tensor d_real, Tensor? ignore_mask_fake, Tensor? ignore_mask_real, "
    "bool store_grad_fake, bool store_grad_real, str backend, SymInt[]? size=None, bool align_corners=False) "
    "-> (Tensor sums, Tensor grad_fake, Tensor grad_real, Tensor scales)")


@_device(discriminator_loss)
def _discriminator_loss_impl(d_fake, d_real, ignore_mask_fake, ignore_mask_real, store_grad_fake, store_grad_real,
                             backend, size=None, align_corners=False):
    """sums = [fake sum, fake count, real sum, real count] of BCE(d_fake, 0) and BCE(d_real, 1), each map
    upsampled to ``size`` if given (their batches may differ)."""
    module, fake_n_h_w = _launch_for(backend, d_fake, "d_fake", dims=3)
    _, real_n_h_w = _launch_for(backend, d_real, "d_real", dims=3)
    V.check_same_device_as(d_real, d_fake.device, "d_real")
    _, real_full = _grid(size, real_n_h_w)
    size, fake_full = _grid(size, fake_n_h_w, d_fake=d_fake, d_real=d_real)
    V.op_mask(ignore_mask_fake, fake_full, d_fake.device, "ignore_mask_fake", "d_fake")
    V.op_mask(ignore_mask_real, real_full, d_fake.device, "ignore_mask_real", "d_real")
    out = module.discriminator_loss(d_fake, d_real, ignore_mask_fake, ignore_mask_real, store_grad_fake,
                                    store_grad_real, **_resize(size, align_corners))
    return out.sums, _map_grad_as_output(out.grad_fake, d_fake), _map_grad_as_output(out.grad_real, d_real), \
        out.scales


@_fake(discriminator_loss)
def _discriminator_loss_fake(d_fake, d_real, ignore_mask_fake, ignore_mask_real, store_grad_fake, store_grad_real,
                             backend, size=None, align_corners=False):
    return (_fake_vector(d_fake, 4), _fake_map_grad(d_fake, store_grad_fake), _fake_map_grad(d_real, store_grad_real),
            _fake_vector(d_fake, 2))


_StoredGradientRule(
    discriminator_loss, sums=("fake", "fake_count", "real", "real_count"),
    stored=[_StoredGrad(input="d_fake", buffer="grad_fake", of_sum="fake", asked_by="store_grad_fake"),
            _StoredGrad(input="d_real", buffer="grad_real", of_sum="real", asked_by="store_grad_real")],
    reference=lambda d_fake, d_real, ignore_mask_fake, ignore_mask_real, size=None, align_corners=False, **_: (
        reference.discriminator_loss(d_fake, d_real, ignore_mask_fake, ignore_mask_real, size=size,
                                     align_corners=align_corners),))


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
