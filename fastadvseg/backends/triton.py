"""The ``triton`` backend: launches of the Triton kernels of ``fastadvseg.kernels.triton``.

Only launches: the autograd rule, the means and the label error are shared by every backend
(``fastadvseg/_ops.py``, ``fastadvseg/functional.py``). Each kernel computes its loss sums and, in the same pass,
the gradient of the unnormalised sum into a separate buffer (never into the logits); partial sums are reduced with
torch on the device (deterministic, no atomics), so nothing here waits for the GPU.

Runs CUDA tensors, and CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was first imported (the
kernels then run in Triton's numpy interpreter: how CI without a GPU tests the GPU kernels).
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Union

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
from ..kernels.triton import cross_entropy as _ce
from ..kernels.triton import discriminator_loss as _disc
from ..kernels.triton import generator_loss as _gen
from ..kernels.triton import one_hot as _one_hot
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
    def wrapper(first, *args):
        if first.is_cuda and first.device.index != torch.cuda.current_device():
            with torch.cuda.device(first.device):
                return launch(first, *args)
        return launch(first, *args)
    return wrapper


def _vector(*values: torch.Tensor) -> torch.Tensor:
    return torch.stack([v.float() for v in values])


@_on_tensor_device
def softmax2d(logits: torch.Tensor) -> torch.Tensor:
    return _softmax.softmax_forward(logits)


@_on_tensor_device
def softmax2d_backward(probs: torch.Tensor, grad_probs: torch.Tensor) -> torch.Tensor:
    return _softmax.softmax_backward(probs, grad_probs)


@_on_tensor_device
def cross_entropy2d(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int,
                    label_smoothing: float, reduction: str, store_grad: bool) -> LossLaunch:
    total, weight_sum, loss_map, grad, bad = _ce.cross_entropy_forward(
        logits, target, None if weight is None else weight.detach(), ignore_index, label_smoothing=label_smoothing,
        store_grad=store_grad, store_map=reduction == "none")
    return LossLaunch(_vector(total, weight_sum), loss_map, grad, ones(1, logits.device), bad)


@_on_tensor_device
def bce_with_logits2d(d_logits: torch.Tensor, target_map: Optional[torch.Tensor], target_value: float,
                      ignore_mask: Optional[torch.Tensor], reduction: str, store_grad: bool) -> LossLaunch:
    target = target_value if target_map is None else target_map.detach()
    total, count, loss_map, grad = _bce.bce_forward(d_logits, target, ignore_mask, store_grad=store_grad,
                                                    store_map=reduction == "none")
    return LossLaunch(_vector(total, count), loss_map, grad, ones(1, d_logits.device))


@_on_tensor_device
def semi_cross_entropy2d(logits: torch.Tensor, d_logits: torch.Tensor, threshold: float,
                         ignore_mask: Optional[torch.Tensor], reduction: str, store_grad: bool) -> LossLaunch:
    total, kept, considered, loss_map, grad = _semi.semi_forward(
        logits, d_logits, threshold, ignore_mask, store_grad=store_grad, store_map=reduction == "none")
    return LossLaunch(_vector(total, kept, considered), loss_map, grad, ones(1, logits.device))


@_on_tensor_device
def generator_loss(logits: torch.Tensor, d_logits: torch.Tensor, target: Optional[torch.Tensor], lambda_adv: float,
                   lambda_semi: float, threshold: float, ignore_index: int, store_gx: bool,
                   store_gz: bool) -> GeneratorLaunch:
    term, term_count, adv, adv_count, gx, gz, bad = _gen.generator_forward(
        logits, d_logits, target, ignore_index, threshold, store_gx=store_gx, store_gz=store_gz)
    if target is not None:
        kept = considered = torch.zeros((), dtype=torch.float32, device=logits.device)
    else:
        kept = term_count
        considered = torch.full((), float(d_logits.numel()), dtype=torch.float32, device=logits.device)
    return GeneratorLaunch(_vector(term, term_count, adv, adv_count, kept, considered), gx, gz,
                           ones(2, logits.device), bad)


@_on_tensor_device
def discriminator_loss(d_fake: torch.Tensor, d_real: torch.Tensor, ignore_mask_fake: Optional[torch.Tensor],
                       ignore_mask_real: Optional[torch.Tensor], store_fake: bool,
                       store_real: bool) -> DiscriminatorLaunch:
    (f_sum, f_count), (r_sum, r_count), gf, gr = _disc.discriminator_forward(
        d_fake, d_real, ignore_mask_fake, ignore_mask_real, grad_fake=store_fake, grad_real=store_real)
    return DiscriminatorLaunch(_vector(f_sum, f_count, r_sum, r_count), gf, gr, ones(2, d_fake.device))


@_on_tensor_device
def one_hot2d(target: torch.Tensor, num_classes: int, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    return _one_hot.one_hot(target, num_classes, ignore_index, dtype)
