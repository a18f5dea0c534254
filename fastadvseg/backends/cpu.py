"""The ``cpu`` backend: launches of the C++/OpenMP kernels (``csrc/cpu``, the pybind11 extension ``fastadvseg._C_cpu``).

Only launches: the autograd rule, the means and the label error are shared by every backend
(``fastadvseg/_ops.py``, ``fastadvseg/functional.py``). Each loss makes one kernel call that reads every logit once
and returns the loss sums with the gradient of the loss sum, stored in a separate buffer of the logits' dtype (the
logits are never written). For ``reduction="mean"`` the gradient is stored already divided by the count (times
lambda for the generator's weighted terms), known from a cheap pre-pass over the label / mask maps, and ``scales``
says so: a plain ``loss.backward()`` then hands the buffer over without touching it again. (Not for the
pseudo-label loss with a confidence test: its count depends on the teacher's logits, and its gradient comes back
as the sum's, scale 1.) The kernels also count
labels outside [0, C) that are not ``ignore_index`` (the label check, at no extra pass).

The binding receives the tensors themselves, never their addresses: a call's arguments keep every tensor it
reads or writes alive until its kernel has returned, so a temporary converted inline (``_f32(t)`` as an argument)
cannot be freed under the kernel. The binding checks each tensor against what its kernel touches (device, dtype,
shape against the logits, a weight's length, outputs that do not overlap themselves) and raises a TypeError or ValueError naming it.
Kernels take any strides (contiguous, channels_last, sliced views with a storage offset, stride-0 expansions)
without copying the logits. Discriminator maps, BCE targets and class weights (1/C of the logits' size or less)
are converted to float32 when they are not float32 already.
Threads: ``torch.get_num_threads()`` at each call; results do not depend on it (fixed blocks, ordered sums).

Upsampling: every launch over logits or D maps takes ``size=(H, W)`` and ``align_corners`` (keyword-only; None
keeps the plain op). Logits and D maps whose spatial size differs from ``size`` are bilinearly resized to it inside
the kernel, as ``F.interpolate(x.float(), size, mode="bilinear", align_corners=align_corners)`` would (float32
interpolation, never rounded to a half dtype); labels, masks, BCE target maps and loss maps are at ``size``, and
counts are counts of full-resolution pixels. Gradients come back at the low resolution of their input: the
gradient of the loss sum w.r.t. it. The full-resolution logits and their gradient are never stored (see
``csrc/cpu/kernels_impl.h``); ``softmax2d`` returns its probabilities at ``size`` (D reads them), and
``softmax2d_backward(..., low_size=(h, w))`` gives the gradient w.r.t. the low-resolution logits. An input already at
``size`` is read as it is.

Importing raises ImportError with the reason when the extension was not built, fails to load, or is switched
off with ``FASTADVSEG_DISABLE_CPU_EXT=1``.
"""
from __future__ import annotations

import os
from array import array
from typing import Optional, Tuple

import torch

from ._launch import DiscriminatorLaunch, GeneratorLaunch, LossLaunch

ENV_DISABLE = "FASTADVSEG_DISABLE_CPU_EXT"

if os.environ.get(ENV_DISABLE, "").strip().lower() not in ("", "0", "false", "no", "off"):
    raise ImportError(f"the cpu backend is switched off by {ENV_DISABLE}={os.environ[ENV_DISABLE]}")

try:
    from .. import _C_cpu as _ext
except ImportError as exc:  # not built (no C++ compiler at install time) or fails to load
    _package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _where = ""
    if os.path.isfile(os.path.join(os.path.dirname(_package), "setup.py")):  # a source checkout, not an install
        _where = (f"; {_package} is a source tree, imported because Python looks in the current directory first: "
                  "build its extension in place with `pip install -e .`, or run from another directory to use an "
                  "installed fastadvseg")
    raise ImportError(
        f"the C++ extension fastadvseg._C_cpu is not available ({exc}); it is built by `pip install -e .` "
        f"(or `python setup.py build_ext --inplace`) on a machine with a C++17 compiler{_where}"
    ) from exc

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# fused_loss results (csrc/cpu/kernels.h, FusedSum)
_LOSS, _WEIGHT, _ADV, _ADV_COUNT, _KEPT, _CONSIDERED, _BAD_LABELS, _FIRST_BAD = range(8)


