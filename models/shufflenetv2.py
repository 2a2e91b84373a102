"""ShuffleNetV2 for CIFAR (pytorch-cifar100) and ImageNet (torchvision): plain, `_cbn`, `_nobn`.

Ma, Zhang, Zheng, Sun, "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design",
ECCV 2018 (arXiv 1807.11164).

MimicNorm twins (reference code): BatchNorm removed, every conv has a bias, convs
N(0, 2 / (k*k*max(4, in/groups))). Learnable scalars, folded into the conv they follow (before its
ReLU): 1.2**2 on the last 1x1 conv of the main branch, 1.2 on the 1x1 conv of the downsampling
branch and on conv5. CIFAR units also scale and shift their main branch's output by a learnable
scalar gain (init 1) and bias (init 0).

The two layouts differ only in: the stem (CIFAR: stride-1 conv + BN, no ReLU, no max-pool), the
width of a downsampling unit's main branch (CIFAR: the input width; ImageNet: half the output
width), the plain twin's conv biases (CIFAR: kept as in pytorch-cifar100; ImageNet: none) and the
unit gain/bias.
The ImageNet plain twin has torchvision's module names, so torchvision checkpoints load into it, and
its init (PyTorch's layer defaults). The CIFAR plain twin keeps PyTorch's defaults for the stem,
conv5 and fc, as the reference code did; its other convs are kaiming normal (fan_out).
A width multiplier rounds the stage widths to even counts (each unit splits its channels in two).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ._registry import register_model
from .layers import plain_init_, scaled_channels
from .mimicnorm import CENTRING_GAIN
from .variants import BN, Variant

CONV_VARIANCE = 2.0
MIN_CHANNELS_PER_GROUP = 4
STAGE_REPEATS = (4, 8, 4)
CIFAR_CHANNELS = (24, 116, 232, 464, 1024)
IMAGENET_CHANNELS = {"x0_5": (24, 48, 96, 192, 1024), "x1_0": (24, 116, 232, 464, 1024)}


def conv_unit(
    variant: Variant,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    bias: bool,
    stride: int = 1,
    groups: int = 1,
    relu: bool = False,
    scale: float | None = None,
) -> list[nn.Module]:
    """Conv (`ScaledConv2d` given a MimicNorm `scale`), BN in the plain twin, optional ReLU."""
    conv_args = (in_channels, out_channels, kernel_size, stride, kernel_size // 2)
    conv = variant.conv(*conv_args, groups=groups, bias=bias, scale=scale)
    return [conv, *variant.norm2d(out_channels), *([nn.ReLU(inplace=True)] if relu else [])]


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 unit: split (or, downsampling, copy) the input, run the branches, interleave."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, variant: Variant, cifar: bool
    ) -> None:
        super().__init__()
        branch = out_channels // 2
        bias = cifar or variant.conv_bias
        if stride == 1:
            if in_channels != out_channels:
                raise ValueError(f"stride-1 units keep their width: {in_channels}->{out_channels}")
            self.branch1 = None
            main_in = mid = branch
        else:
            self.branch1 = nn.Sequential(
                *conv_unit(
                    variant,
                    in_channels,
                    in_channels,
                    3,
                    bias=bias,
                    stride=stride,
                    groups=in_channels,
                ),
                *conv_unit(
                    variant, in_channels, branch, 1, bias=bias, relu=True, scale=CENTRING_GAIN
                ),
            )
            main_in, mid = in_channels, (in_channels if cifar else branch)
        self.branch2 = nn.Sequential(
            *conv_unit(variant, main_in, mid, 1, bias=bias, relu=True),
            *conv_unit(variant, mid, mid, 3, bias=bias, stride=stride, groups=mid),
            *conv_unit(variant, mid, branch, 1, bias=bias, relu=True, scale=CENTRING_GAIN**2),
        )
        has_affine = cifar and not variant.body_bn
        self.gain = nn.Parameter(torch.tensor(1.0)) if has_affine else None
        self.bias = nn.Parameter(torch.tensor(0.0)) if has_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch1 is None:
            shortcut, x = x.chunk(2, dim=1)
        else:
            shortcut = self.branch1(x)
        main = self.branch2(x)
        if self.gain is not None:
            # mul saves the ReLU output the ReLU already saved (same storage), add_ saves nothing.
            main = main.mul(self.gain).add_(self.bias)
        # cat + channel shuffle with 2 groups in one copy: channels interleave shortcut, main.
        return torch.stack((shortcut, main), dim=2).flatten(1, 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 with `channels` = (stem, stage2, stage3, stage4, conv5) widths, any variant.

    The widths are scaled by `width`.
    """

    def __init__(
        self,
        channels: Sequence[int],
        variant: Variant = BN,
        num_classes: int = 1000,
        cifar: bool = False,
        stage_repeats: Sequence[int] = STAGE_REPEATS,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if len(channels) != 5 or len(stage_repeats) != 3:
            raise ValueError("expected 5 channel widths and 3 stage repeats")
        # Every stride-1 unit splits its input in two: the stage widths must stay even.
        stem, *stages, last = channels
        channels = [
            scaled_channels(stem, width),
            *(scaled_channels(c, width, multiple=2) for c in stages),
            scaled_channels(last, width),
        ]
        bias = cifar or variant.conv_bias
        if cifar:
            self.conv1 = nn.Sequential(*conv_unit(variant, 3, channels[0], 3, bias=bias))
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Sequential(
                *conv_unit(variant, 3, channels[0], 3, bias=bias, stride=2, relu=True)
            )
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stage2 = self.make_stage(channels[0], channels[1], stage_repeats[0], variant, cifar)
        self.stage3 = self.make_stage(channels[1], channels[2], stage_repeats[1], variant, cifar)
        self.stage4 = self.make_stage(channels[2], channels[3], stage_repeats[2], variant, cifar)
        self.conv5 = nn.Sequential(
            *conv_unit(
                variant, channels[3], channels[4], 1, bias=bias, relu=True, scale=CENTRING_GAIN
            )
        )
        self.fc = nn.Linear(channels[4], num_classes)
        self.last_bn = variant.last_bn(num_classes)
        plain = _init_units_ if cifar else None
        variant.init_(self, CONV_VARIANCE, MIN_CHANNELS_PER_GROUP, plain=plain)

    @staticmethod
    def make_stage(
        in_channels: int, out_channels: int, units: int, variant: Variant, cifar: bool
    ) -> nn.Sequential:
        """One downsampling unit followed by `units - 1` stride-1 units."""
        return nn.Sequential(
            ShuffleUnit(in_channels, out_channels, 2, variant, cifar),
            *(ShuffleUnit(out_channels, out_channels, 1, variant, cifar) for _ in range(units - 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.conv5(self.stage4(self.stage3(self.stage2(x))))
        return self.last_bn(self.fc(x.mean((2, 3))))


def _init_units_(net: ShuffleNetV2) -> None:
    """The reference CIFAR code's plain init: its units only (stem, conv5, fc keep defaults)."""
    for stage in (net.stage2, net.stage3, net.stage4):
        plain_init_(stage)


@register_model("cifar", "shufflenetv2")
def shufflenetv2(variant: Variant, num_classes: int, width: float) -> ShuffleNetV2:
    """CIFAR ShuffleNetV2 1.0x (pytorch-cifar100)."""
    return ShuffleNetV2(CIFAR_CHANNELS, variant, num_classes, cifar=True, width=width)


@register_model("imagenet", "shufflenetv2_x0_5")
def shufflenetv2_x0_5(variant: Variant, num_classes: int, width: float) -> ShuffleNetV2:
    """ImageNet ShuffleNetV2 0.5x (torchvision `shufflenet_v2_x0_5`)."""
    return ShuffleNetV2(IMAGENET_CHANNELS["x0_5"], variant, num_classes, width=width)


@register_model("imagenet", "shufflenetv2_x1_0")
def shufflenetv2_x1_0(variant: Variant, num_classes: int, width: float) -> ShuffleNetV2:
    """ImageNet ShuffleNetV2 1.0x (torchvision `shufflenet_v2_x1_0`)."""
    return ShuffleNetV2(IMAGENET_CHANNELS["x1_0"], variant, num_classes, width=width)
