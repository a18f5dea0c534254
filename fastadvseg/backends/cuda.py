"""The ``cuda`` backend: thin autograd Functions around the CUDA C++ kernels of ``kernels/cuda/``.

Path of every op: this module's function -> autograd Function -> ``fastadvseg._cuda_kernels`` (the binding in
``csrc/cuda/binding.cpp``, launching on torch's current stream) -> a launcher in ``kernels/cuda/*.cu``.

Each loss kernel reads the logits once and, in the same pass, writes the gradient of the loss's *unnormalised sum*
into a separate buffer (never into the logits); a second one-block launch reduces the per-block partial sums in a
fixed order (deterministic, no float atomics) and forms the means. Backward only scales the stored gradient by the
incoming one divided by the count (count 0 -> divisor 1, and the stored gradient is 0 there: never NaN). Gradients
are stored only when needed: grad mode on and the input requires grad (decided here, outside
``Function.forward``, where grad mode is always off).

The extension is built by setup.py only where torch has CUDA and a CUDA toolkit is found:
``pip install -e . --no-build-isolation`` on such a machine. Importing this module raises ImportError saying why
when it was not built.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .._types import GeneratorLoss

if torch.version.cuda is None:
    raise ImportError(
        f"the 'cuda' backend needs a CUDA build of torch; this torch ({torch.__version__}) has no CUDA "
        "(use backend='triton', 'cpu' or 'reference')"
    )
try:
    from .. import _cuda_kernels as _ext
except ImportError as exc:
    raise ImportError(
        "the 'cuda' backend's extension fastadvseg._cuda_kernels is not built or does not load "
        f"({exc}); build it with `pip install -e . --no-build-isolation` on a machine with a CUDA build of torch "
        "and the CUDA toolkit (nvcc, CUDA_HOME)"
    ) from exc

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_REDUCTION = {"none": _ext.REDUCTION_NONE, "mean": _ext.REDUCTION_MEAN, "sum": _ext.REDUCTION_SUM}


def supports_device(device: Union[torch.device, str]) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def _wants_grad(t: Optional[torch.Tensor]) -> bool:
    return t is not None and torch.is_grad_enabled() and t.requires_grad


def _scale(stored: Optional[torch.Tensor], grad_out: torch.Tensor, den: torch.Tensor, reduction: str,
           channel_dim: bool) -> Optional[torch.Tensor]:
    """Backward of a reduced loss: the stored gradient of the sum times d(loss)/d(sum).

    ``den`` is the kernel's denominator: the count (or 1 when it is 0) for "mean", 1 for "sum".
    """
    if stored is None:
        return None
    if reduction == "none":
        g = grad_out.unsqueeze(1) if channel_dim else grad_out
        return (stored.float() * g).to(stored.dtype)
    return stored * (grad_out / den)


# ----------------------------------------------------------------------------------------------------- softmax2d

class _Softmax2d(torch.autograd.Function):
    # backward recomputes the probabilities from the logits in float32 (as precise as the reference for
    # half/bfloat16, same bytes as reading a saved output)
    @staticmethod
    def forward(ctx, logits):
        ctx.save_for_backward(logits)
        return _ext.softmax2d_forward(logits)

    @staticmethod
    def backward(ctx, grad_p):
        (logits,) = ctx.saved_tensors
        return _ext.softmax2d_backward(logits, grad_p)


def softmax2d(logits: torch.Tensor) -> torch.Tensor:
    if not _wants_grad(logits):
        return _ext.softmax2d_forward(logits)
    return _Softmax2d.apply(logits)


# ------------------------------------------------------------------------------------------------ cross_entropy2d

class _CrossEntropy2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, reduction):
        loss, den, grad = _ext.cross_entropy2d_forward(logits, target, weight, ignore_index, _REDUCTION[reduction],
                                                       True)
        ctx.reduction = reduction
        ctx.save_for_backward(grad, den)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad, den = ctx.saved_tensors
        return _scale(grad, grad_out, den, ctx.reduction, True), None, None, None, None


def cross_entropy2d(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                    ignore_index: int, reduction: str) -> torch.Tensor:
    if not _wants_grad(logits):
        return _ext.cross_entropy2d_forward(logits, target, weight, ignore_index, _REDUCTION[reduction], False)[0]
    return _CrossEntropy2d.apply(logits, target, weight, ignore_index, reduction)


# ---------------------------------------------------------------------------------------------- bce_with_logits2d

class _BceWithLogits2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, d_logits, target, ignore_mask, reduction, store_grad):
        target_map = target if isinstance(target, torch.Tensor) else None
        target_value = 0.0 if target_map is not None else float(target)
        loss, den, grad = _ext.bce_with_logits2d_forward(d_logits, target_map, target_value, ignore_mask,
                                                         _REDUCTION[reduction], store_grad)
        ctx.reduction = reduction
        ctx.target_needs_grad = target_map is not None and ctx.needs_input_grad[1]
        # d_logits and the mask are kept only for the (rare) gradient with respect to a target map
        ctx.save_for_backward(grad, den, d_logits if ctx.target_needs_grad else None,
                              ignore_mask if ctx.target_needs_grad else None,
                              target_map if ctx.target_needs_grad else None)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad, den, d_logits, ignore_mask, target = ctx.saved_tensors
        grad_target = None
        if ctx.target_needs_grad:
            # d BCE / d t = -z at counted pixels
            scale = grad_out if ctx.reduction == "none" else grad_out / den
            g = -d_logits.float() * scale
            if ignore_mask is not None:
                g = g.masked_fill(ignore_mask, 0.0)
            if target.dim() == 0:
                g = g.sum()
            grad_target = g.to(target.dtype)
        return _scale(grad, grad_out, den, ctx.reduction, False), grad_target, None, None, None


def bce_with_logits2d(d_logits: torch.Tensor, target: Union[float, torch.Tensor],
                      ignore_mask: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    if isinstance(target, torch.Tensor) and target.device != d_logits.device:
        target = target.to(d_logits.device)  # a 0-dim target may live on the CPU, like a python number
    store_grad = _wants_grad(d_logits)
    if not store_grad and not (isinstance(target, torch.Tensor) and _wants_grad(target)):
        target_map = target if isinstance(target, torch.Tensor) else None
        target_value = 0.0 if target_map is not None else float(target)
        return _ext.bce_with_logits2d_forward(d_logits, target_map, target_value, ignore_mask,
                                              _REDUCTION[reduction], False)[0]
    return _BceWithLogits2d.apply(d_logits, target, ignore_mask, reduction, store_grad)


# ------------------------------------------------------------------------------------------- semi_cross_entropy2d

class _SemiCrossEntropy2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, d_logits, threshold, ignore_mask, reduction):
        loss, den, ratio, grad = _ext.semi_cross_entropy2d_forward(logits, d_logits, threshold, ignore_mask,
                                                                   _REDUCTION[reduction], True)
        ctx.mark_non_differentiable(ratio)
        ctx.reduction = reduction
        ctx.save_for_backward(grad, den)
        return loss, ratio

    @staticmethod
    def backward(ctx, grad_out, grad_ratio):
        grad, den = ctx.saved_tensors
        # d_logits and the pseudo-labels are constants of L_semi: no gradient for d_logits
        return _scale(grad, grad_out, den, ctx.reduction, True), None, None, None, None


def semi_cross_entropy2d(logits: torch.Tensor, d_logits: torch.Tensor, threshold: float,
                         ignore_mask: Optional[torch.Tensor], reduction: str):
    if not _wants_grad(logits):
        loss, _, ratio, _ = _ext.semi_cross_entropy2d_forward(logits, d_logits, threshold, ignore_mask,
                                                              _REDUCTION[reduction], False)
        return loss, ratio
    return _SemiCrossEntropy2d.apply(logits, d_logits, threshold, ignore_mask, reduction)


# ------------------------------------------------------------------------------------------------------ one_hot2d

def one_hot2d(target: torch.Tensor, num_classes: int, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    n, h, w = target.shape
    kernel_dtype = dtype if dtype.itemsize in (1, 2, 4, 8) else torch.float32  # complex128: via float32
    out = torch.empty((n, num_classes, h, w), dtype=kernel_dtype, device=target.device)
    _ext.one_hot2d_forward(target, out, ignore_index)
    return out if kernel_dtype == dtype else out.to(dtype)


# ------------------------------------------------------------------------------------------------- generator_loss

class _GeneratorLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, d_logits, target, lambda_adv, lambda_semi, threshold, ignore_index, store_gx, store_gz):
        (total, ce, adv, semi, ratio, den_ce, den_adv, den_semi, gx, gz) = _ext.generator_loss_forward(
            logits, d_logits, target, lambda_adv, lambda_semi, threshold, ignore_index, store_gx, store_gz)
        ctx.labelled = target is not None
        ctx.lambda_adv, ctx.lambda_semi = lambda_adv, lambda_semi
        # the term that is identically 0 for this kind of batch is a constant, like the reference's
        ctx.mark_non_differentiable(ratio, semi if ctx.labelled else ce)
        ctx.save_for_backward(gx, gz, den_ce if ctx.labelled else den_semi, den_adv)
        return total, ce, adv, semi, ratio

    @staticmethod
    def backward(ctx, g_total, g_ce, g_adv, g_semi, g_ratio):
        gx, gz, den_x, den_adv = ctx.saved_tensors
        grad_logits = grad_d = None
        if gx is not None:
            if ctx.labelled:  # total = ce + l_adv * adv
                grad_logits = gx * ((g_total + g_ce) / den_x)
            else:  # total = l_adv * adv + l_semi * semi
                grad_logits = gx * ((ctx.lambda_semi * g_total + g_semi) / den_x)
        if gz is not None:
            grad_d = gz * ((ctx.lambda_adv * g_total + g_adv) / den_adv)
        return grad_logits, grad_d, None, None, None, None, None, None, None


def generator_loss(logits: torch.Tensor, d_logits: torch.Tensor, target: Optional[torch.Tensor],
                   lambda_adv: float, lambda_semi: float, threshold: float, ignore_index: int) -> GeneratorLoss:
    store_gx, store_gz = _wants_grad(logits), _wants_grad(d_logits)
    if not (store_gx or store_gz):
        out = _ext.generator_loss_forward(logits, d_logits, target, lambda_adv, lambda_semi, threshold,
                                          ignore_index, False, False)
        return GeneratorLoss(*out[:5])
    return GeneratorLoss(*_GeneratorLoss.apply(logits, d_logits, target, lambda_adv, lambda_semi, threshold,
                                               ignore_index, store_gx, store_gz))


# --------------------------------------------------------------------------------------------- discriminator_loss

class _DiscriminatorLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, d_fake, d_real, ignore_mask_fake, ignore_mask_real, store_fake, store_real):
        loss, den_fake, den_real, g_fake, g_real = _ext.discriminator_loss_forward(
            d_fake, d_real, ignore_mask_fake, ignore_mask_real, store_fake, store_real)
        ctx.save_for_backward(g_fake, g_real, den_fake, den_real)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        g_fake, g_real, den_fake, den_real = ctx.saved_tensors
        grad_fake = None if g_fake is None else g_fake * (grad_out / den_fake)
        grad_real = None if g_real is None else g_real * (grad_out / den_real)
        return grad_fake, grad_real, None, None, None, None


def discriminator_loss(d_fake: torch.Tensor, d_real: torch.Tensor, ignore_mask_fake: Optional[torch.Tensor],
                       ignore_mask_real: Optional[torch.Tensor]) -> torch.Tensor:
    store_fake, store_real = _wants_grad(d_fake), _wants_grad(d_real)
    if not (store_fake or store_real):
        return _ext.discriminator_loss_forward(d_fake, d_real, ignore_mask_fake, ignore_mask_real, False, False)[0]
    return _DiscriminatorLoss.apply(d_fake, d_real, ignore_mask_fake, ignore_mask_real, store_fake, store_real)
