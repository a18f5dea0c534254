"""Argument checks, done once in the public layer so that no backend repeats them.

Backends receive tensors that passed these checks, with discriminator-sized maps normalised to (N, H, W) views.
The label-range check is not here: the ops report bad labels from the passes they make anyway
(``fastadvseg/_labels.py``).

With ``size`` (fused bilinear upsampling), the logits and discriminator maps may have any spatial size of their
own, while labels, masks and BCE target maps must be at ``size``; without it, every map must match the logits (or
the D map it belongs to), and a mismatch says how to opt in to the upsampling.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def check_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_logits(logits, name: str = "logits") -> torch.Tensor:
    check_tensor(logits, name)
    if logits.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {_shape(logits)}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {logits.dtype}")
    if logits.shape[1] < 1:
        raise ValueError(f"{name} must have at least one channel, got shape {_shape(logits)}")
    return logits


def check_same_device(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.device != b.device:
        raise ValueError(
            f"{a_name} {_shape(a)} is on {a.device} but {b_name} {_shape(b)} is on {b.device}; "
            "move them to the same device"
        )


Size = Optional[Tuple[int, int]]


def check_size(size, name: str = "size") -> Size:
    """None, or a full-resolution (H, W) of two positive ints (a tuple, a list, or a ``torch.Size`` such as
    ``target.shape[-2:]``), returned as a tuple. Symbolic ints (``torch.compile(dynamic=True)``) pass as they are."""
    if size is None:
        return None
    if not isinstance(size, (tuple, list, torch.Size)):
        raise TypeError(f"{name} must be None or (H, W), two positive ints such as target.shape[-2:], "
                        f"got {type(size).__name__} {size!r}")
    if len(size) != 2:
        raise ValueError(f"{name} must be (H, W), two positive ints such as target.shape[-2:], got {tuple(size)!r}")
    for v in size:
        if isinstance(v, torch.SymInt):
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be (H, W), two positive ints, got {tuple(size)!r}")
        if v < 1:
            raise ValueError(f"{name} must be (H, W), two positive ints, got {tuple(size)!r}")
    return tuple(v if isinstance(v, torch.SymInt) else int(v) for v in size)


def check_align_corners(value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"align_corners must be a bool (as F.interpolate's), got {type(value).__name__} {value!r}")
    return value


def spatial(t: torch.Tensor) -> tuple:
    return tuple(t.shape[-2:])


def check_resizable(t: torch.Tensor, name: str, size: Size) -> None:
    """An input that ``size`` resamples must have pixels to interpolate from (unless its batch is empty)."""
    if size is not None and t.shape[0] > 0 and spatial(t) != tuple(size) and 0 in spatial(t):
        raise ValueError(f"cannot upsample {name} {_shape(t)} to size {tuple(size)}: it has no pixels")


def _opt_in(what: str, to: str) -> str:
    """How to ask for the upsampling, appended to a shape mismatch."""
    return f"; pass size={to} to upsample {what} bilinearly"


def check_target(target, logits: torch.Tensor, name: str = "target", size: Size = None) -> torch.Tensor:
    """Class-index map (N, H, W) of an integer type, at the logits' (H, W) or at ``size``; returned as int64 (a
    copy only if it was not int64)."""
    check_tensor(target, name)
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise TypeError(f"{name} must hold integer class indices (int64, int32, int16, uint8), got {target.dtype}")
    n, _, h, w = logits.shape
    if size is not None:
        if target.dim() != 3 or tuple(target.shape) != (n, *size):
            raise ValueError(f"{name} must have shape (N, *size) = {(n, *size)} for logits {_shape(logits)} and "
                             f"size {tuple(size)}, got {_shape(target)}")
    elif target.dim() != 3 or tuple(target.shape) != (n, h, w):
        hint = _opt_in("the logits", f"{name}.shape[-2:]") if target.dim() == 3 and target.shape[0] == n else ""
        raise ValueError(
            f"{name} must have shape (N, H, W) = ({n}, {h}, {w}) to match logits {_shape(logits)}, "
            f"got {_shape(target)}{hint}"
        )
    check_same_device(logits, "logits", target, name)
    return target if target.dtype == torch.int64 else target.long()


def check_teacher(teacher, logits: torch.Tensor, name: str = "teacher_logits", size: Size = None
                  ) -> Optional[torch.Tensor]:
    """None, or the teacher's (N, C, H, W) logits for the student ``logits``: same N and C, same device, and the
    same (H, W) unless ``size`` upsamples each from its own; returned in the logits' dtype (a copy only if it
    differs)."""
    if teacher is None:
        return None
    check_logits(teacher, name)
    n, c, h, w = logits.shape
    if teacher.shape[:2] != logits.shape[:2]:
        raise ValueError(f"{name} {_shape(teacher)} does not match logits {_shape(logits)}: need the same batch "
                         f"N = {n} and classes C = {c}")
    if size is None and spatial(teacher) != (h, w):
        raise ValueError(f"{name} {_shape(teacher)} does not match logits {_shape(logits)}: need (H, W) = "
                         f"({h}, {w}){_opt_in(f'{name} and the logits to it', '(H, W)')}")
    check_same_device(logits, "logits", teacher, name)
    return teacher if teacher.dtype == logits.dtype else teacher.to(logits.dtype)


def check_map(d, logits: Optional[torch.Tensor], name: str, n_h_w: Optional[tuple] = None,
              size: Size = None) -> torch.Tensor:
    """Discriminator-sized float map (N, 1, H, W) or (N, H, W); returns an (N, H, W) view (no copy). With
    ``size``, its (H, W) is its own (it is upsampled), and only its batch must match the logits'."""
    check_tensor(d, name)
    if not d.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (float32, float16, bfloat16, float64), got {d.dtype}")
    if d.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {d.dtype}")
    if d.dim() == 4:
        if d.shape[1] != 1:
            raise ValueError(f"{name} must be (N, 1, H, W) or (N, H, W), got {_shape(d)} (channel dim is not 1)")
        view = d.squeeze(1)  # a view whose backward is a view too (d[:, 0] would allocate and copy in backward)
    elif d.dim() == 3:
        view = d
    else:
        raise ValueError(f"{name} must be (N, 1, H, W) or (N, H, W), got {_shape(d)}")
    if logits is not None:
        n, _, h, w = logits.shape
        if size is not None:
            if view.shape[0] != n:
                raise ValueError(f"{name} {_shape(d)} does not match logits {_shape(logits)}: need batch N = {n}")
        elif tuple(view.shape) != (n, h, w):
            hint = _opt_in(f"{name} and the logits to it", "(H, W)") if view.shape[0] == n else ""
            raise ValueError(
                f"{name} {_shape(d)} does not match logits {_shape(logits)}: need N, H, W = ({n}, {h}, {w}){hint}"
            )
        check_same_device(logits, "logits", d, name)
    elif n_h_w is not None and tuple(view.shape) != tuple(n_h_w):
        raise ValueError(f"{name} {_shape(d)} does not match the expected (N, H, W) = {tuple(n_h_w)}")
    return view


