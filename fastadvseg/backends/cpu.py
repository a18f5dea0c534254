"""The ``cpu`` backend: C++/OpenMP kernels (``csrc/cpu``, the pybind11 extension ``fastadvseg._C_cpu``).

This module is the thin autograd layer. Each op makes one kernel call that reads every logit once and returns the
loss sums together with the gradient, stored in a separate buffer of the logits' dtype (the logits are never
written). The gradient is stored already multiplied by the factor a plain ``loss.backward()`` needs (1/count for
a mean, times lambda for the generator's weighted terms), computed from a cheap pre-pass over the label / mask
maps; ``backward`` rescales it in place by what actually arrived (not at all when that is 1) and hands the buffer
itself to autograd, so a leaf's ``.grad`` is that buffer, not a copy; a second backward through the same graph
(``retain_graph=True``) recomputes it (:class:`._autograd.StoredGradients`). ``reduction="none"`` stores the per-pixel
gradient and scales it by the incoming map. Counts of 0 give a loss of 0 and a zero gradient.

Kernels get raw pointers, sizes, strides in elements and a dtype code, so any strides work (contiguous,
channels_last, sliced views with a storage offset) without copying the logits. Discriminator maps, BCE targets
and class weights (1/C of the logits' size or less) are converted to float32 when they are not float32 already.
Threads: ``torch.get_num_threads()`` at each call; results do not depend on it (fixed blocks, ordered sums).

Importing raises ImportError with the reason when the extension was not built, fails to load, or is switched
off with ``FASTADVSEG_DISABLE_CPU_EXT=1``.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import torch

from .. import _validate as V
from .._types import GeneratorLoss
from ._autograd import StoredGradients

ENV_DISABLE = "FASTADVSEG_DISABLE_CPU_EXT"

if os.environ.get(ENV_DISABLE, "").strip().lower() not in ("", "0", "false", "no", "off"):
    raise ImportError(f"the cpu backend is switched off by {ENV_DISABLE}={os.environ[ENV_DISABLE]}")

try:
    from .. import _C_cpu as _ext
except ImportError as exc:  # not built (no C++ compiler at install time) or fails to load
    raise ImportError(
        f"the C++ extension fastadvseg._C_cpu is not available ({exc}); it is built by `pip install -e .` "
        "(or `python setup.py build_ext --inplace`) on a machine with a C++17 compiler"
    ) from exc

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/cpu/dtypes.h
_BAD_LABELS, _FIRST_BAD = 6, 7  # fused_loss results after the six sums (csrc/cpu/kernels.h, FusedSum)


def supports_device(device: torch.device) -> bool:
    return torch.device(device).type == "cpu"


# ---------------------------------------------------------------------------------------------------------------
# Argument packing: what csrc/cpu/bindings.cpp expects.

def _t4(t: Optional[torch.Tensor]) -> tuple:
    """(ptr, dtype code, sN, sC, sH, sW) of a 4-D tensor, () for None."""
    if t is None:
        return ()
    return (t.data_ptr(), _CODES[t.dtype]) + tuple(t.stride())


def _m3(t: Optional[torch.Tensor]) -> tuple:
    """(ptr, s0, s1, s2) of an (N, H, W) map, () for None."""
    if t is None:
        return ()
    return (t.data_ptr(),) + tuple(t.stride())


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _scalar(value: float) -> torch.Tensor:
    # scalar_tensor: half the cost of torch.tensor(value) per call (measured: 8 vs 17 us right after other work)
    return torch.scalar_tensor(value, dtype=torch.float32)


def _inv(count: float) -> float:
    return 1.0 / count if count > 0 else 0.0


def _g(grad: Optional[torch.Tensor]) -> float:
    """An incoming 0-dim gradient as a number (None: the output was not used)."""
    return 0.0 if grad is None else float(grad)


def _scaled(grad: Optional[torch.Tensor], factor: float) -> Optional[torch.Tensor]:
    """A stored gradient we own, times a number, in place (no copy when the factor is 1)."""
    if grad is None or factor == 1.0:
        return grad
    return grad.mul_(factor)


def _scaled_by_map(grad: torch.Tensor, grad_map: torch.Tensor) -> torch.Tensor:
    """A stored per-pixel gradient we own ((N, C, H, W) or (N, H, W)), times an incoming (N, H, W) map, in place."""
    return grad.mul_(grad_map.unsqueeze(1) if grad.dim() > grad_map.dim() else grad_map)


def _fused(logits: Optional[torch.Tensor], *, sizes, grad: Optional[torch.Tensor] = None, grad_scale: float = 1.0,
           labels: Optional[torch.Tensor] = None, ignore_index: int = -1, weight: Optional[torch.Tensor] = None,
           z: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None, keep: bool = False,
           threshold: float = 0.0, adv_mode: int = 0, loss_map: Optional[torch.Tensor] = None,
           grad_z: Optional[torch.Tensor] = None, grad_z_scale: float = 1.0, maps_only: bool = False):
    """One call of the fused kernel; returns [loss sum, weight sum, adv sum, adv count, kept, considered, bad
    labels, first bad pixel]. With labels and label validation on, raises the public label error if the pass
    found a label outside [0, C) that is not ``ignore_index``: the ops with labels check them here, in the maps
    pre-pass (before the gradient kernel) or the kernel itself, instead of in a pass of their own."""
    sums = _ext.fused_loss(
        tuple(sizes), _t4(logits), _t4(grad), float(grad_scale), 0 if labels is not None else 1, _m3(labels),
        int(ignore_index), _ptr(weight), _m3(z), _m3(mask), int(keep), float(threshold), int(adv_mode),
        _ptr(loss_map), _ptr(grad_z), float(grad_z_scale), bool(maps_only), torch.get_num_threads())
    if sums[_BAD_LABELS] and labels is not None and V.label_validation_enabled():
        _, h, w = labels.shape
        j = int(sums[_FIRST_BAD])  # flat (N, H, W) index of the first, in pixel order
        V.raise_bad_labels(int(sums[_BAD_LABELS]), int(labels[j // (h * w), (j // w) % h, j % w]), sizes[1],
                           ignore_index)
    return sums


def _map_buffer(n: int, h: int, w: int) -> torch.Tensor:
    return torch.empty((n, h, w), dtype=torch.float32)


def _logits_loss(ctx, logits: torch.Tensor, reduction: str, count_index: int, common: dict):
    """Forward of a loss over the logits (cross-entropy, L_semi): the kernel's sums and the loss map.

    With a gradient wanted, a pre-pass over the maps gives the mean's 1/count (sum ``count_index``), the kernel
    writes the gradient already scaled by it, and ``ctx.stored`` keeps it for backward.
    """
    n, c, h, w = logits.shape
    grad_scale = 1.0
    if ctx.needs_input_grad[0] and reduction == "mean":
        grad_scale = _inv(_fused(None, maps_only=True, **common)[count_index])
    grad = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
    loss_map = _map_buffer(n, h, w) if reduction == "none" else None
    sums = _fused(logits, grad=grad, grad_scale=grad_scale, loss_map=loss_map, **common)
    ctx.reduction = reduction
    if grad is not None:
        def recompute():
            again = torch.empty_like(logits)
            _fused(logits, grad=again, grad_scale=grad_scale, **common)
            return again
        ctx.stored = StoredGradients(grad, (logits,), recompute, "cpu")
    return sums, loss_map


def _logits_loss_backward(ctx, grad_out) -> Optional[torch.Tensor]:
    if not ctx.needs_input_grad[0] or grad_out is None:
        return None
    grad = ctx.stored.take()
    return _scaled_by_map(grad, grad_out) if ctx.reduction == "none" else _scaled(grad, _g(grad_out))


# ---------------------------------------------------------------------------------------------------------------
# softmax2d

class _Softmax2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits):
        y = torch.empty_like(logits)  # same memory format for dense inputs, contiguous for sliced views
        _ext.softmax_forward(tuple(logits.shape), _t4(logits), _t4(y), torch.get_num_threads())
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (y,) = ctx.saved_tensors
        grad_y = grad_y if grad_y.dtype == y.dtype else grad_y.to(y.dtype)
        grad_x = torch.empty_like(y)
        _ext.softmax_backward(tuple(y.shape), _t4(y), _t4(grad_y), _t4(grad_x), torch.get_num_threads())
        return grad_x


def softmax2d(logits: torch.Tensor) -> torch.Tensor:
    return _Softmax2d.apply(logits)


# ---------------------------------------------------------------------------------------------------------------
# cross_entropy2d

class _CrossEntropy2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, reduction):
        weight32 = None if weight is None else _f32(weight.detach()).contiguous()
        common = dict(sizes=logits.shape, labels=target, ignore_index=ignore_index, weight=weight32)
        sums, loss_map = _logits_loss(ctx, logits, reduction, 1, common)  # mean over the weight sum
        if reduction == "none":
            return loss_map
        return _scalar(sums[0] if reduction == "sum" else sums[0] * _inv(sums[1]))

    @staticmethod
    def backward(ctx, grad_out):
        return _logits_loss_backward(ctx, grad_out), None, None, None, None


def cross_entropy2d(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                    ignore_index: int, reduction: str) -> torch.Tensor:
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        # the kernel gives no gradient for class weights; learnt weights take the reference path
        from . import reference
        V.check_label_range(target, logits.shape[1], ignore_index)  # (the kernel would have checked them)
        return reference.cross_entropy2d(logits, target, weight, ignore_index, reduction)
    return _CrossEntropy2d.apply(logits, target, weight, ignore_index, reduction)


cross_entropy2d.checks_labels = True  # _fused raises the public label error (see _dispatch)


# ---------------------------------------------------------------------------------------------------------------
# bce_with_logits2d and discriminator_loss: per-pixel maps (float32), gradient stored scaled as for the logits

def _bce_job(z: torch.Tensor, target: Union[float, torch.Tensor], mask: Optional[torch.Tensor],
             loss_map: Optional[torch.Tensor], grad: Optional[torch.Tensor], grad_scale: float = 1.0) -> tuple:
    t_map, t_value = ((), float(target)) if isinstance(target, float) else (_m3(target), 0.0)
    return (tuple(z.shape), _m3(z), t_map, t_value, _m3(mask), _ptr(loss_map), _ptr(grad), float(grad_scale))


def _counted(z: torch.Tensor, mask: Optional[torch.Tensor]) -> int:
    """Pixels a BCE mean divides by (known before the kernel runs, so that it can pre-scale the gradient)."""
    return z.numel() if mask is None else z.numel() - int(mask.sum())


def _map_grad(z: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(z, memory_format=torch.contiguous_format)


class _BceWithLogits2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, target_map, target_value, mask, reduction):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        count = _counted(z, mask)
        grad_scale = _inv(count) if reduction == "mean" else 1.0  # the gradient of the loss itself
        grad = _map_grad(z) if ctx.needs_input_grad[0] else None
        loss_map = _map_buffer(*z.shape) if reduction == "none" else None
        target = target_map if target_map is not None else target_value
        loss_sum, _ = _ext.bce_maps([_bce_job(z, target, mask, loss_map, grad, grad_scale)], torch.get_num_threads())
        ctx.reduction, ctx.inv = reduction, grad_scale
        if need_grad:
            def recompute():
                again = _map_grad(z)
                _ext.bce_maps([_bce_job(z, target, mask, None, again, grad_scale)], torch.get_num_threads())
                return again
            ctx.stored = StoredGradients(grad, (z,), recompute, "cpu") if grad is not None else None
            ctx.save_for_backward(z, mask)
        if reduction == "none":
            return loss_map
        return _scalar(loss_sum * grad_scale)

    @staticmethod
    def backward(ctx, grad_out):
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, None, None, None
        z, mask = ctx.saved_tensors
        grad_z = grad_t = None
        if ctx.needs_input_grad[0]:
            grad = ctx.stored.take()
            grad_z = _scaled_by_map(grad, grad_out) if ctx.reduction == "none" else _scaled(grad, _g(grad_out))
        if ctx.needs_input_grad[1]:  # d/dt of (1 - t) z - log_sigmoid(z) is -z
            scale = grad_out.float() * ctx.inv
            grad_t = -z * scale
            if mask is not None:
                grad_t = torch.where(mask, torch.zeros((), dtype=grad_t.dtype), grad_t)
        return grad_z, grad_t, None, None, None


def bce_with_logits2d(d_logits: torch.Tensor, target: Union[float, torch.Tensor],
                      ignore_mask: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    z = _f32(d_logits)  # differentiable: autograd casts the gradient back to d_logits' dtype
    if isinstance(target, torch.Tensor):
        return _BceWithLogits2d.apply(z, _f32(target).expand_as(z), 0.0, ignore_mask, reduction)
    return _BceWithLogits2d.apply(z, None, float(target), ignore_mask, reduction)


class _DiscriminatorLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fake, real, mask_fake, mask_real):
        maps = ((fake, 0.0, mask_fake), (real, 1.0, mask_real))
        inv = [_inv(_counted(z, mask)) for z, _, mask in maps]  # each term is a mean
        grads = [_map_grad(z) if ctx.needs_input_grad[i] else None for i, (z, _, _) in enumerate(maps)]
        sums = _ext.bce_maps([_bce_job(z, t, mask, None, g, k) for (z, t, mask), g, k in zip(maps, grads, inv)],
                             torch.get_num_threads())
        if any(g is not None for g in grads):
            def recompute():
                again = [_map_grad(z) if g is not None else None for (z, _, _), g in zip(maps, grads)]
                _ext.bce_maps([_bce_job(z, t, mask, None, g, k) for (z, t, mask), g, k in zip(maps, again, inv)],
                              torch.get_num_threads())
                return again
            ctx.stored = StoredGradients(grads, (fake, real), recompute, "cpu")
        return _scalar(sums[0] * inv[0] + sums[2] * inv[1])

    @staticmethod
    def backward(ctx, grad_out):
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, None, None
        g = _g(grad_out)
        return tuple(_scaled(s, g) for s in ctx.stored.take()) + (None, None)


def discriminator_loss(d_fake: torch.Tensor, d_real: torch.Tensor, ignore_mask_fake: Optional[torch.Tensor],
                       ignore_mask_real: Optional[torch.Tensor]) -> torch.Tensor:
    return _DiscriminatorLoss.apply(_f32(d_fake), _f32(d_real), ignore_mask_fake, ignore_mask_real)


# ---------------------------------------------------------------------------------------------------------------
# semi_cross_entropy2d

class _SemiCrossEntropy2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, z, threshold, mask, reduction):
        common = dict(sizes=logits.shape, z=z, mask=mask, keep=True, threshold=threshold)
        sums, loss_map = _logits_loss(ctx, logits, reduction, 4, common)  # mean over the kept pixels
        kept, considered = sums[4], sums[5]
        ratio = _scalar(kept) / max(considered, 1.0)
        ctx.mark_non_differentiable(ratio)
        if reduction == "none":
            return loss_map, ratio
        return _scalar(sums[0] if reduction == "sum" else sums[0] * _inv(kept)), ratio

    @staticmethod
    def backward(ctx, grad_out, _grad_ratio):
        return _logits_loss_backward(ctx, grad_out), None, None, None, None


def semi_cross_entropy2d(logits: torch.Tensor, d_logits: torch.Tensor, threshold: float,
                         ignore_mask: Optional[torch.Tensor], reduction: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return _SemiCrossEntropy2d.apply(logits, _f32(d_logits.detach()), threshold, ignore_mask, reduction)


# ---------------------------------------------------------------------------------------------------------------
# the label check of the public functions (one pass instead of five tensor ops)

def find_bad_labels(target: torch.Tensor, num_classes: int, ignore_index: int) -> Tuple[int, int]:
    count, value = _ext.find_bad_labels(tuple(target.shape), _m3(target), int(num_classes), int(ignore_index),
                                        torch.get_num_threads())
    return int(count), int(value)


# ---------------------------------------------------------------------------------------------------------------
# one_hot2d

def one_hot2d(target: torch.Tensor, num_classes: int, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    n, h, w = target.shape
    out = torch.empty((n, num_classes, h, w), dtype=dtype)
    size = out.element_size()
    if size not in (1, 2, 4, 8):  # e.g. complex128: no kernel for 16-byte elements
        from . import reference
        return reference.one_hot2d(target, num_classes, ignore_index, dtype)
    one = int.from_bytes(torch.ones((), dtype=dtype).reshape(1).view(torch.uint8).numpy().tobytes(), "little")
    _ext.one_hot((n, num_classes, h, w), _m3(target), int(ignore_index), out.data_ptr(), size, one,
                 torch.get_num_threads())
    return out


# ---------------------------------------------------------------------------------------------------------------
# generator_loss: one pass for (total, ce, adv, semi, semi_ratio)

def _lam(value: float) -> float:
    """The factor folded into a stored gradient: lambda itself, or 1 when lambda is 0."""
    return value if value != 0.0 else 1.0


class _GeneratorLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, z, target, lambda_adv, lambda_semi, threshold, ignore_index):
        need_x, need_z = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        labelled = target is not None
        n, c, h, w = logits.shape
        if labelled:
            common = dict(sizes=logits.shape, labels=target, ignore_index=ignore_index, z=z, adv_mode=1)
            count_index = 1  # the adversarial term counts the same pixels as the cross-entropy
        else:
            common = dict(sizes=logits.shape, z=z, keep=True, threshold=threshold,
                          adv_mode=2)
            count_index = 4
        k_x = 1.0 if labelled else _lam(lambda_semi)
        k_z = _lam(lambda_adv)
        grad_scale, grad_z_scale = 1.0, 1.0
        if need_x or need_z:
            count = _fused(None, maps_only=True, **common)[count_index]
            grad_scale = k_x * _inv(count)
            grad_z_scale = k_z * _inv(count if labelled else float(n * h * w))
        grad = torch.empty_like(logits) if need_x else None
        grad_z = _map_buffer(n, h, w) if need_z else None
        sums = _fused(logits, grad=grad, grad_scale=grad_scale, grad_z=grad_z, grad_z_scale=grad_z_scale, **common)
        loss_sum, weight_sum, adv_sum, adv_count, kept, considered = sums[:6]
        ctx.labelled, ctx.lambdas, ctx.k = labelled, (lambda_adv, lambda_semi), (k_x, k_z)
        if need_x or need_z:
            def recompute():
                again = torch.empty_like(logits) if need_x else None
                again_z = _map_buffer(n, h, w) if need_z else None
                _fused(logits, grad=again, grad_scale=grad_scale, grad_z=again_z, grad_z_scale=grad_z_scale,
                       **common)
                return again, again_z
            ctx.stored = StoredGradients((grad, grad_z), (logits,), recompute, "cpu")
        # the five results as numbers first: one tensor each, no tensor arithmetic (each op costs as much again)
        adv = adv_sum * _inv(adv_count)
        if labelled:
            ce, semi, ratio = loss_sum * _inv(weight_sum), 0.0, 0.0
            total = ce + lambda_adv * adv
        else:
            ce, semi, ratio = 0.0, loss_sum * _inv(kept), kept / max(considered, 1.0)
            total = lambda_adv * adv + lambda_semi * semi
        results = tuple(_scalar(v) for v in (total, ce, adv, semi, ratio))
        ctx.mark_non_differentiable(results[4])
        ctx.set_materialize_grads(False)  # unused results give None in backward, not zero tensors to read
        return results

    @staticmethod
    def backward(ctx, g_total, g_ce, g_adv, g_semi, _g_ratio):
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, None, None, None, None, None
        grad, grad_z = ctx.stored.take()
        lambda_adv, lambda_semi = ctx.lambdas
        k_x, k_z = ctx.k
        gt = _g(g_total)
        if ctx.labelled:
            factor_x = gt + _g(g_ce)
        else:
            factor_x = (lambda_semi * gt + _g(g_semi)) / k_x
        factor_z = (lambda_adv * gt + _g(g_adv)) / k_z
        return _scaled(grad, factor_x), _scaled(grad_z, factor_z), None, None, None, None, None


def generator_loss(logits: torch.Tensor, d_logits: torch.Tensor, target: Optional[torch.Tensor],
                   lambda_adv: float, lambda_semi: float, threshold: float, ignore_index: int) -> GeneratorLoss:
    z = _f32(d_logits)  # differentiable: the gradient returns to D in d_logits' dtype
    return GeneratorLoss(*_GeneratorLoss.apply(logits, z, target, float(lambda_adv), float(lambda_semi),
                                               float(threshold), int(ignore_index)))


generator_loss.checks_labels = True  # _fused raises the public label error (see _dispatch)
