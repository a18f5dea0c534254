"""The public loss API.

Each function checks its arguments once, resolves a backend (``fastadvseg/_dispatch.py``) and gets the op's sums
and counts from it: for a kernel backend (``triton``, ``cuda``, ``cpu``) by calling the registered op
(``_ops.generator_loss`` is ``torch.ops.fastadvseg.generator_loss.default``; ``fastadvseg/_ops.py`` holds each op's
autograd rule and device implementation), for ``reference`` from its plain PyTorch formulas. The means, the totals
and the reductions are formed here, the same way for every backend. All take NCHW tensors of any strides,
float32/float16/bfloat16 logits (float64 runs on the reference backend), on CPU or CUDA, and ``backend=``
("auto", "reference", "triton", "cpu", "cuda").

Losses are returned in float32 (float64 for float64 inputs): accumulation is always in float32, and rounding the
result back to float16 would only lose what the kernel computed. Gradients have the dtype of their input.
Every mean over an empty set (or a total class weight of exactly 0) is 0 with zero gradient, never NaN.

Every function over logits or discriminator maps takes ``size=(H, W)`` and ``align_corners``: logits and D maps
at another resolution are then upsampled to ``size`` inside the op, exactly as
``F.interpolate(x.float(), size, mode="bilinear", align_corners=align_corners)`` would, without that tensor (or
its gradient) being made by the kernel backends; labels, masks, BCE target maps and ``reduction="none"`` maps are
at ``size``, and means count its pixels.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import _labels
from . import _ops
from . import _validate as V
from ._dispatch import resolve
from ._types import GeneratorLossOutput
from .backends import reference

__all__ = [
    "softmax2d",
    "cross_entropy2d",
    "bce_with_logits2d",
    "semi_cross_entropy2d",
    "pseudo_label_cross_entropy2d",
    "one_hot2d",
    "generator_loss",
    "discriminator_loss",
    "GeneratorLossOutput",
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


def _wants_grad(t: Optional[torch.Tensor]) -> bool:
    """Whether a kernel should store the gradient of ``t`` (decided here: grad mode is off inside the op)."""
    return t is not None and torch.is_grad_enabled() and t.requires_grad


def _mean(total: torch.Tensor, count: torch.Tensor, count_has_grad: bool = False) -> torch.Tensor:
    """total / count; 0 with a zero gradient when count is exactly 0 (a negative count, from signed class
    weights, divides like PyTorch does).

    A count is a constant unless it is a sum of learnt class weights (``count_has_grad``; an op's sums are one
    output, so its counts look differentiable to autograd either way). A constant count makes the mean one
    product by its inverse (one autograd node), and d(mean)/d(total) exactly that inverse, the number a backend
    that pre-scales its stored gradient (``cpu``) already divided by."""
    if not count_has_grad:
        count = count.detach()  # (no gradient, so the 1/0 that the where drops cannot become a NaN in backward)
        return total * torch.where(count != 0, count.reciprocal(), 0.0)
    nonzero = count != 0
    return torch.where(nonzero, total / torch.where(nonzero, count, 1.0), 0.0)


def _reduce(sums: torch.Tensor, loss_map: torch.Tensor, reduction: str, count_has_grad: bool = False) -> torch.Tensor:
    if reduction == "none":
        return loss_map
    return sums[0] if reduction == "sum" else _mean(sums[0], sums[1], count_has_grad)


def _kernel(backend: str) -> bool:
    return backend != "reference"


Size = Optional[Sequence[int]]


def _check_resize(size, align_corners) -> tuple:
    return V.check_size(size), V.check_align_corners(align_corners)


def _resampling(size, **inputs: torch.Tensor):
    """``size`` if it resamples one of ``inputs`` (which must then have pixels), else None: inputs already at
    ``size`` take the plain op, bit for bit."""
    if size is None:
        return None
    for name, t in inputs.items():
        V.check_resizable(t, name, size)
    return size if any(V.spatial(t) != tuple(size) for t in inputs.values()) else None


def _size_arg(size):
    """``size`` as the registered ops take it."""
    return None if size is None else list(size)


def _stores(t: torch.Tensor, reduction: str, size) -> bool:
    """Whether a kernel should store t's gradient: not for the per-pixel map of an upsampled ``t``, whose
    full-resolution incoming gradient cannot scale a low-resolution buffer (the op's rule differentiates the
    reference formula instead)."""
    return _wants_grad(t) and not (reduction == "none" and size is not None and V.spatial(t) != tuple(size))


def softmax2d(logits: torch.Tensor, *, size: Size = None, align_corners: bool = False,
              backend: str = "auto") -> torch.Tensor:
    """Channel softmax of (N, C, H, W) logits, in the logits' dtype and memory format; fused backward.

    With ``size=(H, W)`` the logits are upsampled bilinearly to it first (the output is (N, C, H, W), D's input at
    the labels' size; the gradient comes back at the logits' own size)."""
    V.check_logits(logits)
    size, align_corners = _check_resize(size, align_corners)
    size = _resampling(size, logits=logits)
    if logits.numel() == 0:
        return torch.softmax(reference.upsample(logits, size, align_corners), dim=1).to(logits.dtype)
    name = resolve("softmax2d", backend, logits.device, logits.dtype)
    if not _kernel(name):
        return reference.softmax2d(logits, size, align_corners)
    return _ops.softmax2d(logits, name, _size_arg(size), align_corners)


def cross_entropy2d(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None, *,
                    ignore_index: int = 255, reduction: str = "mean", label_smoothing: float = 0.0,
                    size: Size = None, align_corners: bool = False, backend: str = "auto") -> torch.Tensor:
    """Drop-in for ``F.cross_entropy`` on (N, C, H, W) logits and (N, H, W) labels.

    Same value and gradient as PyTorch, with class weights (the weighted mean divides by the signed sum of
    w[y] over the counted pixels; a weight that requires grad gets its gradient) and with ``label_smoothing``.
    Differences, on purpose: ``ignore_index`` defaults to 255, the loss is float32, and a mean over nothing (all
    ignored, or a total weight of exactly 0) is 0 with a zero gradient. ``reduction="none"`` returns the
    (N, H, W) map with zeros where not counted.

    With ``size=(H, W)`` (e.g. ``target.shape[-2:]``), logits at another resolution (e.g. 1/8 of the labels) are
    upsampled bilinearly to it inside the op, as ``F.interpolate(logits.float(), size, mode="bilinear",
    align_corners=align_corners)`` then this loss would; ``target`` is at ``size``.
    """
    V.check_logits(logits)
    size, align_corners = _check_resize(size, align_corners)
    target = V.check_target(target, logits, size=size)
    weight = V.check_weight(weight, logits)
    V.check_reduction(reduction)
    label_smoothing = V.check_label_smoothing(label_smoothing)
    ignore_index = V.check_ignore_index(ignore_index)
    size = _resampling(size, logits=logits)
    if logits.numel() == 0:
        if reduction == "none":
            return _empty_map(reference.upsample(logits, size, align_corners))
        return _zero_loss(logits, *([weight] if weight is not None else []))
    name = resolve("cross_entropy2d", backend, logits.device, logits.dtype)
    validate = _labels.label_validation_enabled()
    if _kernel(name):
        sums, loss_map, _, _ = _ops.cross_entropy2d(logits, target, weight, ignore_index, label_smoothing,
                                                    reduction, _stores(logits, reduction, size), validate, name,
                                                    _size_arg(size), align_corners)
    else:
        valid = _labels.valid_labels(target, logits.shape[1], ignore_index) if validate else None
        sums, loss_map = reference.cross_entropy2d(logits, target, weight, ignore_index, label_smoothing, valid,
                                                   size=size, align_corners=align_corners)
    return _reduce(sums, loss_map, reduction, count_has_grad=weight is not None and weight.requires_grad)


def bce_with_logits2d(d_logits: torch.Tensor, target: Union[float, torch.Tensor], *,
                      ignore_mask: Optional[torch.Tensor] = None, reduction: str = "mean", size: Size = None,
                      align_corners: bool = False, backend: str = "auto") -> torch.Tensor:
    """Binary cross-entropy with logits over a discriminator map, numerically stable.

    ``d_logits`` is (N, 1, H, W) or (N, H, W); ``target`` a float (0. or 1.) or a float map of that shape;
    ``ignore_mask`` a bool map, True = not counted. ``reduction="none"`` returns a map shaped like ``d_logits``.
    With ``size=(H, W)``, ``d_logits`` at another resolution is upsampled bilinearly to it inside the op; the
    target map, ``ignore_mask`` and the ``reduction="none"`` map are at ``size``.
    """
    d = V.check_map(d_logits, None, "d_logits")
    size, align_corners = _check_resize(size, align_corners)
    target = V.check_bce_target(target, d, size=size)
    mask = V.check_mask(ignore_mask, d, "d_logits", size=size)
    V.check_reduction(reduction)
    size = _resampling(size, d_logits=d)
    full = tuple(d.shape) if size is None else (d.shape[0], *size)
    map_shape = full if d_logits.dim() == 3 else (full[0], 1, *full[1:])
    if d.numel() == 0:
        if reduction == "none":
            return _empty_map(reference.upsample(d, size, align_corners).unsqueeze(1)).reshape(map_shape)
        return _zero_loss(d)
    name = resolve("bce_with_logits2d", backend, d.device, d.dtype)
    target_map, target_value = (None, target) if isinstance(target, float) else (target.expand(full), 0.0)
    if _kernel(name):
        if target_map is not None and target_map.device != d.device:  # a 0-dim target may live on the CPU
            target_map = target_map.to(d.device)
        sums, loss_map, _, _ = _ops.bce_with_logits2d(d, target_map, target_value, mask, reduction,
                                                      _stores(d, reduction, size), name, _size_arg(size),
                                                      align_corners)
    else:
        sums, loss_map = reference.bce_with_logits2d(d, target_map, target_value, mask, size=size,
                                                     align_corners=align_corners)
    out = _reduce(sums, loss_map, reduction)
    return out.reshape(map_shape) if reduction == "none" else out


def semi_cross_entropy2d(logits: torch.Tensor, d_logits: torch.Tensor, *, threshold: float = 0.2,
                         ignore_mask: Optional[torch.Tensor] = None, reduction: str = "mean",
                         return_ratio: bool = False, size: Size = None, align_corners: bool = False,
                         backend: str = "auto"):
    """The masked self-training loss L_semi.

    Pseudo-label ``argmax_c logits``, kept where ``sigmoid(d_logits) > threshold`` (and not ``ignore_mask``);
    the mean over kept pixels of ``-log softmax(logits)[pseudo-label]``. Gradient flows to ``logits`` only.
    With ``return_ratio=True`` also returns the kept fraction of the considered (non-ignored) pixels, a 0-dim
    tensor without gradient. With ``size=(H, W)``, the logits and D's output, each at its own resolution, are
    upsampled bilinearly to it inside the op (the mask is ``sigmoid(upsampled d_logits) > threshold``);
    ``ignore_mask`` and the ``reduction="none"`` map are at ``size``.
    """
    V.check_logits(logits)
    size, align_corners = _check_resize(size, align_corners)
    d = V.check_map(d_logits, logits, "d_logits", size=size)
    threshold = V.check_threshold(threshold)
    mask = V.check_mask(ignore_mask, d, "d_logits", size=size)
    V.check_reduction(reduction)
    size = _resampling(size, logits=logits, d_logits=d)
    if logits.numel() == 0:
        loss = _empty_map(reference.upsample(logits, size, align_corners)) if reduction == "none" \
            else _zero_loss(logits)
        ratio = torch.zeros((), dtype=_acc_dtype(logits), device=logits.device)
    else:
        name = resolve("semi_cross_entropy2d", backend, logits.device, logits.dtype)
        if _kernel(name):
            sums, loss_map, _, _ = _ops.semi_cross_entropy2d(logits, d.detach(), threshold, mask, reduction,
                                                             _stores(logits, reduction, size), name,
                                                             _size_arg(size), align_corners)
        else:
            sums, loss_map = reference.semi_cross_entropy2d(logits, d.detach(), threshold, mask, size=size,
                                                            align_corners=align_corners)
        loss = _reduce(sums, loss_map, reduction)
        ratio = (sums[1] / sums[2].clamp_min(1)).detach()
    return (loss, ratio) if return_ratio else loss


def pseudo_label_cross_entropy2d(logits: torch.Tensor, teacher_logits: Optional[torch.Tensor] = None, *,
                                 confidence_threshold: Optional[float] = 0.95,
                                 d_logits: Optional[torch.Tensor] = None, d_threshold: float = 0.2,
                                 ignore_mask: Optional[torch.Tensor] = None, reduction: str = "mean",
                                 return_ratio: bool = False, size: Size = None, align_corners: bool = False,
                                 backend: str = "auto"):
    """The confidence-masked pseudo-label loss of self-training and mean-teacher training (FixMatch, UniMatch).

    The student's ``-log softmax(logits)[y]`` with the pseudo-label ``y = argmax_c teacher_logits`` (the first
    maximum on ties), kept where the teacher is confident, ``max_c softmax(teacher_logits) >=
    confidence_threshold`` (no such test when None), where ``sigmoid(d_logits) > d_threshold`` (only when D's map
    ``d_logits``, (N, 1, H, W) or (N, H, W), is given) and not ``ignore_mask``; the mean over kept pixels, 0 with a
    zero gradient when none is kept. ``teacher_logits=None`` is self-training: the student's own logits, detached,
    read once. The teacher is cast to the logits' dtype and must match their N and C. The gradient flows to
    ``logits`` only, never to the teacher or D. With ``return_ratio=True`` also returns the kept fraction of the
    considered (not ignored) pixels, a 0-dim tensor without gradient.

    With ``size=(H, W)``, the logits, the teacher and D's map, each at its own resolution, are upsampled
    bilinearly to it inside the op (confidence, pseudo-label and D's test on the upsampled maps); ``ignore_mask``
    and the ``reduction="none"`` map are at ``size``. Without it all must share the logits' (H, W).
    ``semi_cross_entropy2d(logits, d, threshold=T)`` is this loss with ``confidence_threshold=None,
    d_logits=d, d_threshold=T``.
    """
    V.check_logits(logits)
    size, align_corners = _check_resize(size, align_corners)
    teacher = V.check_teacher(teacher_logits, logits, size=size)
    d = None if d_logits is None else V.check_map(d_logits, logits, "d_logits", size=size)
    confidence_threshold = V.check_unit_interval(confidence_threshold, "confidence_threshold",
                                                 "max softmax(teacher) >= it keeps a pixel", optional=True)
    d_threshold = V.check_unit_interval(d_threshold, "d_threshold", "sigmoid(d_logits) > it keeps a pixel")
    mask = V.check_mask(ignore_mask, logits.select(1, 0), "the logits' (N, H, W)", size=size)
    V.check_reduction(reduction)
    inputs = dict(logits=logits, teacher_logits=teacher, d_logits=d)
    size = _resampling(size, **{k: v for k, v in inputs.items() if v is not None})
    teacher = None if teacher is None else teacher.detach()
    d = None if d is None else d.detach()
    if logits.numel() == 0:
        loss = _empty_map(reference.upsample(logits, size, align_corners)) if reduction == "none" \
            else _zero_loss(logits)
        ratio = torch.zeros((), dtype=_acc_dtype(logits), device=logits.device)
    else:
        name = resolve("pseudo_label_cross_entropy2d", backend, logits.device, logits.dtype)
        if _kernel(name):
            sums, loss_map, _, _ = _ops.pseudo_label_cross_entropy2d(
                logits, teacher, d, confidence_threshold, d_threshold, mask, reduction,
                _stores(logits, reduction, size), name, _size_arg(size), align_corners)
        else:
            sums, loss_map = reference.pseudo_label_cross_entropy2d(
                logits, teacher, d, confidence_threshold, d_threshold, mask, size=size, align_corners=align_corners)
        loss = _reduce(sums, loss_map, reduction)
        ratio = (sums[1] / sums[2].clamp_min(1)).detach()
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
    ignore_index = V.check_ignore_index(ignore_index)
    if target.numel() == 0:
        n, h, w = target.shape
        return torch.zeros((n, num_classes, h, w), dtype=dtype, device=target.device)
    name = resolve("one_hot2d", backend, target.device, dtype if dtype.is_floating_point else torch.float32)
    validate = _labels.label_validation_enabled()
    if _kernel(name):
        return _ops.one_hot2d(target, num_classes, ignore_index, dtype, validate, name)
    valid = _labels.valid_labels(target, num_classes, ignore_index) if validate else None
    return reference.one_hot2d(target, num_classes, ignore_index, dtype, valid)


def generator_loss(logits: torch.Tensor, d_logits: torch.Tensor, target: Optional[torch.Tensor] = None, *,
                   lambda_adv: float, lambda_semi: float = 0.1, threshold: float = 0.2, ignore_index: int = 255,
                   size: Size = None, align_corners: bool = False, backend: str = "auto") -> GeneratorLossOutput:
    """The generator's whole loss for one batch, in one fused pass.

    Labelled batch (``target`` given): ``total = L_ce + lambda_adv·L_adv``, the adversarial term a mean over
    pixels whose label is not ``ignore_index``. Unlabelled batch (``target=None``):
    ``total = lambda_adv·L_adv + lambda_semi·L_semi`` (pass ``lambda_semi=0`` before ``semi_start``).
    ``d_logits = D(softmax2d(logits))`` is (N, 1, H, W) or (N, H, W); its gradient flows back through D.
    Returns ``GeneratorLossOutput(total, ce, adv, semi, semi_ratio)``.
    With ``size=(H, W)``, the logits and D's output, each at its own resolution (e.g. 1/8 and 1/32 of the labels),
    are upsampled bilinearly to it inside the op, so L_semi's mask is ``sigmoid(upsampled d_logits) > threshold``;
    ``target`` is at ``size``.
    """
    V.check_logits(logits)
    size, align_corners = _check_resize(size, align_corners)
    d = V.check_map(d_logits, logits, "d_logits", size=size)
    lambda_adv = V.check_number(lambda_adv, "lambda_adv")
    lambda_semi = V.check_number(lambda_semi, "lambda_semi")
    threshold = V.check_threshold(threshold)
    ignore_index = V.check_ignore_index(ignore_index)
    if target is not None:
        target = V.check_target(target, logits, size=size)
    size = _resampling(size, logits=logits, d_logits=d)
    if logits.numel() == 0:
        zero = _zero_loss(logits, d)
        z = torch.zeros((), dtype=zero.dtype, device=zero.device)
        return GeneratorLossOutput(zero, z, z, z, z)
    name = resolve("generator_loss", backend, logits.device, logits.dtype)
    if _kernel(name):
        sums, _, _, _ = _ops.generator_loss(logits, d, target, lambda_adv, lambda_semi, threshold, ignore_index,
                                            _wants_grad(logits), _wants_grad(d), _labels.label_validation_enabled(),
                                            name, _size_arg(size), align_corners)
    else:
        valid = None
        if target is not None and _labels.label_validation_enabled():
            valid = _labels.valid_labels(target, logits.shape[1], ignore_index)
        sums = reference.generator_loss(logits, d, target, threshold, ignore_index, valid, size=size,
                                        align_corners=align_corners)
    term, adv = _mean(sums[0], sums[1]), _mean(sums[2], sums[3])
    zero = torch.zeros((), dtype=sums.dtype, device=sums.device)
    if target is not None:
        return GeneratorLossOutput(term + lambda_adv * adv, term, adv, zero, zero)
    ratio = (sums[4] / sums[5].clamp_min(1)).detach()
    return GeneratorLossOutput(lambda_adv * adv + lambda_semi * term, zero, adv, term, ratio)


def discriminator_loss(d_fake: torch.Tensor, d_real: torch.Tensor, *, ignore_mask_fake: Optional[torch.Tensor] = None,
                       ignore_mask_real: Optional[torch.Tensor] = None, size: Size = None,
                       align_corners: bool = False, backend: str = "auto") -> torch.Tensor:
    """``BCE(d_fake, 0) + BCE(d_real, 1)``, each a mean over its non-ignored pixels, in one launch.

    The two maps may differ in shape (e.g. predictions of labelled and unlabelled images as fake, ground truth
    as real). The paper halves this; do so yourself if you follow it. With ``size=(H, W)``, each map at another
    resolution is upsampled bilinearly to it inside the op; the ignore masks are at ``size``.
    """
    fake = V.check_map(d_fake, None, "d_fake")
    real = V.check_map(d_real, None, "d_real")
    V.check_same_device(fake, "d_fake", real, "d_real")
    size, align_corners = _check_resize(size, align_corners)
    mask_fake = V.check_mask(ignore_mask_fake, fake, "d_fake", "ignore_mask_fake", size=size)
    mask_real = V.check_mask(ignore_mask_real, real, "d_real", "ignore_mask_real", size=size)
    size = _resampling(size, d_fake=fake, d_real=real)
    if fake.numel() == 0 and real.numel() == 0:
        return _zero_loss(fake, real)
    if fake.dtype != real.dtype:
        dtype = _acc_dtype(fake, real)
        fake, real = fake.to(dtype), real.to(dtype)
    name = resolve("discriminator_loss", backend, fake.device, fake.dtype)
    if _kernel(name):
        sums, _, _, _ = _ops.discriminator_loss(fake, real, mask_fake, mask_real, _wants_grad(fake),
                                                _wants_grad(real), name, _size_arg(size), align_corners)
    else:
        sums = reference.discriminator_loss(fake, real, mask_fake, mask_real, size=size, align_corners=align_corners)
    return _mean(sums[0], sums[1]) + _mean(sums[2], sums[3])
