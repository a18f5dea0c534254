"""The ``reference`` backend: plain PyTorch ops, float32 accumulation (float64 stays float64).

It is the ground truth the kernels are tested against, the fallback where no kernel backend runs, and the
definition of what every op computes. Like a kernel backend it returns the op's *sums* (loss sums and the counts
they are divided by) and per-pixel maps; ``fastadvseg/functional.py`` forms the means from them, the same way for
every backend. Everything here is differentiable torch code that ``torch.compile`` and ``torch.export`` trace,
and it is also what the registered ops differentiate for double backward and for the gradient of learnt class
weights or BCE target maps (``fastadvseg/_ops.py``).

Arguments arrive validated (``fastadvseg/_validate.py``); discriminator-sized maps arrive as (N, H, W) views.
``valid`` is the mask of counted labels from :func:`fastadvseg._labels.valid_labels` (which reports bad labels)
or None, in which case labels outside [0, C) that are not ``ignore_index`` count as ignored.

Fused upsampling (``size``, ``align_corners``): the logits and discriminator maps not already at ``size`` are
upsampled by ``F.interpolate(..., mode="bilinear")`` in accumulation precision, literally, and the op runs on the
result; labels, masks and target maps are at ``size``. This is the oracle of the kernels, which interpolate on the
fly and never hold the full-resolution logits or their gradient.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._keep import keep_mask

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def supports_device(device: torch.device) -> bool:
    return True


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Accumulation precision: float64 for float64 inputs, float32 for everything else."""
    return x.double() if x.dtype == torch.float64 else x.float()


def _zero(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=like.dtype, device=like.device)


def upsample(x: torch.Tensor, size, align_corners: bool) -> torch.Tensor:
    """``x`` (N, C, h, w) logits or an (N, h, w) map, bilinearly resized to ``size`` = (H, W) in accumulation
    precision (the resized values are never rounded back to a half dtype); ``x`` itself when ``size`` is None or
    already its size."""
    if size is None or tuple(x.shape[-2:]) == tuple(size):
        return x
    four = x.dim() == 4
    out = F.interpolate(_acc(x if four else x.unsqueeze(1)), size=tuple(size), mode="bilinear",
                        align_corners=bool(align_corners))
    return out if four else out.squeeze(1)


