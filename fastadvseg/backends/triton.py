"""The ``triton`` backend: launches of the Triton kernels of ``fastadvseg.kernels.triton``.

Only launches: the autograd rule, the means and the label error are shared by every backend
(``fastadvseg/_ops.py``, ``fastadvseg/functional.py``). Each kernel computes its loss sums and, in the same pass,
the gradient of the unnormalised sum into a separate buffer (never into the logits); partial sums are reduced with
torch on the device (deterministic, no atomics), so nothing here waits for the GPU.

Every logit and D-map launch takes keyword-only ``size`` and ``align_corners``: with ``size = (H, W)``, each
input whose spatial size differs from it is read as ``F.interpolate(x.float(), size, mode="bilinear",
align_corners=align_corners)`` without that tensor being made (``kernels/triton/bilinear.py``); labels, masks,
target maps and loss maps are at (H, W), counts are of (H, W) pixels, and each gradient keeps its input's
low-resolution shape (the adjoint of the upsampling, gathered in a fixed order: no atomics).

Runs CUDA tensors, and CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was first imported (the
kernels then run in Triton's numpy interpreter: how CI without a GPU tests the GPU kernels).
"""
from __future__ import annotations

import functools
import os
from typing import Dict, Optional, Sequence, Union

import torch

try:
    import triton  # noqa: F401  (the kernels below need it; fail here with a readable reason)
except ImportError as exc:  # pragma: no cover - depends on the machine
    raise ImportError(
        f"the 'triton' backend needs the triton package, which could not be imported ({exc}); the CUDA builds "
        "of torch on Linux bring it, otherwise `pip install \"fastadvseg[triton]\"`; on CPU tensors use "
        "backend='cpu' or 'reference'"
    ) from exc

from ..kernels.triton import bce_with_logits as _bce
from ..kernels.triton import bilinear as _bilinear
from ..kernels.triton import cross_entropy as _ce
from ..kernels.triton import discriminator_loss as _disc
from ..kernels.triton import generator_loss as _gen
from ..kernels.triton import one_hot as _one_hot
from ..kernels.triton import pseudo_label as _pseudo
from ..kernels.triton import semi_cross_entropy as _semi
from ..kernels.triton import softmax as _softmax
from ._launch import DiscriminatorLaunch, GeneratorLaunch, LossLaunch, ones

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supports_device(device: Union[torch.device, str]) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    if device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1"
    return False


def _on_tensor_device(launch):
    """Launch on the device of the first tensor (Triton launches on the *current* CUDA device otherwise)."""
    @functools.wraps(launch)
    def wrapper(first, *args, **kwargs):
        if first.is_cuda and first.device.index != torch.cuda.current_device():
            with torch.cuda.device(first.device):
                return launch(first, *args, **kwargs)
        return launch(first, *args, **kwargs)
    return wrapper


def _vector(*values: torch.Tensor) -> torch.Tensor:
    return torch.stack([v.float() for v in values])


Size = Optional[Sequence[int]]


def _full_size(size: Size, n: int, low: Dict[str, torch.Tensor], full: Dict[str, Optional[torch.Tensor]]):
    """``size`` as (H, W), checked with what the kernels address: each low-resolution input (N, [C,] h, w) that is
    read upsampled has h, w >= 1, and each full-resolution map is (N, H, W) (a 0-d BCE target is expanded). None
    without a size."""
    if size is None:
        return None
    size = _bilinear.check_size(size, "the full-resolution (H, W) of " + ", ".join(low))
    for name, t in low.items():
        if t.shape[0] != n:
            raise ValueError(f"{name} has batch size {t.shape[0]}, expected {n} (shape {tuple(t.shape)})")
        if n and _bilinear.resampled(t.shape[-2:], size) and min(t.shape[-2:]) == 0:
            raise ValueError(f"cannot upsample {name} of shape {tuple(t.shape)} to size {size}: it has no pixels")
    for name, t in full.items():
        if t is not None and t.dim() != 0 and tuple(t.shape) != (n, *size):
            raise ValueError(f"{name} of shape {tuple(t.shape)} does not match the full-resolution size "
                             f"{(n, *size)} (N, *size)")
    return size


