"""The ``cuda`` backend: launches of the CUDA C++ kernels of ``fastadvseg/kernels/cuda/``.

Only launches: the autograd rule, the means and the label error are shared by every backend
(``fastadvseg/_ops.py``, ``fastadvseg/functional.py``). Path of every call: this module -> the binding
``fastadvseg._cuda_kernels`` (``csrc/cuda/binding.cpp``, launching on torch's current stream) -> a launcher in
``fastadvseg/kernels/cuda/*.cu``. Each loss kernel reads the logits once and writes, in the same pass, the gradient of the
loss's unnormalised sum into a separate buffer (never into the logits); a one-block launch reduces the per-block
partial sums in a fixed order (deterministic, no float atomics). Nothing here waits for the GPU.

The extension is built by setup.py only where torch has CUDA and a CUDA toolkit is found:
``pip install -e . --no-build-isolation`` on such a machine. Importing this module raises ImportError saying why
when it was not built.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from ._launch import DiscriminatorLaunch, GeneratorLaunch, LossLaunch, ones

if torch.version.cuda is None:
    raise ImportError(
        f"the 'cuda' backend needs a CUDA build of torch; this torch ({torch.__version__}) has no CUDA "
        "(use backend='triton', 'cpu' or 'reference')"
    )
try:
    from .. import _cuda_kernels as _ext
except ImportError as exc:
    raise ImportError(
        "the 'cuda' backend's extension fastadvseg._cuda_kernels is not built or does not load "
        f"({exc}); build it with `pip install -e . --no-build-isolation` on a machine with a CUDA build of torch "
        "and the CUDA toolkit (nvcc, CUDA_HOME)"
    ) from exc

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def supports_device(device: Union[torch.device, str]) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def softmax2d(logits: torch.Tensor) -> torch.Tensor:
    return _ext.softmax2d_forward(logits)


def softmax2d_backward(probs: torch.Tensor, grad_probs: torch.Tensor) -> torch.Tensor:
    return _ext.softmax2d_backward(probs, grad_probs)


def cross_entropy2d(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int,
                    label_smoothing: float, reduction: str, store_grad: bool) -> LossLaunch:
    sums, loss_map, grad, bad = _ext.cross_entropy2d_forward(
        logits, target, None if weight is None else weight.detach(), ignore_index, label_smoothing,
        reduction == "none", store_grad)
    return LossLaunch(sums, loss_map, grad, ones(1, logits.device), bad)


def bce_with_logits2d(d_logits: torch.Tensor, target_map: Optional[torch.Tensor], target_value: float,
                      ignore_mask: Optional[torch.Tensor], reduction: str, store_grad: bool) -> LossLaunch:
    sums, loss_map, grad = _ext.bce_with_logits2d_forward(
        d_logits, None if target_map is None else target_map.detach(), target_value, ignore_mask,
        reduction == "none", store_grad)
    return LossLaunch(sums, loss_map, grad, ones(1, d_logits.device))


def semi_cross_entropy2d(logits: torch.Tensor, d_logits: torch.Tensor, threshold: float,
                         ignore_mask: Optional[torch.Tensor], reduction: str, store_grad: bool) -> LossLaunch:
    sums, loss_map, grad = _ext.semi_cross_entropy2d_forward(logits, d_logits, threshold, ignore_mask,
                                                            reduction == "none", store_grad)
    return LossLaunch(sums, loss_map, grad, ones(1, logits.device))


def generator_loss(logits: torch.Tensor, d_logits: torch.Tensor, target: Optional[torch.Tensor], lambda_adv: float,
                   lambda_semi: float, threshold: float, ignore_index: int, store_gx: bool,
                   store_gz: bool) -> GeneratorLaunch:
    sums, gx, gz, bad = _ext.generator_loss_forward(logits, d_logits, target, threshold, ignore_index, store_gx,
                                                    store_gz)
    return GeneratorLaunch(sums, gx, gz, ones(2, logits.device), bad if target is not None else None)


def discriminator_loss(d_fake: torch.Tensor, d_real: torch.Tensor, ignore_mask_fake: Optional[torch.Tensor],
                       ignore_mask_real: Optional[torch.Tensor], store_fake: bool,
                       store_real: bool) -> DiscriminatorLaunch:
    sums, gf, gr = _ext.discriminator_loss_forward(d_fake, d_real, ignore_mask_fake, ignore_mask_real, store_fake,
                                                   store_real)
    return DiscriminatorLaunch(sums, gf, gr, ones(2, d_fake.device))


def one_hot2d(target: torch.Tensor, num_classes: int, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    n, h, w = target.shape
    kernel_dtype = dtype if dtype.itemsize in (1, 2, 4, 8) else torch.float32  # complex128: via float32
    out = torch.empty((n, num_classes, h, w), dtype=kernel_dtype, device=target.device)
    _ext.one_hot2d_forward(target, out, ignore_index)
    return out if kernel_dtype == dtype else out.to(dtype)
