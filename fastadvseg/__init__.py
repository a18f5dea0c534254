"""fastadvseg: fused losses for semi-supervised semantic segmentation with adversarial learning (Hung et al. 2018).

    import fastadvseg as fas
    out = fas.generator_loss(logits, D(fas.softmax2d(logits)), target, lambda_adv=0.01)
    out.total.backward()
"""
from ._dispatch import BACKEND_NAMES, available_backends, unavailable_reason
from ._types import GeneratorLossOutput
from ._labels import check_labels_now, label_validation, label_validation_enabled, set_label_validation
from .functional import (
    bce_with_logits2d,
    cross_entropy2d,
    discriminator_loss,
    generator_loss,
    one_hot2d,
    pseudo_label_cross_entropy2d,
    semi_cross_entropy2d,
    softmax2d,
)

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "unavailable_reason",
    "BACKEND_NAMES",
    "GeneratorLossOutput",
    "softmax2d",
    "cross_entropy2d",
    "bce_with_logits2d",
    "semi_cross_entropy2d",
    "pseudo_label_cross_entropy2d",
    "one_hot2d",
    "generator_loss",
    "discriminator_loss",
    "set_label_validation",
    "label_validation",
    "label_validation_enabled",
    "check_labels_now",
]