def _full(ref: torch.Tensor, size: Size) -> tuple:
    """(N, H, W) of the maps over ``ref``'s pixels (an (N, h, w) view): its own, or (N, *size)."""
    return tuple(ref.shape) if size is None else (ref.shape[0], *size)


def check_mask(mask, ref: torch.Tensor, ref_name: str, name: str = "ignore_mask",
               size: Size = None) -> Optional[torch.Tensor]:
    """Optional bool mask, (N, 1, H, W) or (N, H, W), matching ``ref`` (an (N, H, W) view), or (N, *size) with
    ``size``; True = ignored."""
    if mask is None:
        return None
    check_tensor(mask, name)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = ignored), got {mask.dtype}")
    view = mask.squeeze(1) if (mask.dim() == 4 and mask.shape[1] == 1) else mask
    if size is not None and (view.dim() != 3 or tuple(view.shape) != _full(ref, size)):
        raise ValueError(f"{name} {_shape(mask)} must be at size {tuple(size)}: need (N, H, W) = "
                         f"{_full(ref, size)} for {ref_name} {_shape(ref)}, or (N, 1, H, W)")
    if view.dim() != 3 or tuple(view.shape) != _full(ref, size):
        hint = _opt_in(ref_name, f"{name}.shape[-2:]") if view.dim() == 3 and view.shape[0] == ref.shape[0] else ""
        raise ValueError(
            f"{name} {_shape(mask)} does not match {ref_name} {_shape(ref)}: need (N, H, W) or (N, 1, H, W){hint}"
        )
    check_same_device(ref, ref_name, mask, name)
    return view


