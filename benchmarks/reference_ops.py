"""The eager reference: the loss code a user writes today, with plain PyTorch ops, on the device.

This is the composition of the authors' AdvSemiSeg training loop (F.softmax, a 2-D cross-entropy, torch.sigmoid
of D's output, an argmax pseudo-label, a confidence mask, BCE-with-logits against all-ones / all-zeros, a one-hot
of the ground truth), minus their numpy round trips: the argmax, the mask and the one-hot stay on the device.
Where the authors indexed with a boolean mask (which synchronises and defeats torch.compile), this uses the
sync-free masked mean a careful user writes instead, so the baseline is as strong as plain PyTorch allows.

It is written independently of ``fastadvseg.backends.reference`` on purpose: it is the user's code the fused ops
replace, not our ground truth. Every function is traceable by torch.compile (the "compile" baseline compiles
exactly these functions). Means over an empty set follow PyTorch here (NaN for cross-entropy); benchmark inputs
never produce one.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

IGNORE = 255


def upsample(x: torch.Tensor, size, align_corners: bool = False) -> torch.Tensor:
    """Logits or D maps below the label resolution brought up to it, as segmentation code does before its loss."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


def softmax2d(x: torch.Tensor) -> torch.Tensor:
    return F.softmax(x, dim=1)


def cross_entropy2d(x: torch.Tensor, y: torch.Tensor, ignore_index: int = IGNORE) -> torch.Tensor:
    return F.cross_entropy(x, y, ignore_index=ignore_index)


def bce_with_logits2d(z: torch.Tensor, target: float, ignore_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean BCE(z, target) over pixels where ``ignore_mask`` is False (all pixels without a mask)."""
    loss = F.binary_cross_entropy_with_logits(z, torch.full_like(z, target), reduction="none")
    if ignore_mask is None:
        return loss.mean()
    keep = (~ignore_mask).reshape(loss.shape)
    return (loss * keep).sum() / keep.sum().clamp_min(1)


def semi_cross_entropy2d(x: torch.Tensor, z: torch.Tensor, threshold: float = 0.2,
                         ignore_index: int = IGNORE) -> torch.Tensor:
    """Self-training loss: argmax pseudo-labels, kept where sigmoid(D) > threshold (authors' ``mask_T``)."""
    with torch.no_grad():
        pseudo = x.argmax(dim=1)
        keep = torch.sigmoid(z).squeeze(1) > threshold
        pseudo = torch.where(keep, pseudo, torch.full_like(pseudo, ignore_index))
    return F.cross_entropy(x, pseudo, ignore_index=ignore_index)


def one_hot2d(y: torch.Tensor, num_classes: int, ignore_index: int = IGNORE,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, H, W) labels -> (N, C, H, W) one-hot, all-zero at ignored pixels (D's real input)."""
    valid = y != ignore_index
    out = F.one_hot(torch.where(valid, y, torch.zeros_like(y)), num_classes).permute(0, 3, 1, 2)
    return (out * valid.unsqueeze(1)).to(dtype).contiguous()


def generator_loss(x: torch.Tensor, z: torch.Tensor, y: Optional[torch.Tensor], lambda_adv: float,
                   lambda_semi: float = 0.1, threshold: float = 0.2, ignore_index: int = IGNORE) -> torch.Tensor:
    """G's loss for one batch: labelled ``ce + lambda_adv*adv``; unlabelled ``lambda_adv*adv + lambda_semi*semi``."""
    if y is not None:
        ce = cross_entropy2d(x, y, ignore_index)
        adv = bce_with_logits2d(z, 1.0, y == ignore_index)
        return ce + lambda_adv * adv
    adv = bce_with_logits2d(z, 1.0)
    return lambda_adv * adv + lambda_semi * semi_cross_entropy2d(x, z.detach(), threshold, ignore_index)


def discriminator_loss(d_fake: torch.Tensor, d_real: torch.Tensor,
                       ignore_mask_real: Optional[torch.Tensor] = None) -> torch.Tensor:
    """BCE(D(pred), 0) + BCE(D(onehot(gt)), 1), the real term over non-ignored pixels."""
    return bce_with_logits2d(d_fake, 0.0) + bce_with_logits2d(d_real, 1.0, ignore_mask_real)
