"""What a kernel backend is: the one description of what its launches receive and return.

A kernel backend (``triton``, ``cuda``, ``cpu``) is a module of ``fastadvseg.backends``, named by one row of the
backend table (``fastadvseg/_dispatch.py``). Only launches: it runs kernels and returns what they computed; the
argument checks, the autograd rule, the label error (``fastadvseg/_ops.py``) and the means
(``fastadvseg/functional.py``) are shared by every backend. The module defines:

* ``DTYPES``, the logit dtypes it runs, and ``supports_device(device) -> bool``, whether it runs on that device now;
* importing it raises ``ImportError`` with a readable reason when it is not usable on this machine;
* optionally ``find_bad_labels(target, num_classes, ignore_index)`` (one_hot2d's label check; torch ops otherwise);
* one launch per registered op, named after it and called by the op's device implementation after its checks,
  with the op's arguments less ``validate`` and ``backend``, in the op's order:

  - ``softmax2d(logits)`` -> probabilities, in the logits' dtype, dense layouts keeping their memory format;
  - ``softmax2d_backward(probs, grad_probs)`` -> the gradient of the logits, in probs' dtype;
  - ``cross_entropy2d(logits, target, weight, ignore_index, label_smoothing, reduction, store_grad)``,
    ``bce_with_logits2d(d_logits, target_map, target_value, ignore_mask, reduction, store_grad)``,
    ``semi_cross_entropy2d(logits, d_logits, threshold, ignore_mask, reduction, store_grad)``,
    ``pseudo_label_cross_entropy2d(logits, teacher_logits, d_logits, confidence_threshold, d_threshold,
    ignore_mask, reduction, store_grad)`` -> :class:`LossLaunch` (the pseudo-label op's sums: [loss, kept,
    considered]; ``teacher_logits`` None means the logits themselves, read once; the teacher's dtype, N and C are
    the logits'; ``d_logits`` and ``confidence_threshold`` may be None, which drops that test; the gradient is the
    logits' only);
  - ``generator_loss(logits, d_logits, target, lambda_adv, lambda_semi, threshold, ignore_index,
    store_grad_logits, store_grad_d)`` -> :class:`GeneratorLaunch`;
  - ``discriminator_loss(d_fake, d_real, ignore_mask_fake, ignore_mask_real, store_grad_fake, store_grad_real)``
    -> :class:`DiscriminatorLaunch`;
  - ``one_hot2d(target, num_classes, ignore_index, dtype)`` -> contiguous (N, C, H, W) one-hot of ``dtype``.

  The launches that read logits or D maps also take keyword-only ``size`` (a full-resolution (H, W), or None) and
  ``align_corners`` (``softmax2d_backward``: ``low_size``, the logits' own (h, w)): they then compute the op on the
  inputs bilinearly upsampled to ``size`` (``reference.upsample``), labels, masks and loss maps at ``size``, and
  return gradient buffers at the inputs' own resolution.

What a launch receives (checked by the registered op): logits (N, C, H, W) of any strides in one of ``DTYPES``, on
a device it supports; a teacher's logits of the same dtype, N and C, any strides; discriminator maps ``d_*``
(N, H, W) of any floating dtype; labels int64 (N, H, W); masks bool
(N, H, W), True = ignored; ``target_map`` a float (N, H, W) map or None for the constant ``target_value``;
``weight`` (C,) float or None. It never writes its inputs. ``store_grad*`` asks for a gradient buffer; ``reduction``
"none" asks for the per-pixel loss map (float32, zeros where not counted).

What it returns, before any mean or scaling: ``sums``, a float32 vector on the tensors' device, whose entries each
registered op names (``sums=(...)`` in ``fastadvseg/_ops.py``); the gradient buffers, in the logits' dtype for
the logits (any float dtype for a D map: the op converts it), where buffer k holds ``scales[k]`` times the gradient
of the sum it belongs to (a backend that knows the count before its kernel runs may pre-scale by 1/count, and the
generator's by its lambdas, see ``cpu``; the others return scales of 1 with :func:`ones`); ``bad``, ``[count,
first value]`` of the labels outside [0, C) that are not ignore_index (int64, a tensor or two ints), for ops that
read labels. Absent outputs are None.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

Bad = Union[torch.Tensor, Sequence[int], None]


class LossLaunch(NamedTuple):
    sums: torch.Tensor
    loss_map: Optional[torch.Tensor]
    grad: Optional[torch.Tensor]
    scales: torch.Tensor
    bad: Bad = None


class GeneratorLaunch(NamedTuple):
    sums: torch.Tensor  # [term sum, term count, adv sum, adv count, kept, considered]
    grad: Optional[torch.Tensor]  # of the term sum w.r.t. the logits
    grad_d: Optional[torch.Tensor]  # of the adv sum w.r.t. d_logits
    scales: torch.Tensor  # (2,)
    bad: Bad = None


class DiscriminatorLaunch(NamedTuple):
    sums: torch.Tensor  # [fake sum, fake count, real sum, real count]
    grad_fake: Optional[torch.Tensor]
    grad_real: Optional[torch.Tensor]
    scales: torch.Tensor  # (2,)


def ones(n: int, device) -> torch.Tensor:
    """Scales of a backend that does not pre-scale its gradients."""
    return torch.ones((n,), dtype=torch.float32, device=device)
