"""SqueezeNet with simple bypass for CIFAR (pytorch-cifar100 layout), plain / `_cbn` / `_nobn`.

Iandola, Han, Moskewicz, Ashraf, Dally, Keutzer, "SqueezeNet: AlexNet-level accuracy with 50x fewer
parameters and <0.5MB model size", arXiv 1602.07360.

MimicNorm twins (reference code): BatchNorm removed, convs N(0, 2.8 / (k*k*max(4, in/groups))).
The classifier is a 1x1 conv (so weight mean centres it) and the last BN follows its pooled output.
The plain twin (reference code): every conv, the classifier included, N(0, 2 / (k*k*in)), biases 0.
A width multiplier rounds each Fire module's output to an even count: two expand convs share it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register_model
from .layers import he_init_, scaled_channels
from .variants import BN, Variant

CONV_VARIANCE = 2.8
MIN_CHANNELS_PER_GROUP = 4
STEM_CHANNELS = 96
# (output channels, squeeze channels) of fire2..fire9.
FIRES = ((128, 16), (128, 16), (256, 32), (256, 32), (384, 48), (384, 48), (512, 64), (512, 64))


def conv_relu(
    variant: Variant, in_channels: int, out_channels: int, kernel_size: int
) -> nn.Sequential:
    """Conv with bias (every variant, as in pytorch-cifar100), BN in the plain twin, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
        *variant.norm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class Fire(nn.Module):
    """Fire module: a 1x1 squeeze conv, then 1x1 and 3x3 expand convs concatenated."""

    def __init__(
        self, in_channels: int, out_channels: int, squeeze_channels: int, variant: Variant
    ) -> None:
        super().__init__()
        self.squeeze = conv_relu(variant, in_channels, squeeze_channels, 1)
        self.expand_1x1 = conv_relu(variant, squeeze_channels, out_channels // 2, 1)
        self.expand_3x3 = conv_relu(variant, squeeze_channels, out_channels // 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze(x)
        return torch.cat([self.expand_1x1(x), self.expand_3x3(x)], dim=1)


class SqueezeNet(nn.Module):
    """CIFAR SqueezeNet: fire2..fire9, bypass around fire3/5/7, 1x1 conv classifier."""

    def __init__(self, variant: Variant = BN, num_classes: int = 100, width: float = 1.0) -> None:
        super().__init__()
        in_channels = scaled_channels(STEM_CHANNELS, width)
        self.stem = nn.Sequential(*conv_relu(variant, 3, in_channels, 3), nn.MaxPool2d(2, 2))
        for index, (out_channels, squeeze_channels) in enumerate(FIRES, start=2):
            out_channels = scaled_channels(out_channels, width, multiple=2)
            squeeze_channels = scaled_channels(squeeze_channels, width)
            fire = Fire(in_channels, out_channels, squeeze_channels, variant)
            self.add_module(f"fire{index}", fire)
            in_channels = out_channels
        self.conv10 = nn.Conv2d(in_channels, num_classes, 1)
        self.maxpool = nn.MaxPool2d(2, 2)
        self.last_bn = variant.last_bn(num_classes)
        variant.init_(self, CONV_VARIANCE, MIN_CHANNELS_PER_GROUP, plain=he_init_)

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
        return self.last_bn(logits)


@register_model("cifar", "squeezenet")
def squeezenet(variant: Variant, num_classes: int, width: float) -> SqueezeNet:
    """CIFAR SqueezeNet (pytorch-cifar100)."""
    return SqueezeNet(variant, num_classes, width)
