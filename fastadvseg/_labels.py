"""Label validation: the switch, the error, and when the error surfaces.

Every op that reads labels also reports the labels it found outside ``[0, C)`` that are not ``ignore_index``: the
kernels count them in the pass they make anyway (with the value of the first one in pixel order), and the
reference backend gets the same report from :func:`valid_labels`. The report is a 2-element int64 tensor
``[count, first value]`` on the labels' device, handed to :func:`report` from inside the registered op, so the
check is no graph break for ``torch.compile`` (the op is opaque to it).

When the error surfaces:

* CPU tensors: at once, from the call that read the labels (reading two CPU numbers costs nothing).
* CUDA tensors: the report is copied to pinned host memory asynchronously, and checked, without waiting, at the
  start of the next fastadvseg op call or backward, and at :func:`check_labels_now`, which waits. So a bad label
  raises the same ``ValueError`` one or a few calls later (typically at the loss's own backward), and the host
  never waits for the GPU because of validation. The report is copied, and its event recorded, on the current
  stream of the labels' own device (which need not be the current device), so the host never reads the buffer
  before the copy has landed.
* While a CUDA graph is being captured on the current stream: the ops inside the capture queue no report
  (validate the labels of a captured step beforehand, or switch validation off), and nothing queries or waits on
  the events of the reports queued before the capture (that would invalidate it): they stay queued and are checked
  by the first call after the capture. :func:`check_labels_now` (which must wait) raises a ``RuntimeError`` then,
  keeping them queued; call it after the capture. (Only the calling thread's capture is seen: a thread that runs
  eager fastadvseg ops while another thread captures in the default "global" mode should use
  ``capture_error_mode="thread_local"`` for that capture.)

Validation is on by default; :func:`set_label_validation`, :func:`label_validation` or
``FASTADVSEG_VALIDATE_LABELS=0`` switch it off for speed. With it off every kernel treats such a label as ignored,
so no kernel ever reads or writes out of bounds.
"""
from __future__ import annotations

import contextlib
import os
from collections import deque
from typing import Iterator, Sequence, Union

import torch

# Device types whose values the host must not read on the default path (it would wait for the device): their
# label reports are checked later, and no other shortcut reads them either. Tests add "cpu" to exercise this.
ASYNC_DEVICE_TYPES = {"cuda"}

_enabled = os.environ.get("FASTADVSEG_VALIDATE_LABELS", "1").strip().lower() not in ("0", "false", "no", "off")
_pending: deque = deque()


def set_label_validation(enabled: bool) -> bool:
    """Turn the label-range check on or off for the whole process; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def label_validation_enabled() -> bool:
    """Whether label validation is on now: on unless ``FASTADVSEG_VALIDATE_LABELS=0`` or :func:`set_label_validation`."""
    return _enabled


@contextlib.contextmanager
def label_validation(enabled: bool) -> Iterator[None]:
    """Context manager form of :func:`set_label_validation`."""
    previous = set_label_validation(enabled)
    try:
        yield
    finally:
        set_label_validation(previous)


def bad_labels_error(count: int, value: int, num_classes: int, ignore_index: int, name: str = "target") -> ValueError:
    return ValueError(
        f"{name} holds label {value} ({count} pixel(s) in all) outside [0, {num_classes}) that is not "
        f"ignore_index={ignore_index}; fix the labels or pass the right ignore_index "
        "(fastadvseg.set_label_validation(False) skips this check; such pixels are then ignored)"
    )


def report(bad: Union[torch.Tensor, Sequence[int]], num_classes: int, ignore_index: int, name: str = "target",
           device: Union[torch.device, None] = None) -> None:
    """Raise (now, or at a later call on deferred devices) if ``bad = [count, first value]`` counts any label."""
    if isinstance(bad, torch.Tensor):
        device = bad.device
    if device is not None and device.type in ASYNC_DEVICE_TYPES:
        _defer(bad, num_classes, ignore_index, name, device)
        return
    count, value = (int(v) for v in (bad.tolist() if isinstance(bad, torch.Tensor) else bad))
    if count:
        raise bad_labels_error(count, value, num_classes, ignore_index, name)


def _pinned_pair() -> torch.Tensor:
    """Two int64 in pinned host memory: where a CUDA report lands."""
    return torch.empty(2, dtype=torch.int64, pin_memory=True)


def _defer(bad, num_classes: int, ignore_index: int, name: str, device: torch.device) -> None:
    if not isinstance(bad, torch.Tensor):
        bad = torch.tensor(list(bad), dtype=torch.int64)
    event = None
    if bad.is_cuda:
        # On bad's own device: its current stream is the one the op wrote bad on (the launch's device guard has
        # exited by now, and the current device may be another), so the copy and the event that marks its
        # completion both go there; an event recorded on the current device's stream could complete first.
        with torch.cuda.device(bad.device):
            if torch.cuda.is_current_stream_capturing():
                return
            stream = torch.cuda.current_stream(bad.device)
            host = _pinned_pair()
            host.copy_(bad, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
    else:
        host = bad.clone()
    _pending.append((host, event, num_classes, ignore_index, name))


def _capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream (asked only once a CUDA report exists: a torch
    without CUDA cannot answer)."""
    return torch.cuda.is_current_stream_capturing()


