"""What a kernel backend's launch returns: the results of its kernels, before any mean or scaling.

``sums`` is a float32 vector on the tensors' device (its entries are listed by each op in ``fastadvseg/_ops.py``);
a gradient buffer holds ``scales[i]`` times the gradient of the op's first sum (a backend that knows the count
before its kernel runs may pre-scale, see ``cpu``; others return scales of 1); ``bad`` is ``[count, first value]``
of the labels outside [0, C) that are not ignore_index (int64, a tensor or two ints), None for ops without labels.
Absent outputs are None.
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
