"""The public loss API (``../shared/SPEC.md`` section 2).

Each function checks its arguments once, resolves a backend (``fastadvseg/_dispatch.py``) and calls that backend's
implementation. All take NCHW tensors of any strides, float32/float16/bfloat16 logits (float64 runs on the
reference backend), on CPU or CUDA, and ``backend=`` ("auto", "reference", "triton", "cpu", "cuda").

Losses are returned in float32 (float64 for float64 inputs): accumulation is always in float32, and rounding the
result back to float16 would only lose what the kernel computed. Gradients have the dtype of their input.
Every mean over an empty set is 0 with zero gradient, never NaN.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from . import _validate as V
from ._dispatch import resolve
from ._types import GeneratorLoss

__all__ = [
    "softmax2d",
    "cross_entropy2d",
    "bce_with_logits2d",
    "semi_cross_entropy2d",
    "one_hot2d",
    "generator_loss",
    "discriminator_loss",
    "GeneratorLoss",
]


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _zero_loss(*tensors: torch.Tensor) -> torch.Tensor:
    """A 0 that stays connected to the inputs' graph (so backward() works and gives zero gradients)."""
    dtype = _acc_dtype(*tensors)
    out = torch.zeros((), dtype=dtype, device=tensors[0].device)
    for t in tensors:
        if t.requires_grad:
            out = out + t.sum().to(dtype) * 0
    return out