def check_bce_target(target, d: torch.Tensor, name: str = "target", size: Size = None) -> Union[float, torch.Tensor]:
    """A python number (0. or 1., any float in [0, 1]) or a float map matching ``d`` (an (N, H, W) view), or at
    (N, *size) with ``size``."""
    if isinstance(target, bool):
        return float(target)
    if isinstance(target, (int, float)):
        t = float(target)
        if not (0.0 <= t <= 1.0):
            raise ValueError(f"{name} must lie in [0, 1], got {target}")
        return t
    check_tensor(target, name)
    if not target.is_floating_point():
        raise TypeError(f"{name} must be a float (0. or 1.) or a floating tensor, got a {target.dtype} tensor")
    if target.dim() == 0:
        return target  # a 0-dim tensor target broadcasts, like F.binary_cross_entropy_with_logits allows
    view = target.squeeze(1) if (target.dim() == 4 and target.shape[1] == 1) else target
    if size is not None and tuple(view.shape) != _full(d, size):
        raise ValueError(f"{name} {_shape(target)} must be at size {tuple(size)}: need (N, H, W) = {_full(d, size)} "
                         f"for d_logits {_shape(d)}, or (N, 1, H, W)")
    if tuple(view.shape) != tuple(d.shape) and size is None:
        hint = _opt_in("d_logits", f"{name}.shape[-2:]") if view.dim() == 3 and view.shape[0] == d.shape[0] else ""
        raise ValueError(f"{name} {_shape(target)} does not match d_logits (N, H, W) = {tuple(d.shape)}{hint}")
    check_same_device(d, "d_logits", target, name)
    return view


def check_weight(weight, logits: torch.Tensor) -> Optional[torch.Tensor]:
    if weight is None:
        return None
    check_tensor(weight, "weight")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating tensor, got {weight.dtype}")
    c = logits.shape[1]
    if weight.dim() != 1 or weight.shape[0] != c:
        raise ValueError(f"weight must have shape (C,) = ({c},) to match logits {_shape(logits)}, got {_shape(weight)}")
    check_same_device(logits, "logits", weight, "weight")
    return weight


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_threshold(threshold) -> float:
    if isinstance(threshold, torch.Tensor):
        threshold = float(threshold)
    if not isinstance(threshold, (int, float)) or not (0.0 <= float(threshold) < 1.0):
        raise ValueError(f"threshold must be a number in [0, 1) (sigmoid(d) > threshold keeps a pixel), got {threshold!r}")
    return float(threshold)


def check_unit_interval(value, name: str, meaning: str, optional: bool = False) -> Optional[float]:
    """A number in [0, 1] (None too, where ``optional``), as a float; ``meaning`` says what it decides."""
    if value is None and optional:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= float(value) <= 1.0):
        none = " or None" if optional else ""
        raise ValueError(f"{name} must be a number in [0, 1]{none} ({meaning}), got {value!r}")
    return float(value)


