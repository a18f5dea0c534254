"""``nn.Module`` wrappers of the fused losses in :mod:`fastadvseg.functional`.

Each module stores the keyword arguments of its function at construction and passes the tensors of ``forward`` on
to it, so ``Module(**kw)(*tensors)`` is ``fastadvseg.<function>(*tensors, **kw)``: same values, gradients, errors
and backends. They hold no parameters (``CrossEntropy2d``'s class weights are a buffer, so ``.to()`` moves them).
The upsampling of low-resolution logits and D maps: ``size`` and ``align_corners`` at construction (a fixed crop
size), or ``forward(..., size=target.shape[-2:])`` per call, which takes precedence.

    import fastadvseg.nn as fnn
    criterion = fnn.CrossEntropy2d(ignore_index=255, align_corners=True)
    loss = criterion(logits, target, size=target.shape[-2:])   # logits at 1/8 of the labels
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from . import functional as F

Size = Optional[Sequence[int]]


class _Loss(nn.Module):
    """What every module here keeps: the upsampling (``size``, ``align_corners``) and the backend."""

    def __init__(self, size: Size, align_corners: bool, backend: str):
        super().__init__()
        self.size = None if size is None else tuple(size)
        self.align_corners, self.backend = align_corners, backend

    def _common(self, size: Size) -> dict:
        """The keywords every call passes on: a ``size`` given to ``forward`` wins over the constructor's."""
        return dict(size=self.size if size is None else size, align_corners=self.align_corners,
                    backend=self.backend)


class Softmax2d(_Loss):
    """Channel softmax of (N, C, H, W) logits with a fused backward: :func:`fastadvseg.softmax2d`.

    forward(logits, *, size=None) -> probabilities, same dtype and memory format as ``logits``, at ``size`` when
    upsampled.

    Args:
        size: (H, W) to upsample the logits to bilinearly first (None: no upsampling; ``forward``'s wins).
        align_corners: as in ``F.interpolate`` (default False).
        backend: "auto", "triton", "cuda", "cpu" or "reference" (see :func:`fastadvseg.available_backends`).
    """

    def __init__(self, *, size: Size = None, align_corners: bool = False, backend: str = "auto"):
        super().__init__(size, align_corners, backend)

    def forward(self, logits, *, size: Size = None):
        return F.softmax2d(logits, **self._common(size))


class CrossEntropy2d(_Loss):
    """Drop-in for ``nn.CrossEntropyLoss`` on (N, C, H, W) logits: :func:`fastadvseg.cross_entropy2d`.

    forward(logits, target, *, size=None) -> float32 loss: a 0-dim mean or sum, or the (N, H, W) map for
    ``reduction="none"``. ``target`` is (N, H, W) integer labels in ``[0, C)`` or ``ignore_index``, at ``size``
    when the logits are upsampled.

    Args:
        weight: optional (C,) class weights, stored as a buffer; the mean divides by their total over the counted
            pixels, as PyTorch does.
        ignore_index: label whose pixels are not counted (default 255).
        reduction: "mean", "sum" or "none".
        label_smoothing: PyTorch's label smoothing, in ``[0, 1]``.
        size: (H, W) to upsample the logits to bilinearly inside the op (None: no upsampling; ``forward``'s wins).
        align_corners: as in ``F.interpolate`` (default False).
        backend: "auto", "triton", "cuda", "cpu" or "reference".
    """

    def __init__(self, weight: Optional[torch.Tensor] = None, *, ignore_index: int = 255, reduction: str = "mean",
                 label_smoothing: float = 0.0, size: Size = None, align_corners: bool = False,
                 backend: str = "auto"):
        super().__init__(size, align_corners, backend)
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing = label_smoothing

    def forward(self, logits, target, *, size: Size = None):
        return F.cross_entropy2d(logits, target, self.weight, ignore_index=self.ignore_index,
                                 reduction=self.reduction, label_smoothing=self.label_smoothing, **self._common(size))


