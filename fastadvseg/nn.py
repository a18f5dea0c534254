"""``nn.Module`` wrappers that mirror :mod:`fastadvseg.functional` (same arguments, stored at construction)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import functional as F


class Softmax2d(nn.Module):
    def __init__(self, *, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def forward(self, logits):
        return F.softmax2d(logits, backend=self.backend)


class CrossEntropy2d(nn.Module):
    def __init__(self, weight: Optional[torch.Tensor] = None, *, ignore_index: int = 255, reduction: str = "mean",
                 label_smoothing: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction, self.backend = ignore_index, reduction, backend
        self.label_smoothing = label_smoothing

    def forward(self, logits, target):
        return F.cross_entropy2d(logits, target, self.weight, ignore_index=self.ignore_index,
                                 reduction=self.reduction, label_smoothing=self.label_smoothing, backend=self.backend)


class BCEWithLogits2d(nn.Module):
    def __init__(self, *, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.reduction, self.backend = reduction, backend

    def forward(self, d_logits, target, ignore_mask=None):
        return F.bce_with_logits2d(d_logits, target, ignore_mask=ignore_mask, reduction=self.reduction,
                                   backend=self.backend)


class SemiCrossEntropy2d(nn.Module):
    def __init__(self, *, threshold: float = 0.2, reduction: str = "mean", return_ratio: bool = False,
                 backend: str = "auto"):
        super().__init__()
        self.threshold, self.reduction, self.return_ratio, self.backend = threshold, reduction, return_ratio, backend

    def forward(self, logits, d_logits, ignore_mask=None):
        return F.semi_cross_entropy2d(logits, d_logits, threshold=self.threshold, ignore_mask=ignore_mask,
                                      reduction=self.reduction, return_ratio=self.return_ratio, backend=self.backend)


class GeneratorLoss(nn.Module):
    def __init__(self, *, lambda_adv: float, lambda_semi: float = 0.1, threshold: float = 0.2,
                 ignore_index: int = 255, backend: str = "auto"):
        super().__init__()
        self.lambda_adv, self.lambda_semi, self.threshold = lambda_adv, lambda_semi, threshold
        self.ignore_index, self.backend = ignore_index, backend

    def forward(self, logits, d_logits, target=None):
        return F.generator_loss(logits, d_logits, target, lambda_adv=self.lambda_adv, lambda_semi=self.lambda_semi,
                                threshold=self.threshold, ignore_index=self.ignore_index, backend=self.backend)


class DiscriminatorLoss(nn.Module):
    def __init__(self, *, backend: str = "auto"):
        super().__init__()
        self.backend = backend

    def forward(self, d_fake, d_real, ignore_mask_fake=None, ignore_mask_real=None):
        return F.discriminator_loss(d_fake, d_real, ignore_mask_fake=ignore_mask_fake,
                                    ignore_mask_real=ignore_mask_real, backend=self.backend)