def _empty_map(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(_acc_dtype(logits)).sum(dim=1) * 0


def softmax2d(logits: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Channel softmax of (N, C, H, W) logits, in the logits' dtype and memory format; fused backward."""
    V.check_logits(logits)
    if logits.numel() == 0:
        return torch.softmax(logits, dim=1)
    _, impl = resolve("softmax2d", backend, logits.device, logits.dtype)
    return impl(logits)


def cross_entropy2d(logits: torch.Tensor, target: torch.Tensor, *, weight: Optional[torch.Tensor] = None,
                    ignore_index: int = 255, reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """Drop-in for ``F.cross_entropy`` on (N, C, H, W) logits and (N, H, W) labels.

    Same value and gradient as PyTorch (with ``weight``, the same weighted mean: sum of w[y]·nll over the sum of
    w[y]); pixels labelled ``ignore_index`` are not counted; all-ignored gives 0, not NaN. ``reduction="none"``
    returns the (N, H, W) map with zeros where not counted.
    """
    V.check_logits(logits)
    target = V.check_target(target, logits)
    weight = V.check_weight(weight, logits)
    V.check_reduction(reduction)
    ignore_index = int(ignore_index)
    if logits.numel() == 0:
        return _empty_map(logits) if reduction == "none" else _zero_loss(logits)
    _, impl = resolve("cross_entropy2d", backend, logits.device, logits.dtype)
    if not getattr(impl, "checks_labels", False):
        V.check_label_range(target, logits.shape[1], ignore_index)
    return impl(logits, target, weight, ignore_index, reduction)


def bce_with_logits2d(d_logits: torch.Tensor, target: Union[float, torch.Tensor], *,
                      ignore_mask: Optional[torch.Tensor] = None, reduction: str = "mean",
                      backend: str = "auto") -> torch.Tensor:
    """Binary cross-entropy with logits over a discriminator map, numerically stable.

    ``d_logits`` is (N, 1, H, W) or (N, H, W); ``target`` a float (0. or 1.) or a float map of that shape;
    ``ignore_mask`` a bool map, True = not counted. ``reduction="none"`` returns a map shaped like ``d_logits``.
    """
    d = V.check_map(d_logits, None, "d_logits")
    target = V.check_bce_target(target, d)
    mask = V.check_mask(ignore_mask, d, "d_logits")
    V.check_reduction(reduction)
    if d.numel() == 0:
        return _empty_map(d.unsqueeze(1)).reshape(d_logits.shape) if reduction == "none" else _zero_loss(d)
    _, impl = resolve("bce_with_logits2d", backend, d.device, d.dtype)
    out = impl(d, target, mask, reduction)
    return out.reshape(d_logits.shape) if reduction == "none" else out


def semi_cross_entropy2d(logits: torch.Tensor, d_logits: torch.Tensor, *, threshold: float = 0.2,
                         ignore_mask: Optional[torch.Tensor] = None, reduction: str = "mean",
                         return_ratio: bool = False, backend: str = "auto"):
    """The masked self-training loss L_semi.

    Pseudo-label ``argmax_c logits``, kept where ``sigmoid(d_logits) > threshold`` (and not ``ignore_mask``);
    the mean over kept pixels of ``-log softmax(logits)[pseudo-label]``. Gradient flows to ``logits`` only.
    With ``return_ratio=True`` also returns the kept fraction of the considered (non-ignored) pixels, a 0-dim
    tensor without gradient.
    """
    V.check_logits(logits)
    d = V.check_map(d_logits, logits, "d_logits")
    threshold = V.check_threshold(threshold)
    mask = V.check_mask(ignore_mask, d, "d_logits")
    V.check_reduction(reduction)
    if logits.numel() == 0:
        loss = _empty_map(logits) if reduction == "none" else _zero_loss(logits)
        ratio = torch.zeros((), dtype=_acc_dtype(logits), device=logits.device)
    else:
        _, impl = resolve("semi_cross_entropy2d", backend, logits.device, logits.dtype)
        loss, ratio = impl(logits, d, threshold, mask, reduction)
    return (loss, ratio) if return_ratio else loss


def one_hot2d(target: torch.Tensor, num_classes: int, *, ignore_index: int = 255,
              dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
    """(N, H, W) labels -> (N, C, H, W) one-hot; ignored pixels are all-zero vectors (D's real input)."""
    V.check_tensor(target, "target")
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise TypeError(f"target must hold integer class indices, got {target.dtype}")
    if target.dim() != 3:
        raise ValueError(f"target must be 3-D (N, H, W), got shape {tuple(target.shape)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    target = target if target.dtype == torch.int64 else target.long()
    ignore_index = int(ignore_index)
    V.check_label_range(target, num_classes, ignore_index)
    if target.numel() == 0:
        n, h, w = target.shape
        return torch.zeros((n, num_classes, h, w), dtype=dtype, device=target.device)
    _, impl = resolve("one_hot2d", backend, target.device, dtype if dtype.is_floating_point else torch.float32)
    return impl(target, num_classes, ignore_index, dtype)


def generator_loss(logits: torch.Tensor, d_logits: torch.Tensor, target: Optional[torch.Tensor] = None, *,
                   lambda_adv: float, lambda_semi: float = 0.1, threshold: float = 0.2, ignore_index: int = 255,
                   backend: str = "auto") -> GeneratorLoss:
    """The generator's whole loss for one batch, in one fused pass.

    Labelled batch (``target`` given): ``total = L_ce + lambda_adv·L_adv``, the adversarial term a mean over
    pixels whose label is not ``ignore_index``. Unlabelled batch (``target=None``):
    ``total = lambda_adv·L_adv + lambda_semi·L_semi`` (pass ``lambda_semi=0`` before ``semi_start``).
    ``d_logits = D(softmax2d(logits))`` is (N, 1, H, W) or (N, H, W); its gradient flows back through D.
    Returns ``GeneratorLoss(total, ce, adv, semi, semi_ratio)``.
    """
    V.check_logits(logits)
    d = V.check_map(d_logits, logits, "d_logits")
    lambda_adv = V.check_number(lambda_adv, "lambda_adv")
    lambda_semi = V.check_number(lambda_semi, "lambda_semi")
    threshold = V.check_threshold(threshold)
    ignore_index = int(ignore_index)
    if target is not None:
        target = V.check_target(target, logits)
    if logits.numel() == 0:
        zero = _zero_loss(logits, d)
        z = torch.zeros((), dtype=zero.dtype, device=zero.device)
        return GeneratorLoss(zero, z, z, z, z)
    _, impl = resolve("generator_loss", backend, logits.device, logits.dtype)
    if target is not None and not getattr(impl, "checks_labels", False):
        V.check_label_range(target, logits.shape[1], ignore_index)
    return impl(logits, d, target, lambda_adv, lambda_semi, threshold, ignore_index)


def discriminator_loss(d_fake: torch.Tensor, d_real: torch.Tensor, *, ignore_mask_fake: Optional[torch.Tensor] = None,
                       ignore_mask_real: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """``BCE(d_fake, 0) + BCE(d_real, 1)``, each a mean over its non-ignored pixels, in one launch.

    The two maps may differ in shape (e.g. predictions of labelled and unlabelled images as fake, ground truth
    as real). The paper halves this; do so yourself if you follow it.
    """
    fake = V.check_map(d_fake, None, "d_fake")
    real = V.check_map(d_real, None, "d_real")
    V.check_same_device(fake, "d_fake", real, "d_real")
    mask_fake = V.check_mask(ignore_mask_fake, fake, "d_fake", "ignore_mask_fake")
    mask_real = V.check_mask(ignore_mask_real, real, "d_real", "ignore_mask_real")
    if fake.numel() == 0 and real.numel() == 0:
        return _zero_loss(fake, real)
    if fake.dtype != real.dtype:
        dtype = _acc_dtype(fake, real)
        fake, real = fake.to(dtype), real.to(dtype)
    _, impl = resolve("discriminator_loss", backend, fake.device, fake.dtype)
    return impl(fake, real, mask_fake, mask_real)