class BCEWithLogits2d(_Loss):
    """Numerically stable binary cross-entropy over a discriminator map: :func:`fastadvseg.bce_with_logits2d`.

    forward(d_logits, target, ignore_mask=None, *, size=None) -> float32 loss. ``d_logits`` is (N, 1, H, W) or
    (N, H, W); ``target`` a float (0.0 = fake, 1.0 = real) or a map of the same shape (of ``size`` when
    upsampled); ``ignore_mask`` a bool map of pixels not counted.

    Args:
        reduction: "mean", "sum" or "none".
        size: (H, W) to upsample ``d_logits`` to bilinearly inside the op (None: no upsampling; ``forward``'s wins).
        align_corners: as in ``F.interpolate`` (default False).
        backend: "auto", "triton", "cuda", "cpu" or "reference".
    """

    def __init__(self, *, reduction: str = "mean", size: Size = None, align_corners: bool = False,
                 backend: str = "auto"):
        super().__init__(size, align_corners, backend)
        self.reduction = reduction

    def forward(self, d_logits, target, ignore_mask=None, *, size: Size = None):
        return F.bce_with_logits2d(d_logits, target, ignore_mask=ignore_mask, reduction=self.reduction,
                                   **self._common(size))


class SemiCrossEntropy2d(_Loss):
    """The masked self-training loss L_semi of Hung et al.: :func:`fastadvseg.semi_cross_entropy2d`.

    forward(logits, d_logits, ignore_mask=None, *, size=None) -> float32 loss (and the kept fraction if
    ``return_ratio``). The pseudo-label is the argmax of ``logits``, counted where ``sigmoid(d_logits) >
    threshold``; the gradient goes to ``logits`` only.

    Args:
        threshold: the confidence threshold T_semi (default 0.2).
        reduction: "mean", "sum" or "none".
        return_ratio: also return the fraction of counted pixels the mask kept.
        size: (H, W) to upsample the logits and ``d_logits`` (each at its own resolution) to bilinearly inside the
            op (None: no upsampling; ``forward``'s wins).
        align_corners: as in ``F.interpolate`` (default False).
        backend: "auto", "triton", "cuda", "cpu" or "reference".
    """

    def __init__(self, *, threshold: float = 0.2, reduction: str = "mean", return_ratio: bool = False,
                 size: Size = None, align_corners: bool = False, backend: str = "auto"):
        super().__init__(size, align_corners, backend)
        self.threshold, self.reduction, self.return_ratio = threshold, reduction, return_ratio

    def forward(self, logits, d_logits, ignore_mask=None, *, size: Size = None):
        return F.semi_cross_entropy2d(logits, d_logits, threshold=self.threshold, ignore_mask=ignore_mask,
                                      reduction=self.reduction, return_ratio=self.return_ratio, **self._common(size))


class PseudoLabelCrossEntropy2d(_Loss):
    """The confidence-masked pseudo-label loss of self-training and mean-teacher training:
    :func:`fastadvseg.pseudo_label_cross_entropy2d`.

    forward(logits, teacher_logits=None, d_logits=None, ignore_mask=None, *, size=None) -> float32 loss (and the
    kept fraction if ``return_ratio``). The pseudo-label is the argmax of ``teacher_logits`` (of ``logits``
    themselves, detached, when None), counted where the teacher's max softmax >= ``confidence_threshold`` and,
    with ``d_logits``, where ``sigmoid(d_logits) > d_threshold``; the gradient goes to ``logits`` only.

    Args:
        confidence_threshold: tau, the teacher's confidence a pixel needs (default 0.95; None: no such test).
        d_threshold: the threshold of D's confidence, used with ``d_logits`` (default 0.2).
        reduction: "mean", "sum" or "none".
        return_ratio: also return the fraction of counted pixels the masks kept.
        size: (H, W) to upsample the logits, the teacher and ``d_logits`` (each at its own resolution) to
            bilinearly inside the op (None: no upsampling; ``forward``'s wins).
        align_corners: as in ``F.interpolate`` (default False).
        backend: "auto", "triton", "cuda", "cpu" or "reference".
    """

    def __init__(self, *, confidence_threshold: Optional[float] = 0.95, d_threshold: float = 0.2,
                 reduction: str = "mean", return_ratio: bool = False, size: Size = None, align_corners: bool = False,
                 backend: str = "auto"):
        super().__init__(size, align_corners, backend)
        self.confidence_threshold, self.d_threshold = confidence_threshold, d_threshold
        self.reduction, self.return_ratio = reduction, return_ratio

    def forward(self, logits, teacher_logits=None, d_logits=None, ignore_mask=None, *, size: Size = None):
        return F.pseudo_label_cross_entropy2d(logits, teacher_logits, confidence_threshold=self.confidence_threshold,
                                              d_logits=d_logits, d_threshold=self.d_threshold,
                                              ignore_mask=ignore_mask, reduction=self.reduction,
                                              return_ratio=self.return_ratio, **self._common(size))


