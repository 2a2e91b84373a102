"""ResNet-18/34/50/101 for CIFAR (3x3 stem, no max-pool) and ImageNet (torchvision topology).

He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016.

One definition serves the three variants. `BN` is the usual BatchNorm network. `MIMIC` (`_cbn`)
drops every BatchNorm2d, gives the convs biases, N(0, 2/fan_in) weights and folds a learnable
scalar 1.2**k / l (k convs in the branch, l the block's global index from 1) into the last conv of
every residual branch, and ends in the last BN on the logits. `NO_NORM` (`_nobn`) is the `MIMIC`
network without the last BN. The plain twin keeps its reference init: torchvision's on ImageNet,
PyTorch's default layer init on CIFAR (the reference CIFAR code's init loop was disabled).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ._registry import register_model
from .layers import HE_NUMERATOR, plain_init_, scaled_channels
from .mimicnorm import CENTRING_GAIN, residual_scale_init
from .variants import Variant

STAGE_WIDTHS = (64, 128, 256, 512)
STEMS = ("cifar", "imagenet")


class ResidualBlock(nn.Module):
    """`ReLU(branch(x) + shortcut(x))`; subclasses fix the branch's kernel sizes and expansion.

    The branch is conv-[BN]-ReLU-...-conv-[BN]; without BN its last conv is a `ScaledConv2d`
    carrying the residual scalar. The stride sits on the first 3x3 conv (torchvision's v1.5).
    A projection shortcut (1x1 conv) is used when the shape changes: conv-BN for `BN`, otherwise a
    conv with `projection_bias`, followed by a folded scalar when `projection_scale` is given.
    Channel counts are the full-width ones, which fix the topology; the convs get them scaled by
    `width`.
    """

    expansion: int
    kernel_sizes: tuple[int, ...]

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int,
        variant: Variant,
        block_index: int,
        projection_bias: bool = True,
        projection_scale: float | None = None,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.branch = self._branch(in_channels, planes, stride, variant, block_index, width)
        self.shortcut = self._shortcut(
            in_channels, out_channels, stride, variant, projection_bias, projection_scale, width
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch(x)
        out += self.shortcut(x)
        return self.relu(out)

    def _branch(
        self,
        in_channels: int,
        planes: int,
        stride: int,
        variant: Variant,
        block_index: int,
        width: float,
    ) -> nn.Sequential:
        n = len(self.kernel_sizes)
        full = [in_channels] + [planes] * (n - 1) + [planes * self.expansion]
        channels = [scaled_channels(c, width) for c in full]
        strides = [1] * n
        strides[self.kernel_sizes.index(3)] = stride
        layers: list[nn.Module] = []
        for i, (kernel, conv_stride) in enumerate(zip(self.kernel_sizes, strides)):
            args = (channels[i], channels[i + 1], kernel, conv_stride, kernel // 2)
            last = i == n - 1
            scale = residual_scale_init(block_index, n) if last else None
            conv = variant.conv(*args, bias=variant.conv_bias, scale=scale)
            layers += [conv, *variant.norm2d(channels[i + 1])]
            if not last:
                layers.append(nn.ReLU(inplace=True))
        return nn.Sequential(*layers)

    @staticmethod
    def _shortcut(
        in_channels: int,
        out_channels: int,
        stride: int,
        variant: Variant,
        bias: bool,
        scale: float | None,
        width: float,
    ) -> nn.Module:
        # Decided on the full-width counts: narrowed ones may coincide where the full ones differ.
        if stride == 1 and in_channels == out_channels:
            return nn.Identity()
        in_channels = scaled_channels(in_channels, width)
        out_channels = scaled_channels(out_channels, width)
        if variant.body_bn:
            conv = variant.conv(in_channels, out_channels, 1, stride, bias=variant.conv_bias)
            return nn.Sequential(conv, *variant.norm2d(out_channels))
        return variant.conv(in_channels, out_channels, 1, stride, bias=bias, scale=scale)


class BasicBlock(ResidualBlock):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1
    kernel_sizes = (3, 3)


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3, 1x1 expand by 4 (ResNet-50/101)."""

    expansion = 4
    kernel_sizes = (1, 3, 1)


class ResNet(nn.Module):
    """ResNet with a CIFAR (3x3 conv, no max-pool) or ImageNet (7x7/2 conv, 3x3/2 max-pool) stem.

    Block indices for the residual scalars run from 1 over the whole network. Plain (`BN`) models
    keep torchvision's init with the ImageNet stem and PyTorch's defaults with the CIFAR one; the
    BN-free variants use N(0, 2/fan_in) for every conv and Linear.
    """

    def __init__(
        self,
        block: type[ResidualBlock],
        depths: Sequence[int],
        variant: Variant,
        num_classes: int,
        stem: str = "cifar",
        projection_bias: bool = True,
        projection_scale: float | None = None,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        self.stem = _stem(stem, variant, scaled_channels(STAGE_WIDTHS[0], width))
        in_channels = STAGE_WIDTHS[0]
        block_index = 0
        stages = []
        for stage, (planes, depth) in enumerate(zip(STAGE_WIDTHS, depths)):
            blocks = []
            for i in range(depth):
                block_index += 1
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(
                    block(
                        in_channels,
                        planes,
                        stride,
                        variant,
                        block_index,
                        projection_bias,
                        projection_scale,
                        width,
                    )
                )
                in_channels = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(scaled_channels(in_channels, width), num_classes)
        self.last_bn = variant.last_bn(num_classes)
        variant.init_(self, HE_NUMERATOR, plain=plain_init_ if stem == "imagenet" else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        x = self.fc(torch.flatten(self.pool(x), 1))
        return self.last_bn(x)


def _stem(stem: str, variant: Variant, channels: int) -> nn.Sequential:
    """The input layers: 3x3 conv for CIFAR, 7x7/2 conv and 3x3/2 max-pool for ImageNet."""
    bias = variant.conv_bias
    if stem == "cifar":
        conv = nn.Conv2d(3, channels, 3, 1, 1, bias=bias)
        return nn.Sequential(conv, *variant.norm2d(channels), nn.ReLU(inplace=True))
    if stem == "imagenet":
        conv = nn.Conv2d(3, channels, 7, 2, 3, bias=bias)
        return nn.Sequential(
            conv,
            *variant.norm2d(channels),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
    raise ValueError(f"unknown stem {stem!r}; expected one of {', '.join(STEMS)}")


def _cifar_resnet(
    block: type[ResidualBlock],
    depths: Sequence[int],
    variant: Variant,
    num_classes: int,
    width: float,
) -> ResNet:
    # Reference CIFAR code: BasicBlock projections have a bias, Bottleneck ones do not; no scalar.
    bias = block is BasicBlock
    return ResNet(block, depths, variant, num_classes, "cifar", projection_bias=bias, width=width)


def _imagenet_resnet(
    block: type[ResidualBlock],
    depths: Sequence[int],
    variant: Variant,
    num_classes: int,
    width: float,
) -> ResNet:
    # Reference ImageNet code: biased projection followed by a scalar initialised to 1.2.
    return ResNet(
        block,
        depths,
        variant,
        num_classes,
        "imagenet",
        projection_bias=True,
        projection_scale=CENTRING_GAIN,
        width=width,
    )


@register_model("cifar", "resnet18")
def cifar_resnet18(variant: Variant, num_classes: int, width: float) -> ResNet:
    """ResNet-18 for 32x32 inputs."""
    return _cifar_resnet(BasicBlock, (2, 2, 2, 2), variant, num_classes, width)


@register_model("cifar", "resnet34")
def cifar_resnet34(variant: Variant, num_classes: int, width: float) -> ResNet:
    """ResNet-34 for 32x32 inputs."""
    return _cifar_resnet(BasicBlock, (3, 4, 6, 3), variant, num_classes, width)


@register_model("cifar", "resnet50")
def cifar_resnet50(variant: Variant, num_classes: int, width: float) -> ResNet:
    """ResNet-50 for 32x32 inputs."""
    return _cifar_resnet(Bottleneck, (3, 4, 6, 3), variant, num_classes, width)


@register_model("cifar", "resnet101")
def cifar_resnet101(variant: Variant, num_classes: int, width: float) -> ResNet:
    """ResNet-101 for 32x32 inputs."""
    return _cifar_resnet(Bottleneck, (3, 4, 23, 3), variant, num_classes, width)


@register_model("imagenet", "resnet18")
def imagenet_resnet18(variant: Variant, num_classes: int, width: float) -> ResNet:
    """ResNet-18 for 224x224 inputs."""
    return _imagenet_resnet(BasicBlock, (2, 2, 2, 2), variant, num_classes, width)


@register_model("imagenet", "resnet50")
def imagenet_resnet50(variant: Variant, num_classes: int, width: float) -> ResNet:
    """ResNet-50 for 224x224 inputs."""
    return _imagenet_resnet(Bottleneck, (3, 4, 6, 3), variant, num_classes, width)


@register_model("imagenet", "resnet101")
def imagenet_resnet101(variant: Variant, num_classes: int, width: float) -> ResNet:
    """ResNet-101 for 224x224 inputs."""
    return _imagenet_resnet(Bottleneck, (3, 4, 23, 3), variant, num_classes, width)
