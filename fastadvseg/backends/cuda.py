"""The ``cuda`` backend: launches of the CUDA C++ kernels of ``fastadvseg/kernels/cuda/``.

Only launches: the autograd rule, the means and the label error are shared by every backend
(``fastadvseg/_ops.py``, ``fastadvseg/functional.py``). Path of every call: this module -> the binding
``fastadvseg._cuda_kernels`` (``csrc/cuda/binding.cpp``, launching on torch's current stream) -> a launcher in
``fastadvseg/kernels/cuda/*.cu``. Each loss kernel reads the logits once and writes, in the same pass, the gradient of the
loss's unnormalised sum into a separate buffer (never into the logits); a one-block launch reduces the per-block
partial sums in a fixed order (deterministic, no float atomics). Nothing here waits for the GPU.

Fused bilinear upsampling: every logit op and D-map op takes ``size`` (the labels' (H, W)) and ``align_corners``.
An input whose (h, w) differs from ``size`` is then used as ``F.interpolate(x.float(), size, mode="bilinear",
align_corners=align_corners)`` would give it, without that tensor ever existing: the kernels interpolate each
pixel's logits on the fly and gather the gradient at the input's own resolution (deterministic, no atomics), in the
input's shape and dtype; labels, masks, target maps and loss maps are at ``size``, counts are over its pixels.

The extension is built by setup.py only where torch has CUDA and a CUDA toolkit is found:
``pip install -e . --no-build-isolation`` on such a machine. Importing this module raises ImportError saying why
when it was not built.
"""
from __future__ import annotations

import operator
from typing import List, Optional, Sequence, Tuple, Union

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

Size = Optional[Tuple[int, int]]


def supports_device(device: Union[torch.device, str]) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


# ------------------------------------------------------------------------------------- upsampling arguments

def _grid(size: Optional[Sequence[int]], align_corners: bool, name: str = "size") -> Optional[List[int]]:
    """``size`` as the binding takes it (None, or [H, W] of positive ints), after checking it and align_corners."""
    if not isinstance(align_corners, bool):
        raise TypeError(f"align_corners must be a bool, got {type(align_corners).__name__}")
    if size is None:
        return None
    if isinstance(size, torch.Tensor) or not isinstance(size, Sequence) or len(size) != 2:
        raise ValueError(f"{name} must be a pair (H, W), got {size!r}")
    try:
        if any(isinstance(v, bool) for v in size):
            raise TypeError
        h, w = operator.index(size[0]), operator.index(size[1])
    except TypeError:
        raise TypeError(f"{name} must be two ints, got {tuple(size)!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} must be positive, got {(h, w)}")
    return [h, w]


def _check_input(name: str, t: Optional[torch.Tensor], grid: Optional[List[int]]) -> None:
    """An input upsampled to the grid must have pixels to interpolate from."""
    if t is None or grid is None or list(t.shape[-2:]) == grid:
        return
    if t.shape[-2] == 0 or t.shape[-1] == 0:
        raise ValueError(f"cannot upsample {name} of shape {tuple(t.shape)} to size {tuple(grid)}: it has no pixels")


def _check_at_grid(name: str, t: Optional[torch.Tensor], n: int, grid: Optional[List[int]]) -> None:
    """A map read at every label-grid pixel (labels, masks, target maps, D maps of generator_loss) must be
    (N, H, W) at the grid."""
    if t is None or grid is None or t.dim() == 0:
        return
    if tuple(t.shape) != (n, *grid):
        raise ValueError(f"{name} must have shape (N, H, W) = {(n, *grid)} for size {tuple(grid)}, got "
                         f"{tuple(t.shape)}")


def _check_batch(name: str, t: torch.Tensor, n: int, like: str) -> None:
    if t.dim() != 3 or t.shape[0] != n:
        raise ValueError(f"{name} of shape {tuple(t.shape)} must be (N, h, w) with the N = {n} of {like}")


# ----------------------------------------------------------------------------------------------- launches

def softmax2d(logits: torch.Tensor, *, size: Size = None, align_corners: bool = False) -> torch.Tensor:
    grid = _grid(size, align_corners)
    _check_input("logits", logits, grid)
    return _ext.softmax2d_forward(logits, grid, align_corners)


def softmax2d_backward(probs: torch.Tensor, grad_probs: torch.Tensor, *, low_size: Size = None,
                       align_corners: bool = False) -> torch.Tensor:
    low = _grid(low_size, align_corners, "low_size")
    _check_input("probs", probs, low)
    return _ext.softmax2d_backward(probs, grad_probs, low, align_corners)


def cross_entropy2d(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int,
                    label_smoothing: float, reduction: str, store_grad: bool, *, size: Size = None,
                    align_corners: bool = False) -> LossLaunch:
    grid = _grid(size, align_corners)
    _check_input("logits", logits, grid)
    _check_at_grid("target", target, logits.shape[0], grid)
    sums, loss_map, grad, bad = _ext.cross_entropy2d_forward(
        logits, target, None if weight is None else weight.detach(), ignore_index, label_smoothing,
        reduction == "none", store_grad, grid, align_corners)
    return LossLaunch(sums, loss_map, grad, ones(1, logits.device), bad)