def counted_labels(target: torch.Tensor, num_classes: int, ignore_index: int,
                   valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    if valid is not None:
        return valid
    return (target != ignore_index) & (target >= 0) & (target < num_classes)


def softmax2d(logits: torch.Tensor, size=None, align_corners: bool = False) -> torch.Tensor:
    """In the logits' dtype and memory format, as every backend returns it (torch.softmax on CPU returns
    contiguous)."""
    out = torch.softmax(_acc(upsample(logits, size, align_corners)), dim=1).to(logits.dtype)
    if not out.is_contiguous(memory_format=torch.channels_last) and logits.dim() == 4 \
            and logits.is_contiguous(memory_format=torch.channels_last) and not logits.is_contiguous():
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _log_softmax_at(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(log softmax (N, C, H, W) in accumulation precision, -log p[label] (N, H, W))."""
    logp = torch.log_softmax(_acc(logits), dim=1)
    return logp, -logp.gather(1, labels.unsqueeze(1)).squeeze(1)


def cross_entropy2d(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int,
                    label_smoothing: float = 0.0, valid: Optional[torch.Tensor] = None, size=None,
                    align_corners: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """([sum of the per-pixel losses, sum of w[y] over counted pixels], per-pixel loss map (N, H, W)).

    Per counted pixel: ``(1 - eps) w[y] (-log p[y]) + eps / C * sum_c w[c] (-log p[c])`` (PyTorch's label
    smoothing; w = 1 without class weights); uncounted pixels give 0.
    """
    logits = upsample(logits, size, align_corners)
    c = logits.shape[1]
    valid = counted_labels(target, c, ignore_index, valid)
    labels = torch.where(valid, target, torch.zeros_like(target))
    logp, nll = _log_softmax_at(logits, labels)
    if weight is None:
        w_y = valid.to(nll.dtype)
        count = valid.sum().to(nll.dtype)  # an integer count (exact), rounded once: not a float32 sum of ones
    else:
        w = weight.to(nll.dtype)
        w_y = torch.where(valid, w[labels], _zero(nll))
        count = w_y.sum()
    loss = nll * w_y
    if label_smoothing:
        smooth = -(logp.sum(1) if weight is None else (logp * w.view(1, c, 1, 1)).sum(1))
        loss = (1.0 - label_smoothing) * loss + (label_smoothing / c) * smooth
    # where, not a product: a NaN logit at an ignored pixel must not reach the loss (PyTorch's behaviour)
    loss_map = torch.where(valid, loss, _zero(nll))
    return torch.stack([loss_map.sum(), count]), loss_map


def bce_with_logits2d(d_logits: torch.Tensor, target_map: Optional[torch.Tensor], target_value: float,
                      ignore_mask: Optional[torch.Tensor], size=None, align_corners: bool = False
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """([loss sum, counted pixels], loss map): BCE(sigmoid(z), t) per pixel, 0 where ``ignore_mask``."""
    z = _acc(upsample(d_logits, size, align_corners))
    t = torch.full_like(z, target_value) if target_map is None else _acc(target_map).expand_as(z)
    loss_map = F.binary_cross_entropy_with_logits(z, t, reduction="none")
    if ignore_mask is None:
        count = torch.full((), z.numel(), dtype=z.dtype, device=z.device)
    else:
        loss_map = torch.where(ignore_mask, _zero(z), loss_map)
        count = (~ignore_mask).sum().to(z.dtype)
    return torch.stack([loss_map.sum(), count]), loss_map


def _confident(d_logits: torch.Tensor, threshold: float, ignore_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The keep mask of L_semi: ``sigmoid(z) > T`` decided as ``float32(z) > logit(float32(T))`` (exactly, see
    fastadvseg/_keep.py: T = 0 keeps every z but -inf and NaN; NaN is never kept), not ignored."""
    keep = keep_mask(d_logits.detach(), threshold)
    return keep if ignore_mask is None else keep & ~ignore_mask


def semi_cross_entropy2d(logits: torch.Tensor, d_logits: torch.Tensor, threshold: float,
                         ignore_mask: Optional[torch.Tensor], size=None, align_corners: bool = False
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """([loss sum, kept pixels, considered pixels], loss map): -log p[argmax] where sigmoid(z) > threshold
    (:func:`_confident`)."""
    logits = upsample(logits, size, align_corners)
    d_logits = upsample(d_logits, size, align_corners)
    pseudo = logits.detach().argmax(dim=1)
    keep = _confident(d_logits, threshold, ignore_mask)
    _, nll = _log_softmax_at(logits, pseudo)
    loss_map = torch.where(keep, nll, _zero(nll))
    considered = keep.numel() if ignore_mask is None else (~ignore_mask).sum()
    considered = torch.as_tensor(considered, device=nll.device).to(nll.dtype)
    return torch.stack([loss_map.sum(), keep.sum().to(nll.dtype), considered]), loss_map


def teacher_confidence(teacher_logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(confidence, pseudo-label) per pixel of (N, C, H, W) teacher logits, no gradient: the max softmax
    ``1 / sum_c exp(t_c - max_c t)`` in accumulation precision and the argmax (the first maximum on ties)."""
    t = _acc(teacher_logits.detach())
    top, label = t.max(dim=1)
    return 1.0 / torch.exp(t - top.unsqueeze(1)).sum(dim=1), label


def pseudo_labels(teacher_logits: torch.Tensor, d_logits: Optional[torch.Tensor],
                  confidence_threshold: Optional[float], d_threshold: float,
                  ignore_mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(keep mask, pseudo-label) per pixel of the teacher's logits and D's map, both at the loss's resolution: kept
    where the confidence (:func:`teacher_confidence`) >= ``confidence_threshold`` (no test when None), where
    ``sigmoid(d_logits) > d_threshold`` (:func:`_confident`; no test when ``d_logits`` is None), and not ignored."""
    confidence, pseudo = teacher_confidence(teacher_logits)
    keep = torch.ones_like(pseudo, dtype=torch.bool) if ignore_mask is None else ~ignore_mask
    if confidence_threshold is not None:
        keep = keep & (confidence >= confidence_threshold)
    if d_logits is not None:
        keep = keep & _confident(d_logits, d_threshold, None)
    return keep, pseudo


def pseudo_label_cross_entropy2d(logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                                 d_logits: Optional[torch.Tensor], confidence_threshold: Optional[float],
                                 d_threshold: float, ignore_mask: Optional[torch.Tensor], size=None,
                                 align_corners: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """([loss sum, kept pixels, considered pixels], loss map): the student's ``-log softmax(logits)[y]`` with
    y = argmax of the teacher's logits (the logits themselves when ``teacher_logits`` is None), kept as
    :func:`pseudo_labels` says. Each of the three inputs is upsampled to ``size`` from its own resolution."""
    logits = upsample(logits, size, align_corners)
    teacher = logits if teacher_logits is None else upsample(teacher_logits, size, align_corners)
    d = None if d_logits is None else upsample(d_logits, size, align_corners)
    keep, pseudo = pseudo_labels(teacher, d, confidence_threshold, d_threshold, ignore_mask)
    _, nll = _log_softmax_at(logits, pseudo)
    loss_map = torch.where(keep, nll, _zero(nll))
    considered = keep.numel() if ignore_mask is None else (~ignore_mask).sum()
    considered = torch.as_tensor(considered, device=nll.device).to(nll.dtype)
    return torch.stack([loss_map.sum(), keep.sum().to(nll.dtype), considered]), loss_map


def generator_loss(logits: torch.Tensor, d_logits: torch.Tensor, target: Optional[torch.Tensor], threshold: float,
                   ignore_index: int, valid: Optional[torch.Tensor] = None, size=None,
                   align_corners: bool = False) -> torch.Tensor:
    """[term sum, term count, adv sum, adv count, kept, considered]: the term is the cross-entropy (labelled)
    or L_semi (unlabelled); adv = BCE(z, 1) over the counted (labelled) or all (unlabelled) pixels."""
    logits = upsample(logits, size, align_corners)
    d_logits = upsample(d_logits, size, align_corners)
    if target is not None:
        valid = counted_labels(target, logits.shape[1], ignore_index, valid)
        ce, _ = cross_entropy2d(logits, target, None, ignore_index, 0.0, valid)
        adv, _ = bce_with_logits2d(d_logits, None, 1.0, ~valid)
        zero = torch.zeros(2, dtype=ce.dtype, device=ce.device)
        return torch.cat([ce, adv.to(ce.dtype), zero])
    adv, _ = bce_with_logits2d(d_logits, None, 1.0, None)
    semi, _ = semi_cross_entropy2d(logits, d_logits, threshold, None)
    return torch.cat([semi[:2], adv.to(semi.dtype), semi[1:]])


def discriminator_loss(d_fake: torch.Tensor, d_real: torch.Tensor, ignore_mask_fake: Optional[torch.Tensor],
                       ignore_mask_real: Optional[torch.Tensor], size=None,
                       align_corners: bool = False) -> torch.Tensor:
    """[fake sum, fake count, real sum, real count] of BCE(d_fake, 0) and BCE(d_real, 1)."""
    fake, _ = bce_with_logits2d(d_fake, None, 0.0, ignore_mask_fake, size, align_corners)
    real, _ = bce_with_logits2d(d_real, None, 1.0, ignore_mask_real, size, align_corners)
    dtype = torch.promote_types(fake.dtype, real.dtype)
    return torch.cat([fake.to(dtype), real.to(dtype)])


def one_hot2d(target: torch.Tensor, num_classes: int, ignore_index: int, dtype: torch.dtype,
              valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    n, h, w = target.shape
    valid = counted_labels(target, num_classes, ignore_index, valid)
    out = torch.zeros((n, num_classes, h, w), dtype=dtype, device=target.device)
    labels = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)
    return out.scatter_(1, labels, valid.unsqueeze(1).to(dtype))
