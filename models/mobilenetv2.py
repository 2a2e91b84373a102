"""MobileNetV2 for CIFAR (pytorch-cifar100 layout), plain / `_cbn` / `_nobn`.

Sandler, Howard, Zhu, Zhmoginov, Chen, "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
CVPR 2018 (arXiv 1801.04381).

MimicNorm twins (our extension; the reference code has a draft it never tested): BatchNorm removed,
ReLU6 becomes ReLU, a conv has a bias only where weight mean centres it (fan-in per group > 50),
convs N(0, 2 / (k*k*max(2, in/groups))). Each bottleneck's output is scaled by a learnable scalar
folded into its last conv: 1.2**2 / l for the l-th identity-shortcut block (l counted from 1 over
the network), 1.2**2 for blocks without a shortcut.
The plain twin (reference code): every conv, the classifier included, N(0, 2 / (k*k*in/groups)),
biases 0, BN 1 and 0.
Under a width multiplier the shortcuts and the MimicNorm biases follow the full-width network.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import register_model
from .layers import he_init_, scaled_channels
from .mimicnorm import CIFAR_RULE, residual_scale_init
from .variants import BN, Variant

CONV_VARIANCE = 2.0
MIN_CHANNELS_PER_GROUP = 2
STEM_CHANNELS = 32
FEATURE_CHANNELS = 1280
# (expansion t, output channels, blocks, stride of the first block) of stages 1..7.
STAGES = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 1),
    (6, 320, 1, 1),
)


def make_conv(
    variant: Variant,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    scale: float | None = None,
    reference_fan_in: int | None = None,
) -> nn.Conv2d:
    """Conv; biased in the plain twin (pytorch-cifar100), else only where weight mean centres it.

    `reference_fan_in` is the fan-in per group of the full-width conv (default: this conv's), which
    weight mean's selection goes by.
    """
    if reference_fan_in is None:
        reference_fan_in = in_channels // groups * kernel_size * kernel_size
    bias = variant.body_bn or reference_fan_in > CIFAR_RULE.min_fan_in
    args = (in_channels, out_channels, kernel_size, stride, padding)
    return variant.conv(*args, groups=groups, bias=bias, scale=scale)


def activation(variant: Variant) -> nn.Module:
    """ReLU6 in the plain twin, ReLU in the BN-free variants."""
    return nn.ReLU6(inplace=True) if variant.body_bn else nn.ReLU(inplace=True)


class LinearBottleneck(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, linear 1x1 projection, identity shortcut.

    The shortcut exists when stride is 1 and the width is kept. `identity_index` is the block's
    position l among the network's identity-shortcut blocks (from 1); it sets the MimicNorm output
    scalar 1.2**2 / l and must be given exactly for those blocks. Channel counts are full-width
    ones, which fix the topology; the convs get them scaled by `width`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        expansion: int,
        variant: Variant,
        identity_index: int | None = None,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        self.identity = stride == 1 and in_channels == out_channels
        if self.identity != (identity_index is not None):
            raise ValueError("identity_index must be given exactly for identity-shortcut blocks")
        full_hidden = in_channels * expansion
        hidden = scaled_channels(full_hidden, width)
        narrow_in = scaled_channels(in_channels, width)
        narrow_out = scaled_channels(out_channels, width)
        scale = residual_scale_init(identity_index or 1, 2)
        self.residual = nn.Sequential(
            make_conv(variant, narrow_in, hidden, 1, reference_fan_in=in_channels),
            *variant.norm2d(hidden),
            activation(variant),
            make_conv(variant, hidden, hidden, 3, stride=stride, padding=1, groups=hidden),
            *variant.norm2d(hidden),
            activation(variant),
            make_conv(variant, hidden, narrow_out, 1, scale=scale, reference_fan_in=full_hidden),
            *variant.norm2d(narrow_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.residual(x)
        if self.identity:
            out += x
        return out


class MobileNetV2(nn.Module):
    """CIFAR MobileNetV2 (1x1 stem, seven bottleneck stages, 1x1 conv classifier), any variant."""

    def __init__(self, variant: Variant = BN, num_classes: int = 100, width: float = 1.0) -> None:
        super().__init__()
        stem = scaled_channels(STEM_CHANNELS, width)
        # pytorch-cifar100's stem: a 1x1 conv with padding 1 (32x32 -> 34x34).
        self.pre = nn.Sequential(
            make_conv(variant, 3, stem, 1, padding=1), *variant.norm2d(stem), activation(variant)
        )
        identity_blocks = 0
        in_channels = STEM_CHANNELS
        for stage, (expansion, out_channels, blocks, stride) in enumerate(STAGES, start=1):
            layers = []
            for block in range(blocks):
                block_stride = stride if block == 0 else 1
                index = None
                if block_stride == 1 and in_channels == out_channels:
                    identity_blocks += 1
                    index = identity_blocks
                block_args = (in_channels, out_channels, block_stride, expansion, variant, index)
                layers.append(LinearBottleneck(*block_args, width=width))
                in_channels = out_channels
            # a one-block stage is the block itself, keeping pytorch-cifar100's state-dict names
            self.add_module(f"stage{stage}", layers[0] if blocks == 1 else nn.Sequential(*layers))
        features = scaled_channels(FEATURE_CHANNELS, width)
        narrow_in = scaled_channels(in_channels, width)
        self.conv1 = nn.Sequential(
            make_conv(variant, narrow_in, features, 1, reference_fan_in=in_channels),
            *variant.norm2d(features),
            activation(variant),
        )
        self.conv2 = make_conv(variant, features, num_classes, 1, reference_fan_in=FEATURE_CHANNELS)
        self.last_bn = variant.last_bn(num_classes)
        variant.init_(self, CONV_VARIANCE, MIN_CHANNELS_PER_GROUP, plain=he_init_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage4(self.stage3(self.stage2(self.stage1(self.pre(x)))))
        x = self.stage7(self.stage6(self.stage5(x)))
        x = F.adaptive_avg_pool2d(self.conv1(x), 1)
        return self.last_bn(torch.flatten(self.conv2(x), 1))


@register_model("cifar", "mobilenetv2")
def mobilenetv2(variant: Variant, num_classes: int, width: float) -> MobileNetV2:
    """CIFAR MobileNetV2 (pytorch-cifar100)."""
    return MobileNetV2(variant, num_classes, width)