def check_pending(wait: bool = False) -> None:
    """Check the queued reports whose copies have landed (all of them, waiting, with ``wait=True``), oldest
    first; raise the first error found (the reports after it are dropped: they describe the same step).

    While a CUDA graph is being captured no event is queried or waited on (that would invalidate the capture):
    the reports stay queued for the first call after the capture, and ``wait=True`` raises a RuntimeError."""
    capturing = None
    while _pending:
        host, event, num_classes, ignore_index, name = _pending[0]
        if event is not None:
            if capturing is None:
                capturing = _capturing()
            if capturing:
                if wait:
                    raise RuntimeError(
                        f"fastadvseg: {len(_pending)} label report(s) cannot be waited for while a CUDA graph is "
                        "being captured (waiting on an event would invalidate the capture); they stay queued: call "
                        "check_labels_now() after the capture (the first fastadvseg call after it checks them too)")
                return
            if wait:
                event.synchronize()
            elif not event.query():
                return
        _pending.popleft()
        count, value = host.numpy().tolist()  # host memory: reading it never waits for the device
        if count:
            _pending.clear()
            raise bad_labels_error(count, value, num_classes, ignore_index, name)


def check_labels_now() -> None:
    """Wait for every queued label report (CUDA) and raise the first bad-label error, if any.

    Raises RuntimeError, keeping the reports queued, while a CUDA graph is being captured on the current stream."""
    check_pending(wait=True)


def find_bad_labels(target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """``[count, first value in pixel order]`` (int64, on the target's device) of labels outside [0, C) that are
    not ``ignore_index``: torch ops, no host synchronisation."""
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    flat = bad.reshape(-1)
    count = flat.sum()
    if flat.numel() == 0:
        return torch.stack([count, count])
    first = torch.argmax(flat.to(torch.uint8))  # the first True (0 when there is none)
    value = torch.where(count > 0, target.reshape(-1)[first], torch.zeros_like(count))
    return torch.stack([count, value])


# Registered like the ops of fastadvseg/_ops.py (which holds the namespace's definition library).
_LIB = torch.library.Library("fastadvseg", "FRAGMENT")
_LIB.define("valid_labels(Tensor target, int num_classes, int ignore_index) -> Tensor")


def _valid_labels(target: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """The mask of counted pixels, ``(y != ignore_index) & (0 <= y < C)``, after reporting bad labels: the label
    check of the reference backend, opaque to ``torch.compile`` so that it is no graph break."""
    check_pending()
    report(find_bad_labels(target, num_classes, ignore_index), num_classes, ignore_index)
    return ((target != ignore_index) & (target >= 0) & (target < num_classes)).contiguous()


_LIB.impl("valid_labels", _valid_labels, "CompositeExplicitAutograd")


@torch.library.register_fake("fastadvseg::valid_labels", lib=_LIB)
def _(target, num_classes, ignore_index):
    return target.new_empty(target.shape, dtype=torch.bool)


valid_labels = torch.ops.fastadvseg.valid_labels.default