@_on_tensor_device
def softmax2d(logits: torch.Tensor, *, size: Size = None, align_corners: bool = False) -> torch.Tensor:
    size = _full_size(size, logits.shape[0], {"logits": logits}, {})
    return _softmax.softmax_forward(logits, size, align_corners)


@_on_tensor_device
def softmax2d_backward(probs: torch.Tensor, grad_probs: torch.Tensor, *, low_size: Size = None,
                       align_corners: bool = False) -> torch.Tensor:
    if low_size is not None:
        low_size = _bilinear.check_size(low_size, f"low_size of the logits whose probs are {tuple(probs.shape)}")
    if grad_probs.shape != probs.shape:
        raise ValueError(f"grad_probs of shape {tuple(grad_probs.shape)} does not match probs of shape "
                         f"{tuple(probs.shape)}")
    return _softmax.softmax_backward(probs, grad_probs, low_size, align_corners)


@_on_tensor_device
def cross_entropy2d(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int,
                    label_smoothing: float, reduction: str, store_grad: bool, *, size: Size = None,
                    align_corners: bool = False) -> LossLaunch:
    size = _full_size(size, logits.shape[0], {"logits": logits}, {"target": target})
    total, weight_sum, loss_map, grad, bad = _ce.cross_entropy_forward(
        logits, target, None if weight is None else weight.detach(), ignore_index, label_smoothing=label_smoothing,
        store_grad=store_grad, store_map=reduction == "none", size=size, align_corners=align_corners)
    return LossLaunch(_vector(total, weight_sum), loss_map, grad, ones(1, logits.device), bad)


@_on_tensor_device
def bce_with_logits2d(d_logits: torch.Tensor, target_map: Optional[torch.Tensor], target_value: float,
                      ignore_mask: Optional[torch.Tensor], reduction: str, store_grad: bool, *, size: Size = None,
                      align_corners: bool = False) -> LossLaunch:
    size = _full_size(size, d_logits.shape[0], {"d_logits": d_logits},
                      {"target": target_map, "ignore_mask": ignore_mask})
    target = target_value if target_map is None else target_map.detach()
    total, count, loss_map, grad = _bce.bce_forward(d_logits, target, ignore_mask, store_grad=store_grad,
                                                    store_map=reduction == "none", size=size,
                                                    align_corners=align_corners)
    return LossLaunch(_vector(total, count), loss_map, grad, ones(1, d_logits.device))


@_on_tensor_device
def semi_cross_entropy2d(logits: torch.Tensor, d_logits: torch.Tensor, threshold: float,
                         ignore_mask: Optional[torch.Tensor], reduction: str, store_grad: bool, *, size: Size = None,
                         align_corners: bool = False) -> LossLaunch:
    size = _full_size(size, logits.shape[0], {"logits": logits, "d_logits": d_logits}, {"ignore_mask": ignore_mask})
    total, kept, considered, loss_map, grad = _semi.semi_forward(
        logits, d_logits, threshold, ignore_mask, store_grad=store_grad, store_map=reduction == "none", size=size,
        align_corners=align_corners)
    return LossLaunch(_vector(total, kept, considered), loss_map, grad, ones(1, logits.device))


def _check_teacher(logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], d_logits: Optional[torch.Tensor],
                   size: Size) -> None:
    """The teacher shares the logits' N and C (and, without a size, all three inputs share the logits' (h, w)):
    what the kernels address."""
    if teacher_logits is not None and teacher_logits.shape[:2] != logits.shape[:2]:
        raise ValueError(f"teacher_logits of shape {tuple(teacher_logits.shape)} must have the (N, C) of logits of "
                         f"shape {tuple(logits.shape)}")
    if size is None:
        for name, t in (("teacher_logits", teacher_logits), ("d_logits", d_logits)):
            if t is not None and t.shape[-2:] != logits.shape[-2:]:
                raise ValueError(f"{name} of shape {tuple(t.shape)} does not match logits of shape "
                                 f"{tuple(logits.shape)}; pass size=(H, W) to upsample them inside the op")


