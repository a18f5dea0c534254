"""Small value types shared by the public API and every backend."""
from __future__ import annotations

from typing import NamedTuple

import torch


class GeneratorLossOutput(NamedTuple):
    """Result of :func:`fastadvseg.generator_loss`.

    ``total`` is what you call ``backward()`` on. Every field is a float32 0-dim tensor; ``ce``, ``adv`` and
    ``semi`` are unweighted means (``total = ce + lambda_adv * adv + lambda_semi * semi``) and stay differentiable,
    so they can be logged or back-propagated on their own. ``semi_ratio`` is the fraction of considered pixels kept
    by the confidence mask (0 for a labelled batch); it carries no gradient.
    """

    total: torch.Tensor
    ce: torch.Tensor
    adv: torch.Tensor
    semi: torch.Tensor
    semi_ratio: torch.Tensor
