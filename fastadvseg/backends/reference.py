"""The ``reference`` backend: plain PyTorch ops, float32 accumulation (float64 stays float64).

It is the ground truth the kernels are tested against, the fallback where no kernel backend runs, and the
definition of every op's argument list: other backends implement these functions with the same signatures.
Arguments arrive validated (``fastadvseg/_validate.py``); discriminator-sized maps arrive as (N, H, W) views.
Labels outside [0, C) that are not ``ignore_index`` (possible only with label validation off) count as ignored.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .._types import GeneratorLoss

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def supports_device(device: torch.device) -> bool:
    return True


def _acc(x: torch.Tensor) -> torch.Tensor:
    """Accumulation precision: float64 for float64 inputs, float32 for everything else."""
    return x.double() if x.dtype == torch.float64 else x.float()


def _valid_labels(target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    return (target != ignore_index) & (target >= 0) & (target < num_classes)


def _mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """total / count, and 0 (with zero gradient) when nothing was counted."""
    return total / torch.where(count > 0, count, torch.ones_like(count))


def _reduce(loss_map: torch.Tensor, count: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss_map
    if reduction == "sum":
        return loss_map.sum()
    return _mean(loss_map.sum(), count.to(loss_map.dtype))


def softmax2d(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(_acc(logits), dim=1).to(logits.dtype)


def _nll_map(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log softmax(x)[label] per pixel, (N, H, W), in accumulation precision."""
    logp = torch.log_softmax(_acc(logits), dim=1)
    return -logp.gather(1, labels.unsqueeze(1)).squeeze(1)


def cross_entropy2d(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                    ignore_index: int, reduction: str) -> torch.Tensor:
    valid = _valid_labels(target, logits.shape[1], ignore_index)
    labels = torch.where(valid, target, torch.zeros_like(target))
    nll = _nll_map(logits, labels)
    if weight is None:
        w = valid.to(nll.dtype)
    else:
        w = torch.where(valid, weight.to(nll.dtype)[labels], torch.zeros((), dtype=nll.dtype, device=nll.device))
    # where, not a product: a NaN logit at an ignored pixel must not reach the loss (PyTorch's behaviour)
    loss_map = torch.where(valid, nll * w, torch.zeros((), dtype=nll.dtype, device=nll.device))
    return _reduce(loss_map, w.sum(), reduction)


def bce_with_logits2d(d_logits: torch.Tensor, target: Union[float, torch.Tensor],
                      ignore_mask: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    z = _acc(d_logits)
    t = torch.full_like(z, target) if isinstance(target, float) else _acc(target).expand_as(z)
    loss_map = F.binary_cross_entropy_with_logits(z, t, reduction="none")
    if ignore_mask is None:
        count = torch.tensor(z.numel(), device=z.device)
    else:
        loss_map = torch.where(ignore_mask, torch.zeros((), dtype=z.dtype, device=z.device), loss_map)
        count = (~ignore_mask).sum()
    return _reduce(loss_map, count, reduction)


def semi_cross_entropy2d(logits: torch.Tensor, d_logits: torch.Tensor, threshold: float,
                         ignore_mask: Optional[torch.Tensor], reduction: str) -> Tuple[torch.Tensor, torch.Tensor]:
    x = _acc(logits)
    with torch.no_grad():
        pseudo = x.argmax(dim=1)
        keep = torch.sigmoid(d_logits.detach().float()) > threshold
        if ignore_mask is not None:
            keep &= ~ignore_mask
        considered = keep.numel() if ignore_mask is None else int((~ignore_mask).sum())
        kept = keep.sum()
        ratio = kept.to(x.dtype) / max(considered, 1)
    nll = _nll_map(logits, pseudo)
    loss_map = torch.where(keep, nll, torch.zeros((), dtype=nll.dtype, device=nll.device))
    return _reduce(loss_map, kept, reduction), ratio


def find_bad_labels(target: torch.Tensor, num_classes: int, ignore_index: int) -> Tuple[int, int]:
    """(count, first in pixel order) of labels outside [0, C) that are not ``ignore_index``."""
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    count = int(bad.sum())
    return count, (int(target[bad][0]) if count else 0)


def one_hot2d(target: torch.Tensor, num_classes: int, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    n, h, w = target.shape
    valid = _valid_labels(target, num_classes, ignore_index)
    out = torch.zeros((n, num_classes, h, w), dtype=dtype, device=target.device)
    labels = torch.where(valid, target, torch.zeros_like(target)).unsqueeze(1)
    return out.scatter_(1, labels, valid.unsqueeze(1).to(dtype))


def generator_loss(logits: torch.Tensor, d_logits: torch.Tensor, target: Optional[torch.Tensor],
                   lambda_adv: float, lambda_semi: float, threshold: float, ignore_index: int) -> GeneratorLoss:
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    zero = torch.zeros((), dtype=acc, device=logits.device)
    if target is not None:
        ce = cross_entropy2d(logits, target, None, ignore_index, "mean")
        ignored = ~_valid_labels(target, logits.shape[1], ignore_index)
        adv = bce_with_logits2d(d_logits, 1.0, ignored, "mean").to(acc)
        return GeneratorLoss(ce + lambda_adv * adv, ce, adv, zero, zero)
    adv = bce_with_logits2d(d_logits, 1.0, None, "mean").to(acc)
    semi, ratio = semi_cross_entropy2d(logits, d_logits, threshold, None, "mean")
    return GeneratorLoss(lambda_adv * adv + lambda_semi * semi, zero, adv, semi, ratio.detach())


def discriminator_loss(d_fake: torch.Tensor, d_real: torch.Tensor, ignore_mask_fake: Optional[torch.Tensor],
                       ignore_mask_real: Optional[torch.Tensor]) -> torch.Tensor:
    fake = bce_with_logits2d(d_fake, 0.0, ignore_mask_fake, "mean")
    real = bce_with_logits2d(d_real, 1.0, ignore_mask_real, "mean")
    return fake + real  # float64 if either map is float64, else float32
