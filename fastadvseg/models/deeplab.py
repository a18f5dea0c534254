"""DeepLab-v2: a dilated ResNet and an ASPP classifier whose four branches are summed."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .resnet import BasicBlock, Bottleneck, DilatedResNet

BATCHNORM_MODES = ("live", "frozen_affine", "frozen")


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling of DeepLab-v2: parallel 3x3 convs with dilations {6,12,18,24}, SUMMED.

    (The authors' released Classifier_Module returned inside its loop, after adding only the second branch.)
    """

    def __init__(self, in_channels: int, num_classes: int, dilations: Sequence[int] = (6, 12, 18, 24)):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d, bias=True) for d in dilations)
        for conv in self.branches:
            nn.init.normal_(conv.weight, 0.0, 0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class CaffeInput(nn.Module):
    """Feeds Caffe-trained DeepLab weights (the authors' COCO init) what they were trained on.

    Our datasets give RGB in [0, 1] normalised as ``(x - mean) / std``; the Caffe DeepLab weights expect BGR in
    0..255 minus the Caffe channel means. This undoes one and applies the other, exactly (no state in checkpoints).
    """

    CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        scale = torch.tensor(list(std)[::-1], dtype=torch.float32) * 255.0
        shift = torch.tensor(list(mean)[::-1], dtype=torch.float32) * 255.0 - torch.tensor(self.CAFFE_MEAN_BGR)
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(1) * self.scale.to(x.dtype) + self.shift.to(x.dtype)


class DeepLabV2(nn.Module):
    """Segmenter: ``backbone`` (dilated ResNet) -> ``classifier`` (ASPP). Logits at 1/8 of the input.

    ``batchnorm`` says what the BatchNorm layers do while the model trains (in ``eval()`` they all use their running
    statistics): ``"live"`` as PyTorch's, batch statistics and learnt scale and shift; ``"frozen_affine"`` batch
    statistics (the running statistics keep updating) with scale and shift frozen (requires_grad off), as the
    authors' DeepLab under ``model.train()``; ``"frozen"`` eval mode whatever ``train()`` is called with (running
    statistics, never updated) and scale and shift frozen.
    """

    def __init__(self, backbone: DilatedResNet, num_classes: int, batchnorm: str = "frozen",
                 dilations: Sequence[int] = (6, 12, 18, 24), input_transform: Optional[nn.Module] = None):
        super().__init__()
        if batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"batchnorm={batchnorm!r}: choose one of {BATCHNORM_MODES}")
        self.input_transform = input_transform
        self.backbone = backbone
        self.classifier = ASPP(backbone.out_channels, num_classes, dilations)
        self.num_classes = num_classes
        self.batchnorm = batchnorm
        if batchnorm != "live":
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    for p in m.parameters():
                        p.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.batchnorm == "frozen":
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        return self.classifier(self.backbone(x))

    def param_groups(self, lr: float, head_lr_mult: float = 10.0) -> List[Dict]:
        """Optimizer groups: the backbone at ``lr``, the classifier head at ``head_lr_mult * lr`` (paper: x10).

        Each group carries ``lr_mult`` so a schedule can set ``group["lr"] = base_lr * group["lr_mult"]``.
        """
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        head = [p for p in self.classifier.parameters() if p.requires_grad]
        return [{"params": backbone, "lr": lr, "lr_mult": 1.0, "name": "backbone"},
                {"params": head, "lr": lr * head_lr_mult, "lr_mult": head_lr_mult, "name": "head"}]


# name -> (block, layers, widths, stem width, ASPP dilations)
ARCHS = {
    "deeplabv2_resnet101": (Bottleneck, (3, 4, 23, 3), (64, 128, 256, 512), 64, (6, 12, 18, 24)),
    "deeplabv2_resnet50": (Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), 64, (6, 12, 18, 24)),
    "deeplabv2_resnet18": (BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), 64, (6, 12, 18, 24)),
    # The CPU-sized default: a narrow ResNet-18-like backbone, one block per stage, and the four summed ASPP
    # branches with dilations scaled to its ~64-96 px images (an 8x8-12x12 feature map, where rates 12-24 would
    # only see padding).
    "deeplabv2_compact": (BasicBlock, (1, 1, 1, 1), (16, 32, 48, 64), 16, (1, 2, 3, 4)),
}


def build_deeplab(name: str, num_classes: int, *, batchnorm: str = "frozen", stride_in_1x1: bool = True,
                  input_transform: Optional[nn.Module] = None) -> DeepLabV2:
    if name not in ARCHS:
        raise ValueError(f"unknown segmenter {name!r}; choose one of {sorted(ARCHS)}")
    block, layers, widths, stem, dilations = ARCHS[name]
    backbone = DilatedResNet(block, layers, widths, stem, stride_in_1x1=stride_in_1x1)
    return DeepLabV2(backbone, num_classes, batchnorm=batchnorm, dilations=dilations, input_transform=input_transform)
