"""The ``triton`` backend: thin autograd Functions around the Triton kernels of ``fastadvseg.kernels.triton``.

Each kernel computes a loss and, in the same pass, the gradient of its *unnormalised sum* into a separate buffer
(never into the logits). Each Function here only allocates, launches, forms the means from the kernel's partial
sums, and in backward scales the stored gradient in place by the incoming one (divided by the count for a mean;
count 0 gives a zero gradient, never NaN) and hands that very buffer to autograd: one gradient-sized buffer at
peak, not two. A second backward through the same graph relaunches the kernel (``_autograd.StoredGradients``).
Gradients are stored only when needed: the input requires grad and grad mode is on (decided here, outside
``Function.forward``, where grad mode is always off).

Runs CUDA tensors, and CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was first imported (the
kernels then run in Triton's numpy interpreter: how CI without a GPU tests the GPU kernels).
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Tuple, Union

import torch

try:
    import triton  # noqa: F401  (the kernels below need it; fail here with a readable reason)
except ImportError as exc:  # pragma: no cover - depends on the machine
    raise ImportError(
        f"the 'triton' backend needs the triton package, which could not be imported ({exc}); "
        "install it with `pip install triton` (Linux), or use backend='cpu'/'reference'"
    ) from exc

from .._types import GeneratorLoss
from ._autograd import StoredGradients
from ..kernels.triton import bce as _bce
from ..kernels.triton import cross_entropy as _ce
from ..kernels.triton import discriminator as _disc
from ..kernels.triton import generator as _gen
from ..kernels.triton import one_hot as _one_hot
from ..kernels.triton import semi as _semi
from ..kernels.triton import softmax as _softmax

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supports_device(device: Union[torch.device, str]) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1"
    return False


def _on_tensor_device(op):
    """Launch on the device of the op's first tensor (Triton launches on the *current* CUDA device otherwise)."""
    @functools.wraps(op)
    def wrapper(first, *args):
        if first.is_cuda and first.device.index != torch.cuda.current_device():
            with torch.cuda.device(first.device):
                return op(first, *args)
        return op(first, *args)
    return wrapper


def _wants_grad(t: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad


def _nonzero(count: torch.Tensor) -> torch.Tensor:
    """The divisor of a mean: count, or 1 where nothing was counted (the sum is then 0 and so is its gradient)."""
    return torch.where(count > 0, count, 1.0)


def _g(grad: Optional[torch.Tensor]) -> Union[torch.Tensor, float]:
    return 0.0 if grad is None else grad


def _reduce(total: torch.Tensor, count: torch.Tensor, loss_map: Optional[torch.Tensor], reduction: str):
    if reduction == "none":
        return loss_map
    if reduction == "sum":
        return total
    return total / _nonzero(count)


def _scale_(stored: Optional[torch.Tensor], grad_out, count: torch.Tensor, reduction: str = "mean",
            channel_dim: bool = False):
    """Backward of a reduced loss: the stored gradient of the sum times d(loss)/d(sum), in place on the buffer
    handed over by :class:`StoredGradients` (no second gradient-sized buffer), then given to autograd.
    ``grad_out`` may be a Python number (0.0: that output was not used)."""
    if stored is None:
        return None
    if reduction == "none":  # a per-pixel map
        g = grad_out.to(stored.dtype)
        return stored.mul_(g.unsqueeze(1) if channel_dim else g)
    return stored.mul_(grad_out if reduction == "sum" else grad_out / _nonzero(count))


def _stored(grads, inputs, recompute) -> Optional[StoredGradients]:
    """ctx.stored for a forward that filled ``grads`` (a buffer, or a tuple of buffers and Nones)."""
    if grads is None or (isinstance(grads, tuple) and all(g is None for g in grads)):
        return None
    return StoredGradients(grads, inputs, recompute, "triton")


def _take(ctx, none=None):
    """The gradients ``ctx.stored`` holds for this backward (``none`` when the forward stored none)."""
    return none if ctx.stored is None else ctx.stored.take()


# ----------------------------------------------------------------------------------------------------- softmax2d

class _Softmax2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits):
        p = _softmax.softmax_forward(logits)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, grad_p):
        (p,) = ctx.saved_tensors
        return _softmax.softmax_backward(p, grad_p)


@_on_tensor_device
def softmax2d(logits: torch.Tensor) -> torch.Tensor:
    if not _wants_grad(logits):
        return _softmax.softmax_forward(logits)
    return _Softmax2d.apply(logits)