class GeneratorLoss(_Loss):
    """The generator's whole loss for one batch in one fused pass: :func:`fastadvseg.generator_loss`.

    forward(logits, d_logits, target=None, *, size=None) -> :class:`fastadvseg.GeneratorLossOutput` ``(total, ce,
    adv, semi, semi_ratio)``; call ``.total.backward()``. With ``target`` (labelled batch) ``total = L_ce +
    lambda_adv·L_adv``; without (unlabelled batch) ``total = lambda_adv·L_adv + lambda_semi·L_semi``. ``d_logits``
    is ``D(softmax2d(logits))``.

    Args:
        lambda_adv: weight of the adversarial term (the paper: 0.01 labelled, 0.001 unlabelled).
        lambda_semi: weight of L_semi on an unlabelled batch (default 0.1; 0 before ``semi_start``).
        threshold: T_semi (default 0.2).
        ignore_index: label whose pixels are not counted (default 255).
        size: (H, W) to upsample the logits and ``d_logits`` (each at its own resolution) to bilinearly inside the
            op (None: no upsampling; ``forward``'s wins).
        align_corners: as in ``F.interpolate`` (default False).
        backend: "auto", "triton", "cuda", "cpu" or "reference".
    """

    def __init__(self, *, lambda_adv: float, lambda_semi: float = 0.1, threshold: float = 0.2,
                 ignore_index: int = 255, size: Size = None, align_corners: bool = False, backend: str = "auto"):
        super().__init__(size, align_corners, backend)
        self.lambda_adv, self.lambda_semi, self.threshold = lambda_adv, lambda_semi, threshold
        self.ignore_index = ignore_index

    def forward(self, logits, d_logits, target=None, *, size: Size = None):
        return F.generator_loss(logits, d_logits, target, lambda_adv=self.lambda_adv, lambda_semi=self.lambda_semi,
                                threshold=self.threshold, ignore_index=self.ignore_index, **self._common(size))


class DiscriminatorLoss(_Loss):
    """The discriminator's loss ``BCE(d_fake, 0) + BCE(d_real, 1)`` in one launch: :func:`fastadvseg.discriminator_loss`.

    forward(d_fake, d_real, ignore_mask_fake=None, ignore_mask_real=None, *, size=None) -> float32 0-dim loss,
    each term a mean over its non-ignored pixels (halve it for the paper's ``/2``). ``d_fake`` is D on the
    generator's detached softmax, ``d_real`` D on the one-hot ground truth (:func:`fastadvseg.one_hot2d`).

    Args:
        size: (H, W) to upsample both maps to bilinearly inside the op (None: no upsampling; ``forward``'s wins).
        align_corners: as in ``F.interpolate`` (default False).
        backend: "auto", "triton", "cuda", "cpu" or "reference".
    """

    def __init__(self, *, size: Size = None, align_corners: bool = False, backend: str = "auto"):
        super().__init__(size, align_corners, backend)

    def forward(self, d_fake, d_real, ignore_mask_fake=None, ignore_mask_real=None, *, size: Size = None):
        return F.discriminator_loss(d_fake, d_real, ignore_mask_fake=ignore_mask_fake,
                                    ignore_mask_real=ignore_mask_real, **self._common(size))