def bce_with_logits2d(d_logits: torch.Tensor, target_map: Optional[torch.Tensor], target_value: float,
                      ignore_mask: Optional[torch.Tensor], reduction: str, store_grad: bool, *, size: Size = None,
                      align_corners: bool = False) -> LossLaunch:
    grid = _grid(size, align_corners)
    _check_input("d_logits", d_logits, grid)
    _check_at_grid("target", target_map, d_logits.shape[0], grid)
    _check_at_grid("ignore_mask", ignore_mask, d_logits.shape[0], grid)
    sums, loss_map, grad = _ext.bce_with_logits2d_forward(
        d_logits, None if target_map is None else target_map.detach(), target_value, ignore_mask,
        reduction == "none", store_grad, grid, align_corners)
    return LossLaunch(sums, loss_map, grad, ones(1, d_logits.device))


def semi_cross_entropy2d(logits: torch.Tensor, d_logits: torch.Tensor, threshold: float,
                         ignore_mask: Optional[torch.Tensor], reduction: str, store_grad: bool, *,
                         size: Size = None, align_corners: bool = False) -> LossLaunch:
    grid = _grid(size, align_corners)
    if grid is not None:
        _check_input("logits", logits, grid)
        _check_batch("d_logits", d_logits, logits.shape[0], "the logits")
        _check_input("d_logits", d_logits, grid)
        _check_at_grid("ignore_mask", ignore_mask, logits.shape[0], grid)
    sums, loss_map, grad = _ext.semi_cross_entropy2d_forward(logits, d_logits, threshold, ignore_mask,
                                                            reduction == "none", store_grad, grid, align_corners)
    return LossLaunch(sums, loss_map, grad, ones(1, logits.device))


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b are the very same elements (one a detached alias of the other, say)."""
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride() and a.device == b.device)


def pseudo_label_cross_entropy2d(logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                                 d_logits: Optional[torch.Tensor], confidence_threshold: Optional[float],
                                 d_threshold: float, ignore_mask: Optional[torch.Tensor], reduction: str,
                                 store_grad: bool, *, size: Size = None, align_corners: bool = False) -> LossLaunch:
    grid = _grid(size, align_corners)
    if teacher_logits is not None and _same_view(teacher_logits, logits):
        teacher_logits = None  # the same values: one pass over the logits gives the same bits
    if grid is not None:
        _check_input("logits", logits, grid)
        _check_input("teacher_logits", teacher_logits, grid)
        if d_logits is not None:
            _check_batch("d_logits", d_logits, logits.shape[0], "the logits")
            _check_input("d_logits", d_logits, grid)
        _check_at_grid("ignore_mask", ignore_mask, logits.shape[0], grid)
    sums, loss_map, grad = _ext.pseudo_label_cross_entropy2d_forward(
        logits, None if teacher_logits is None else teacher_logits.detach(),
        None if d_logits is None else d_logits.detach(),
        None if confidence_threshold is None else float(confidence_threshold), float(d_threshold), ignore_mask,
        reduction == "none", store_grad, grid, align_corners)
    return LossLaunch(sums, loss_map, grad, ones(1, logits.device))


def generator_loss(logits: torch.Tensor, d_logits: torch.Tensor, target: Optional[torch.Tensor], lambda_adv: float,
                   lambda_semi: float, threshold: float, ignore_index: int, store_gx: bool,
                   store_gz: bool, *, size: Size = None, align_corners: bool = False) -> GeneratorLaunch:
    grid = _grid(size, align_corners)
    if grid is not None:
        _check_input("logits", logits, grid)
        _check_batch("d_logits", d_logits, logits.shape[0], "the logits")
        _check_input("d_logits", d_logits, grid)
        _check_at_grid("target", target, logits.shape[0], grid)
    sums, gx, gz, bad = _ext.generator_loss_forward(logits, d_logits, target, threshold, ignore_index, store_gx,
                                                    store_gz, grid, align_corners)
    return GeneratorLaunch(sums, gx, gz, ones(2, logits.device), bad if target is not None else None)


def discriminator_loss(d_fake: torch.Tensor, d_real: torch.Tensor, ignore_mask_fake: Optional[torch.Tensor],
                       ignore_mask_real: Optional[torch.Tensor], store_fake: bool,
                       store_real: bool, *, size: Size = None, align_corners: bool = False) -> DiscriminatorLaunch:
    grid = _grid(size, align_corners)
    _check_input("d_fake", d_fake, grid)
    _check_input("d_real", d_real, grid)
    _check_at_grid("ignore_mask_fake", ignore_mask_fake, d_fake.shape[0], grid)
    _check_at_grid("ignore_mask_real", ignore_mask_real, d_real.shape[0], grid)
    sums, gf, gr = _ext.discriminator_loss_forward(d_fake, d_real, ignore_mask_fake, ignore_mask_real, store_fake,
                                                   store_real, grid, align_corners)
    return DiscriminatorLaunch(sums, gf, gr, ones(2, d_fake.device))


def one_hot2d(target: torch.Tensor, num_classes: int, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    n, h, w = target.shape
    kernel_dtype = dtype if dtype.itemsize in (1, 2, 4, 8) else torch.float32  # complex128: via float32
    out = torch.empty((n, num_classes, h, w), dtype=kernel_dtype, device=target.device)
    _ext.one_hot2d_forward(target, out, ignore_index)
    return out if kernel_dtype == dtype else out.to(dtype)