# ------------------------------------------------------------------------------ cross_entropy2d, bce_with_logits2d

class _ReducedLoss(torch.autograd.Function):
    """A loss whose kernel returns (sum, count, loss map, gradient of the sum): cross-entropy and BCE."""

    @staticmethod
    def forward(ctx, launch, channel_dim, reduction, store_grad, x, *args):
        total, count, loss_map, grad = launch(x, *args, store_grad=store_grad, store_map=reduction == "none")
        ctx.reduction, ctx.channel_dim, ctx.num_args = reduction, channel_dim, len(args)
        ctx.stored = _stored(grad, (x,), lambda: launch(x, *args, store_grad=True, store_map=False)[3])
        ctx.save_for_backward(count)
        return _reduce(total, count, loss_map, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        (count,) = ctx.saved_tensors
        grad = _take(ctx)
        return (None, None, None, None, _scale_(grad, grad_out, count, ctx.reduction, ctx.channel_dim),
                *([None] * ctx.num_args))


@_on_tensor_device
def cross_entropy2d(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                    ignore_index: int, reduction: str) -> torch.Tensor:
    return _ReducedLoss.apply(_ce.cross_entropy_forward, True, reduction, _wants_grad(logits),
                              logits, target, weight, ignore_index)


class _SoftTargetBCE(torch.autograd.Function):
    """BCE whose target map needs a gradient too (a trained soft label, rare): BCE is linear in t with
    dBCE/dt = -z at counted pixels, formed with torch ops in backward; d_logits' gradient is the kernel's."""

    @staticmethod
    def forward(ctx, d_logits, target, ignore_mask, reduction, store_grad):
        total, count, loss_map, grad = _bce.bce_forward(
            d_logits, target, ignore_mask, store_grad=store_grad, store_map=reduction == "none")
        ctx.reduction = reduction
        ctx.stored = _stored(grad, (d_logits, target), lambda: _bce.bce_forward(
            d_logits, target, ignore_mask, store_grad=True, store_map=False)[3])
        ctx.save_for_backward(count, d_logits, target, ignore_mask)
        return _reduce(total, count, loss_map, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        count, z, target, ignore_mask = ctx.saved_tensors
        neg_z = -z.float() if ignore_mask is None else torch.where(ignore_mask, 0.0, -z.float())
        grad_t = _scale_(neg_z, grad_out, count, ctx.reduction, False)  # (neg_z is ours: a new tensor)
        grad_t = (grad_t.sum() if target.dim() == 0 else grad_t).to(target.dtype)
        grad = _take(ctx)
        return _scale_(grad, grad_out, count, ctx.reduction, False), grad_t, None, None, None


@_on_tensor_device
def bce_with_logits2d(d_logits: torch.Tensor, target: Union[float, torch.Tensor],
                      ignore_mask: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    if isinstance(target, torch.Tensor) and _wants_grad(target):
        return _SoftTargetBCE.apply(d_logits, target, ignore_mask, reduction, _wants_grad(d_logits))
    return _ReducedLoss.apply(_bce.bce_forward, False, reduction, _wants_grad(d_logits),
                              d_logits, target, ignore_mask)


# ------------------------------------------------------------------------------------------- semi_cross_entropy2d

class _SemiCrossEntropy2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, d_logits, threshold, ignore_mask, reduction, store_grad):
        total, kept, considered, loss_map, grad = _semi.semi_forward(
            logits, d_logits, threshold, ignore_mask, store_grad=store_grad, store_map=reduction == "none")
        ratio = kept / considered.clamp_min(1.0)
        ctx.mark_non_differentiable(ratio)
        ctx.reduction = reduction
        ctx.stored = _stored(grad, (logits, d_logits), lambda: _semi.semi_forward(
            logits, d_logits, threshold, ignore_mask, store_grad=True, store_map=False)[4])
        ctx.save_for_backward(kept)
        return _reduce(total, kept, loss_map, reduction), ratio

    @staticmethod
    def backward(ctx, grad_out, grad_ratio):
        (kept,) = ctx.saved_tensors
        grad = _take(ctx)
        # d_logits and the pseudo-labels are constants of L_semi: no gradient for d_logits
        return _scale_(grad, grad_out, kept, ctx.reduction, True), None, None, None, None, None


@_on_tensor_device
def semi_cross_entropy2d(logits: torch.Tensor, d_logits: torch.Tensor, threshold: float,
                         ignore_mask: Optional[torch.Tensor], reduction: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return _SemiCrossEntropy2d.apply(logits, d_logits, threshold, ignore_mask, reduction, _wants_grad(logits))


# ------------------------------------------------------------------------------------------------------ one_hot2d

@_on_tensor_device
def one_hot2d(target: torch.Tensor, num_classes: int, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    return _one_hot.one_hot(target, num_classes, ignore_index, dtype)


# ------------------------------------------------------------------------------------------------- generator_loss

class _GeneratorLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, d_logits, target, lambda_adv, lambda_semi, threshold, ignore_index, store_gx, store_gz):
        term_sum, term_count, adv_sum, adv_count, gx, gz = _gen.generator_forward(
            logits, d_logits, target, ignore_index, threshold, store_gx=store_gx, store_gz=store_gz)
        term = term_sum / _nonzero(term_count)
        adv = adv_sum / _nonzero(adv_count)
        labelled = target is not None
        zero, ratio_zero = term.new_zeros(()), term.new_zeros(())
        if labelled:  # total = ce + lambda_adv * adv; semi and semi_ratio are constant zeros
            total = term + lambda_adv * adv
            ce, semi, ratio = term, zero, ratio_zero
            ctx.mark_non_differentiable(semi, ratio)
        else:  # total = lambda_adv * adv + lambda_semi * semi; ce is a constant zero
            total = lambda_adv * adv + lambda_semi * term
            ce, semi = zero, term
            ratio = term_count / float(max(d_logits.numel(), 1))
            ctx.mark_non_differentiable(ce, ratio)
        ctx.labelled, ctx.lambda_adv, ctx.lambda_semi = labelled, lambda_adv, lambda_semi
        ctx.stored = _stored((gx, gz), (logits, d_logits), lambda: _gen.generator_forward(
            logits, d_logits, target, ignore_index, threshold, store_gx=store_gx, store_gz=store_gz)[4:])
        ctx.save_for_backward(term_count, adv_count)
        return total, ce, adv, semi, ratio

    @staticmethod
    def backward(ctx, g_total, g_ce, g_adv, g_semi, g_ratio):
        term_count, adv_count = ctx.saved_tensors
        gx, gz = _take(ctx, (None, None))
        g_total = _g(g_total)
        # d total / d term is 1 (ce, labelled) or lambda_semi (semi, unlabelled); the term may also be a root itself
        g_term = g_total + _g(g_ce) if ctx.labelled else ctx.lambda_semi * g_total + _g(g_semi)
        g_adv = ctx.lambda_adv * g_total + _g(g_adv)
        return _scale_(gx, g_term, term_count), _scale_(gz, g_adv, adv_count), None, None, None, None, None, None, None


@_on_tensor_device
def generator_loss(logits: torch.Tensor, d_logits: torch.Tensor, target: Optional[torch.Tensor],
                   lambda_adv: float, lambda_semi: float, threshold: float, ignore_index: int) -> GeneratorLoss:
    return GeneratorLoss(*_GeneratorLoss.apply(
        logits, d_logits, target, lambda_adv, lambda_semi, threshold, ignore_index,
        _wants_grad(logits), _wants_grad(d_logits)))


# --------------------------------------------------------------------------------------------- discriminator_loss

class _DiscriminatorLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, d_fake, d_real, mask_fake, mask_real, grad_fake, grad_real):
        (f_sum, f_count), (r_sum, r_count), gf, gr = _disc.discriminator_forward(
            d_fake, d_real, mask_fake, mask_real, grad_fake=grad_fake, grad_real=grad_real)
        ctx.stored = _stored((gf, gr), (d_fake, d_real), lambda: _disc.discriminator_forward(
            d_fake, d_real, mask_fake, mask_real, grad_fake=grad_fake, grad_real=grad_real)[2:])
        ctx.save_for_backward(f_count, r_count)
        return f_sum / _nonzero(f_count) + r_sum / _nonzero(r_count)

    @staticmethod
    def backward(ctx, grad_out):
        f_count, r_count = ctx.saved_tensors
        gf, gr = _take(ctx, (None, None))
        return _scale_(gf, grad_out, f_count), _scale_(gr, grad_out, r_count), None, None, None, None


@_on_tensor_device
def discriminator_loss(d_fake: torch.Tensor, d_real: torch.Tensor, ignore_mask_fake: Optional[torch.Tensor],
                       ignore_mask_real: Optional[torch.Tensor]) -> torch.Tensor:
    return _DiscriminatorLoss.apply(d_fake, d_real, ignore_mask_fake, ignore_mask_real,
                                    _wants_grad(d_fake), _wants_grad(d_real))
