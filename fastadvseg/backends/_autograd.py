"""Autograd helpers shared by the kernel backends (``cpu``, ``triton``)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch


class StoredGradients:
    """The gradient buffers a forward pass filled, handed to backward once.

    The kernels compute the gradient in the forward pass, into buffers only this object references. The first
    backward takes the buffers themselves and scales them in place, so autograd receives them without a copy
    (a leaf's ``.grad`` is the buffer) and no second gradient-sized buffer ever exists: peak memory is one
    gradient. A second backward through the same graph (``retain_graph=True``) finds them gone (autograd may have
    written into them since) and calls ``recompute()``, one more launch of the same kernel, after checking that
    none of ``inputs`` was modified in place in between.
    """

    def __init__(self, buffers, inputs: Sequence[torch.Tensor], recompute: Callable[[], object], backend: str):
        self._buffers, self._recompute, self._backend = buffers, recompute, backend
        self._inputs = tuple(inputs)
        self._versions = tuple(t._version for t in self._inputs)

    def take(self):
        buffers, self._buffers = self._buffers, None
        if buffers is not None:
            return buffers
        if tuple(t._version for t in self._inputs) != self._versions:
            raise RuntimeError(f"fastadvseg ({self._backend} backend): an input of the loss (logits or D's logits) "
                               "was modified in place after the loss was computed; a second backward through the "
                               "same graph cannot recompute the gradient")
        return self._recompute()
