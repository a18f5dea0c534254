"""Networks: the DeepLab-v2 segmenter (dilated ResNet + ASPP) and the fully convolutional discriminator.

    G = build_segmenter("deeplabv2_resnet101", 21, pretrained="resnet101COCO-41f33a49.pth")
    D = FCDiscriminator(21)
    opt = torch.optim.SGD(G.param_groups(2.5e-4), lr=2.5e-4, momentum=0.9, weight_decay=5e-4)
"""
from __future__ import annotations

from typing import Optional, Sequence

from ..data.base import IMAGENET_MEAN, IMAGENET_STD
from .deeplab import ARCHS, ASPP, BATCHNORM_MODES, CaffeInput, DeepLabV2, build_deeplab
from .discriminator import FCDiscriminator
from .resnet import DilatedResNet
from .weights import LoadReport, detect_layout, load_pretrained, read_state_dict

SEGMENTERS = tuple(ARCHS)

__all__ = ["build_segmenter", "FCDiscriminator", "DeepLabV2", "ASPP", "CaffeInput", "DilatedResNet", "LoadReport",
           "load_pretrained", "SEGMENTERS", "BATCHNORM_MODES"]


def build_segmenter(name: str, num_classes: int, pretrained: Optional[str] = None, *,
                    batchnorm: str = "frozen", stride_in_1x1: Optional[bool] = None,
                    caffe_input: Optional[bool] = None, input_mean: Sequence[float] = IMAGENET_MEAN,
                    input_std: Sequence[float] = IMAGENET_STD) -> DeepLabV2:
    """Build a segmenter by name (see ``SEGMENTERS``), optionally initialised from a local weights file.

    ``model.load_report`` is the :class:`LoadReport` of the weights (None without ``pretrained``). ``batchnorm``:
    see :class:`DeepLabV2` (``"frozen"``: eval-mode BatchNorm; ``"frozen_affine"``: the authors' training behaviour).
    The bottleneck stride sits where the weights expect it: on the 1x1 conv for the authors' DeepLab layout (and
    without weights), on the 3x3 conv for torchvision's ImageNet layout (``stride_in_1x1`` overrides this). With the
    authors' Caffe-trained DeepLab weights the images (normalised with ``input_mean``/``input_std``) are turned into
    the Caffe input those weights expect (BGR, 0..255, Caffe mean subtracted) by a fixed first layer (``caffe_input``
    overrides this).
    """
    layout = detect_layout(read_state_dict(pretrained)) if pretrained else None
    if stride_in_1x1 is None:
        stride_in_1x1 = layout != "torchvision"
    if caffe_input is None:
        caffe_input = layout == "deeplab"
    transform = CaffeInput(input_mean, input_std) if caffe_input else None
    model = build_deeplab(name, num_classes, batchnorm=batchnorm, stride_in_1x1=stride_in_1x1,
                          input_transform=transform)
    model.load_report = load_pretrained(model, pretrained) if pretrained else None
    return model
