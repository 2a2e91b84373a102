"""SqueezeNet with simple bypass for CIFAR (pytorch-cifar100 layout), plain / `_cbn` / `_nobn`.

Iandola, Han, Moskewicz, Ashraf, Dally, Keutzer, "SqueezeNet: AlexNet-level accuracy with 50x fewer
parameters and <0.5MB model size", arXiv 1602.07360.

MimicNorm twins (reference code): BatchNorm removed, convs N(0, 2.8 / (k*k*max(4, in/groups))).
The classifier is a 1x1 conv (so weight mean centres it) and the last BN follows its pooled output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register_model
from .layers import batchnorm2d, check_norm, last_bn, mimic_init_, plain_init_

CONV_VARIANCE = 2.8
MIN_CHANNELS_PER_GROUP = 4


def conv_relu(norm: str, in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Conv with bias (every variant, as in pytorch-cifar100), BN in the plain twin, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
        *batchnorm2d(norm, out_channels),
        nn.ReLU(inplace=True),
    )


class Fire(nn.Module):
    """Fire module: a 1x1 squeeze conv, then 1x1 and 3x3 expand convs concatenated."""

    def __init__(
        self, in_channels: int, out_channels: int, squeeze_channels: int, norm: str
    ) -> None:
        super().__init__()
        self.squeeze = conv_relu(norm, in_channels, squeeze_channels, 1)
        self.expand_1x1 = conv_relu(norm, squeeze_channels, out_channels // 2, 1)
        self.expand_3x3 = conv_relu(norm, squeeze_channels, out_channels // 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze(x)
        return torch.cat([self.expand_1x1(x), self.expand_3x3(x)], dim=1)


class SqueezeNet(nn.Module):
    """CIFAR SqueezeNet: fire2..fire9, bypass around fire3/5/7, 1x1 conv classifier."""

    def __init__(self, norm: str = "bn", num_classes: int = 100) -> None:
        super().__init__()
        check_norm(norm)
        self.stem = nn.Sequential(*conv_relu(norm, 3, 96, 3), nn.MaxPool2d(2, 2))
        self.fire2 = Fire(96, 128, 16, norm)
        self.fire3 = Fire(128, 128, 16, norm)
        self.fire4 = Fire(128, 256, 32, norm)
        self.fire5 = Fire(256, 256, 32, norm)
        self.fire6 = Fire(256, 384, 48, norm)
        self.fire7 = Fire(384, 384, 48, norm)
        self.fire8 = Fire(384, 512, 64, norm)
        self.fire9 = Fire(512, 512, 64, norm)
        self.conv10 = nn.Conv2d(512, num_classes, 1)
        self.maxpool = nn.MaxPool2d(2, 2)
        self.last_bn = last_bn(norm, num_classes)
        if norm == "bn":
            plain_init_(self)
        else:
            mimic_init_(self, CONV_VARIANCE, MIN_CHANNELS_PER_GROUP)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        f2 = self.fire2(x)
        f3 = self.fire3(f2) + f2
        f4 = self.maxpool(self.fire4(f3))
        f5 = self.fire5(f4) + f4
        f6 = self.fire6(f5)
        f7 = self.fire7(f6) + f6
        f8 = self.maxpool(self.fire8(f7))
        logits = torch.flatten(F.adaptive_avg_pool2d(self.conv10(self.fire9(f8)), 1), 1)
        if self.last_bn is not None:
            logits = self.last_bn(logits)
        return logits


@register_model("cifar", "squeezenet")
def squeezenet(norm: str, num_classes: int) -> SqueezeNet:
    """CIFAR SqueezeNet (pytorch-cifar100)."""
    return SqueezeNet(norm, num_classes)