def supports_device(device: torch.device) -> bool:
    return torch.device(device).type == "cpu"


# ---------------------------------------------------------------------------------------------------------------
# Arguments: the tensors themselves (csrc/cpu/bindings.cpp reads and checks them), None when absent.

def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == torch.float32 else t.float()


def _round32(value: float) -> float:
    """``value`` rounded to float32, as the shared layer sees it in the float32 ``sums`` tensor."""
    return array("f", (value,))[0]


def _pre(k: float, count: float) -> float:
    """The gradient pre-scale of a mean weighted by ``k``: exactly the float32 number autograd will pass back,
    ``float32(k) * float32(1 / float32(count))`` (0 for an empty mean; the shared layer multiplies a sum by the
    inverse of its count), so that backward finds a factor of exactly 1. (Products and quotients of float32
    numbers, done in double and rounded once, are the float32 results.)"""
    count = _round32(count)
    return _round32(_round32(k) * _round32(1.0 / count)) if count != 0 else 0.0


def _lam(value: float) -> float:
    """The factor folded into a stored gradient: lambda itself, or 1 when lambda is 0."""
    return value if value != 0.0 else 1.0


def _vector(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


Size = Optional[Tuple[int, int]]


def _resize_to(size: Size, *tensors: torch.Tensor) -> Size:
    """``size`` as a tuple when some tensor (N, C, h, w) or (N, h, w) has another spatial size, else None: an input
    already at ``size`` is read as it is, by the kernels of the plain op."""
    if size is None:
        return None
    size = (int(size[0]), int(size[1]))
    return size if any(tuple(t.shape[-2:]) != size for t in tensors) else None


def _full(t: torch.Tensor, size: Size) -> Tuple[int, int, int]:
    """(N, H, W) of the maps over tensor t's pixels: its own, or (N, *size)."""
    return (t.shape[0],) + (tuple(t.shape[-2:]) if size is None else size)


def _fused(logits: Optional[torch.Tensor], *, sizes, grad: Optional[torch.Tensor] = None, grad_scale: float = 1.0,
           labels: Optional[torch.Tensor] = None, ignore_index: int = -1, weight: Optional[torch.Tensor] = None,
           label_smoothing: float = 0.0, z: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
           keep: bool = False, threshold: float = 0.0, adv_mode: int = 0, loss_map: Optional[torch.Tensor] = None,
           grad_z: Optional[torch.Tensor] = None, grad_z_scale: float = 1.0, maps_only: bool = False,
           size: Size = None, align_corners: bool = False, teacher: Optional[torch.Tensor] = None,
           confidence: Optional[float] = None):
    """One call of the fused kernel: [loss sum, weight sum, adv sum, adv count, kept, considered, bad labels,
    first bad pixel]."""
    return _ext.fused_loss(
        tuple(sizes), logits, grad, float(grad_scale), labels, int(ignore_index), weight, z, mask, int(keep),
        float(threshold), int(adv_mode), loss_map, grad_z, float(grad_z_scale), bool(maps_only),
        torch.get_num_threads(), float(label_smoothing), size=size, align_corners=bool(align_corners),
        teacher_logits=teacher, confidence_threshold=None if confidence is None else float(confidence))


def _bad(sums, labels: torch.Tensor) -> Tuple[int, int]:
    """[count, value of the first] of the bad labels a pass counted."""
    count = int(sums[_BAD_LABELS])
    if not count:
        return 0, 0
    _, h, w = labels.shape
    j = int(sums[_FIRST_BAD])  # flat (N, H, W) index of the first, in pixel order
    return count, int(labels[j // (h * w), (j // w) % h, j % w])


def _map_buffer(n: int, h: int, w: int) -> torch.Tensor:
    return torch.empty((n, h, w), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# softmax2d

def _empty_4d(like: torch.Tensor, n: int, c: int, h: int, w: int) -> torch.Tensor:
    """An (n, c, h, w) tensor of ``like``'s dtype, channels_last where ``like`` is (as F.interpolate keeps it)."""
    channels_last = like.dim() == 4 and not like.is_contiguous() \
        and like.is_contiguous(memory_format=torch.channels_last)
    return torch.empty((n, c, h, w), dtype=like.dtype,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def softmax2d(logits: torch.Tensor, *, size: Size = None, align_corners: bool = False) -> torch.Tensor:
    size = _resize_to(size, logits)
    if size is None:
        y = torch.empty_like(logits)  # same memory format for dense inputs, contiguous for sliced views
        _ext.softmax_forward(logits, y, torch.get_num_threads())
        return y
    y = _empty_4d(logits, logits.shape[0], logits.shape[1], *size)
    _ext.softmax_forward(logits, y, torch.get_num_threads(), size=size, align_corners=bool(align_corners))
    return y


def softmax2d_backward(probs: torch.Tensor, grad_probs: torch.Tensor, *, low_size: Size = None,
                       align_corners: bool = False) -> torch.Tensor:
    low_size = _resize_to(low_size, probs)
    if low_size is None:
        grad_x = torch.empty_like(probs)
        _ext.softmax_backward(probs, grad_probs, grad_x, torch.get_num_threads())
        return grad_x
    grad_x = _empty_4d(probs, probs.shape[0], probs.shape[1], *low_size)
    _ext.softmax_backward(probs, grad_probs, grad_x, torch.get_num_threads(), low_size=low_size,
                          align_corners=bool(align_corners))
    return grad_x


# ---------------------------------------------------------------------------------------------------------------
# losses over the logits: cross_entropy2d, semi_cross_entropy2d, pseudo_label_cross_entropy2d

def _logits_loss(logits: torch.Tensor, reduction: str, store_grad: bool, count_index: Optional[int], k: float,
                 common: dict, **main):
    """The kernel's sums, loss map and gradient, pre-scaled by k / count for a mean (count from a maps pre-pass;
    ``count_index`` None: a count the maps alone do not give, no pre-scale). ``main``: arguments of the main
    pass only."""
    pre = 1.0
    if store_grad and reduction == "mean" and count_index is not None:
        pre = _pre(k, _fused(None, maps_only=True, **common)[count_index])
    grad = torch.empty_like(logits) if store_grad else None
    loss_map = _map_buffer(*_full(logits, common["size"])) if reduction == "none" else None
    sums = _fused(logits, grad=grad, grad_scale=pre, loss_map=loss_map, **common, **main)
    return sums, loss_map, grad, pre


def cross_entropy2d(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int,
                    label_smoothing: float, reduction: str, store_grad: bool, *, size: Size = None,
                    align_corners: bool = False) -> LossLaunch:
    weight32 = None if weight is None else _f32(weight.detach()).contiguous()
    common = dict(sizes=logits.shape, labels=target, ignore_index=ignore_index, weight=weight32,
                  label_smoothing=label_smoothing, size=_resize_to(size, logits), align_corners=align_corners)
    sums, loss_map, grad, pre = _logits_loss(logits, reduction, store_grad, _WEIGHT, 1.0, common)
    return LossLaunch(_vector(sums[_LOSS], sums[_WEIGHT]), loss_map, grad, _vector(pre), _bad(sums, target))


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` read the same elements the same way (``logits.detach()`` passed as the teacher)."""
    return a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()


def pseudo_label_cross_entropy2d(logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                                 d_logits: Optional[torch.Tensor], confidence_threshold: Optional[float],
                                 d_threshold: float, ignore_mask: Optional[torch.Tensor], reduction: str,
                                 store_grad: bool, *, size: Size = None, align_corners: bool = False) -> LossLaunch:
    # The one kernel pass of L_semi, generalised: pseudo-labels from the teacher's logits (None, or a view of the
    # logits themselves: from the logits, read once), kept where the teacher is confident and where D is.
    if teacher_logits is not None and _same_view(teacher_logits, logits):
        teacher_logits = None
    z = _f32(d_logits)  # (held by `common` until the kernels have run)
    inputs = [t for t in (logits, teacher_logits, z) if t is not None]
    common = dict(sizes=logits.shape, z=z, mask=ignore_mask, keep=True, threshold=d_threshold,
                  size=_resize_to(size, *inputs), align_corners=align_corners)
    # A mean's count is known before the pass only without the confidence test (which reads the teacher): then
    # the gradient is pre-scaled from a maps pre-pass, else it comes back as the sum's (scale 1).
    count_index = _KEPT if confidence_threshold is None else None
    sums, loss_map, grad, pre = _logits_loss(logits, reduction, store_grad, count_index, 1.0, common,
                                             teacher=teacher_logits, confidence=confidence_threshold)
    return LossLaunch(_vector(sums[_LOSS], sums[_KEPT], sums[_CONSIDERED]), loss_map, grad, _vector(pre))


def semi_cross_entropy2d(logits: torch.Tensor, d_logits: torch.Tensor, threshold: float,
                         ignore_mask: Optional[torch.Tensor], reduction: str, store_grad: bool, *,
                         size: Size = None, align_corners: bool = False) -> LossLaunch:
    return pseudo_label_cross_entropy2d(logits, None, d_logits, None, threshold, ignore_mask, reduction, store_grad,
                                        size=size, align_corners=align_corners)


# ---------------------------------------------------------------------------------------------------------------
# losses over discriminator maps (float32): bce_with_logits2d, discriminator_loss

def _bce_job(z: torch.Tensor, target_map: Optional[torch.Tensor], target_value: float, mask: Optional[torch.Tensor],
             loss_map: Optional[torch.Tensor], grad: Optional[torch.Tensor], grad_scale: float) -> tuple:
    return (z, target_map, float(target_value), mask, loss_map, grad, float(grad_scale))


def _counted(z: torch.Tensor, mask: Optional[torch.Tensor], size: Size) -> int:
    """Pixels a BCE mean divides by (known before the kernel runs, so that it can pre-scale the gradient): those
    of the map at ``size``, less the masked ones."""
    n, h, w = _full(z, size)
    total = n * h * w
    return total if mask is None else total - int(mask.sum())


def _new_map_grad(z: torch.Tensor, store: bool) -> Optional[torch.Tensor]:
    """A fresh float32 gradient buffer of z's shape (its own resolution), or None."""
    return torch.empty(z.shape, dtype=torch.float32) if store else None


def bce_with_logits2d(d_logits: torch.Tensor, target_map: Optional[torch.Tensor], target_value: float,
                      ignore_mask: Optional[torch.Tensor], reduction: str, store_grad: bool, *, size: Size = None,
                      align_corners: bool = False) -> LossLaunch:
    z = _f32(d_logits)
    size = _resize_to(size, z)
    count = _counted(z, ignore_mask, size)
    pre = _pre(1.0, count) if reduction == "mean" else 1.0
    grad = _new_map_grad(z, store_grad)
    loss_map = _map_buffer(*_full(z, size)) if reduction == "none" else None
    job = _bce_job(z, _f32(target_map), target_value, ignore_mask, loss_map, grad, pre)
    loss_sum, _ = _ext.bce_maps([job], torch.get_num_threads(), size=size, align_corners=bool(align_corners))
    return LossLaunch(_vector(loss_sum, count), loss_map, grad, _vector(pre))


def discriminator_loss(d_fake: torch.Tensor, d_real: torch.Tensor, ignore_mask_fake: Optional[torch.Tensor],
                       ignore_mask_real: Optional[torch.Tensor], store_fake: bool,
                       store_real: bool, *, size: Size = None, align_corners: bool = False) -> DiscriminatorLaunch:
    maps = ((_f32(d_fake), 0.0, ignore_mask_fake, store_fake), (_f32(d_real), 1.0, ignore_mask_real, store_real))
    size = _resize_to(size, *(z for z, _, _, _ in maps))
    counts = [_counted(z, mask, size) for z, _, mask, _ in maps]
    pres = [_pre(1.0, c) for c in counts]  # each term is a mean
    grads = [_new_map_grad(z, store) for z, _, _, store in maps]
    sums = _ext.bce_maps([_bce_job(z, None, t, mask, None, g, k)
                          for (z, t, mask, _), g, k in zip(maps, grads, pres)], torch.get_num_threads(),
                         size=size, align_corners=bool(align_corners))
    return DiscriminatorLaunch(_vector(sums[0], counts[0], sums[2], counts[1]), grads[0], grads[1], _vector(*pres))


# ---------------------------------------------------------------------------------------------------------------
# generator_loss: one pass for the term (ce or L_semi) and the adversarial BCE

def generator_loss(logits: torch.Tensor, d_logits: torch.Tensor, target: Optional[torch.Tensor], lambda_adv: float,
                   lambda_semi: float, threshold: float, ignore_index: int, store_gx: bool,
                   store_gz: bool, *, size: Size = None, align_corners: bool = False) -> GeneratorLaunch:
    z = _f32(d_logits)
    size = _resize_to(size, logits, z)
    n, h, w = _full(logits, size)
    labelled = target is not None
    resize = dict(size=size, align_corners=align_corners)
    if labelled:
        common = dict(sizes=logits.shape, labels=target, ignore_index=ignore_index, z=z, adv_mode=1, **resize)
        count_index = _WEIGHT  # the adversarial term counts the same pixels as the cross-entropy
    else:
        common = dict(sizes=logits.shape, z=z, keep=True, threshold=threshold, adv_mode=2, **resize)
        count_index = _KEPT
    pre_x, pre_z = 1.0, 1.0
    if store_gx or store_gz:
        count = _fused(None, maps_only=True, **common)[count_index]
        pre_x = _pre(1.0 if labelled else _lam(lambda_semi), count)
        pre_z = _pre(_lam(lambda_adv), count if labelled else float(n * h * w))
    gx = torch.empty_like(logits) if store_gx else None
    gz = _new_map_grad(z, store_gz)
    s = _fused(logits, grad=gx, grad_scale=pre_x, grad_z=gz, grad_z_scale=pre_z, **common)
    term_count = s[_WEIGHT] if labelled else s[_KEPT]
    kept, considered = (0.0, 0.0) if labelled else (s[_KEPT], s[_CONSIDERED])
    sums = _vector(s[_LOSS], term_count, s[_ADV], s[_ADV_COUNT], kept, considered)
    return GeneratorLaunch(sums, gx, gz, _vector(pre_x, pre_z), _bad(s, target) if labelled else None)


# ---------------------------------------------------------------------------------------------------------------
# one_hot2d and its label check

def find_bad_labels(target: torch.Tensor, num_classes: int, ignore_index: int) -> Tuple[int, int]:
    count, value = _ext.find_bad_labels(target, int(num_classes), int(ignore_index), torch.get_num_threads())
    return int(count), int(value)


def one_hot2d(target: torch.Tensor, num_classes: int, ignore_index: int, dtype: torch.dtype) -> torch.Tensor:
    n, h, w = target.shape
    out = torch.empty((n, num_classes, h, w), dtype=dtype)
    size = out.element_size()
    if size not in (1, 2, 4, 8):  # e.g. complex128: no kernel for 16-byte elements
        from . import reference
        return reference.one_hot2d(target, num_classes, ignore_index, dtype)
    one = int.from_bytes(torch.ones((), dtype=dtype).reshape(1).view(torch.uint8).numpy().tobytes(), "little")
    _ext.one_hot(target, out, int(ignore_index), one, torch.get_num_threads())
    return out