@_on_tensor_device
def pseudo_label_cross_entropy2d(logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                                 d_logits: Optional[torch.Tensor], confidence_threshold: Optional[float],
                                 d_threshold: float, ignore_mask: Optional[torch.Tensor], reduction: str,
                                 store_grad: bool, *, size: Size = None, align_corners: bool = False) -> LossLaunch:
    low = {"logits": logits, "teacher_logits": teacher_logits, "d_logits": d_logits}
    size = _full_size(size, logits.shape[0], {k: v for k, v in low.items() if v is not None},
                      {"ignore_mask": ignore_mask})
    _check_teacher(logits, teacher_logits, d_logits, size)
    total, kept, considered, loss_map, grad = _pseudo.pseudo_label_forward(
        logits, None if teacher_logits is None else teacher_logits.detach(),
        None if d_logits is None else d_logits.detach(), confidence_threshold, d_threshold, ignore_mask,
        store_grad=store_grad, store_map=reduction == "none", size=size, align_corners=align_corners)
    return LossLaunch(_vector(total, kept, considered), loss_map, grad, ones(1, logits.device))


@_on_tensor_device
def generator_loss(logits: torch.Tensor, d_logits: torch.Tensor, target: Optional[torch.Tensor], lambda_adv: float,
                   lambda_semi: float, threshold: float, ignore_index: int, store_gx: bool,
                   store_gz: bool, *, size: Size = None, align_corners: bool = False) -> GeneratorLaunch:
    size = _full_size(size, logits.shape[0], {"logits": logits, "d_logits": d_logits}, {"target": target})
    term, term_count, adv, adv_count, gx, gz, bad = _gen.generator_forward(
        logits, d_logits, target, ignore_index, threshold, store_gx=store_gx, store_gz=store_gz, size=size,
        align_corners=align_corners)
    if target is not None:
        kept = considered = torch.zeros((), dtype=torch.float32, device=logits.device)
    else:
        kept = term_count
        pixels = d_logits.numel() if size is None else d_logits.shape[0] * size[0] * size[1]
        considered = torch.full((), float(pixels), dtype=torch.float32, device=logits.device)
    return GeneratorLaunch(_vector(term, term_count, adv, adv_count, kept, considered), gx, gz,
                           ones(2, logits.device), bad)


@_on_tensor_device
def discriminator_loss(d_fake: torch.Tensor, d_real: torch.Tensor, ignore_mask_fake: Optional[torch.Tensor],
                       ignore_mask_real: Optional[torch.Tensor], store_fake: bool,
                       store_real: bool, *, size: Size = None, align_corners: bool = False) -> DiscriminatorLaunch:
    if size is not None:  # the two maps may differ in batch size
        size = _full_size(size, d_fake.shape[0], {"d_fake": d_fake}, {"ignore_mask_fake": ignore_mask_fake})
        _full_size(size, d_real.shape[0], {"d_real": d_real}, {"ignore_mask_real": ignore_mask_real})
    (f_sum, f_count), (r_sum, r_count), gf, gr = _disc.discriminator_forward(
        d_fake, d_real, ignore_mask_fake, ignore_mask_real, grad_fake=store_fake, grad_real=store_real, size=size,
        align_corners=align_corners)
    return DiscriminatorLaunch(_vector(f_sum, f_count, r_sum, r_count), gf, gr, ones(2, d_fake.device))


@_on_tensor_device
def one_hot2d(target: torch.Tensor, num_classes: int, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    return _one_hot.one_hot(target, num_classes, ignore_index, dtype)