def check_number(value, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a python number, got {type(value).__name__}")
    # A NaN or infinite weight would make every loss it scales silently non-finite. Checked in eager code: under
    # torch.compile(dynamic=True) the value is symbolic and math.isfinite cannot be traced.
    if not torch.compiler.is_compiling() and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return float(value)


def check_ignore_index(value) -> int:
    """An int, as F.cross_entropy takes it (numpy integers too); a float or a string would be truncated or parsed."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def check_label_smoothing(value) -> float:
    value = check_number(value, "label_smoothing")
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"label_smoothing must lie in [0, 1], got {value}")
    return value


# ----------------------------------------------------------------------------------- the registered ops' inputs
# The public functions above hand the registered ops int64 labels, (N, H, W) maps and bool masks. The ops
# (``torch.ops.fastadvseg.*``) are a public entry point too, so each checks, on every backend, what its kernels
# will read: a wrong dtype or shape is a clear error, never a kernel reading past a buffer. (The cpu binding
# checks the same at the native boundary.)

def _op_map(t, n_h_w: tuple, device, name: str, ref_name: str) -> None:
    if t.dim() != 3 or tuple(t.shape) != tuple(n_h_w):
        raise ValueError(f"{name} {_shape(t)} does not match {ref_name}: need (N, H, W) = {tuple(n_h_w)}")
    check_same_device_as(t, device, name)


def check_same_device_as(t: torch.Tensor, device, name: str) -> None:
    if t.device != device:
        raise ValueError(f"{name} {_shape(t)} is on {t.device}, not on {device} with the other inputs")


def op_labels(t, n_h_w: tuple, device, name: str = "target", ref_name: str = "the logits") -> None:
    check_tensor(t, name)
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must be int64 class indices (the public functions convert other integer types), "
                        f"got {t.dtype}")
    _op_map(t, n_h_w, device, name, ref_name)


def op_float_map(t, n_h_w: tuple, device, name: str, ref_name: str = "the logits") -> None:
    check_tensor(t, name)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating (N, H, W) map, got {t.dtype}")
    _op_map(t, n_h_w, device, name, ref_name)


def op_mask(t, n_h_w: tuple, device, name: str = "ignore_mask", ref_name: str = "the logits") -> None:
    if t is None:
        return
    check_tensor(t, name)
    if t.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool (N, H, W) map (True = ignored), got {t.dtype}")
    _op_map(t, n_h_w, device, name, ref_name)


def op_weight(w, num_classes: int, device) -> None:
    if w is None:
        return
    check_tensor(w, "weight")
    if not w.is_floating_point():
        raise TypeError(f"weight must be a floating tensor, got {w.dtype}")
    if w.dim() != 1 or w.shape[0] != num_classes:
        raise ValueError(f"weight must have shape (C,) = ({num_classes},), got {_shape(w)}")
    check_same_device_as(w, device, "weight")


def op_same(t, ref: torch.Tensor, name: str, ref_name: str) -> None:
    """A tensor of ``ref``'s shape on its device (any floating dtype: a gradient is cast to ref's)."""
    check_tensor(t, name)
    if tuple(t.shape) != tuple(ref.shape):
        raise ValueError(f"{name} {_shape(t)} does not match {ref_name} {_shape(ref)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    check_same_device_as(t, ref.device, name)


def op_size(size, name: str = "size") -> Size:
    """A size argument of an op: None or two positive ints (symbolic under torch.compile)."""
    return check_size(None if size is None else list(size), name)


def op_teacher(t, logits: torch.Tensor, size: Size) -> None:
    """The teacher's logits of an op: the logits' dtype, N and C, on their device; their (H, W) without ``size``."""
    check_tensor(t, "teacher_logits")
    if t.dtype != logits.dtype:
        raise TypeError(f"teacher_logits must have the logits' dtype {logits.dtype} (the public function casts "
                        f"it), got {t.dtype}")
    if t.dim() != 4 or t.shape[:2] != logits.shape[:2] or (size is None and spatial(t) != spatial(logits)):
        need = "(N, C, h, w)" if size is not None else "(N, C, H, W)"
        raise ValueError(f"teacher_logits {_shape(t)} does not match logits {_shape(logits)}: need {need} with "
                         f"the logits' N and C")
    check_same_device_as(t, logits.device, "teacher_logits")


def op_low_map(t, n: int, device, name: str, ref_name: str = "the logits") -> None:
    """A floating (N, h, w) discriminator map that is upsampled: any (h, w), the batch of ``ref_name``."""
    check_tensor(t, name)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating (N, H, W) map, got {t.dtype}")
    if t.dim() != 3 or t.shape[0] != n:
        raise ValueError(f"{name} {_shape(t)} does not match {ref_name}: need (N, h, w) with N = {n}")
    check_same_device_as(t, device, name)
