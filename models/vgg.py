"""VGG-11/13/16 for CIFAR (pytorch-cifar100 layout) and ImageNet (torchvision topology).

Simonyan, Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015.

One definition serves the three variants. `BN` puts a BatchNorm2d after every conv (vgg*_bn).
`MIMIC` (`_cbn`) drops them, draws the convs from N(0, 2.8/fan) (fan_in on CIFAR, fan_out on
ImageNet, as the reference code did) and the Linears from N(0, 2/fan_in), and ends in the last BN
on the logits. `NO_NORM` (`_nobn`) is the `MIMIC` network without the last BN. The plain twin is
initialised as the reference code did too: on CIFAR convs and Linears N(0, 2/fan_in), on ImageNet
as the `MIMIC` network (convs N(0, 2.8/fan_out), Linears N(0, 2/fan_in)); biases 0, BN 1 and 0.
The width multiplier scales the conv channels and the 4096-wide hidden Linears alike.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ._registry import register_model
from .layers import HE_NUMERATOR, AvgPoolTo, fan_in_init_, normal_, scaled_channels
from .variants import Variant

# Conv channels, "M" a 2x2 max-pool (Simonyan & Zisserman's configurations A, B and D).
CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (
        64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
    ),
}
# The reference's conv variance numerator: He's 2 times roughly the 1.2**2 that centring removes.
CONV_VARIANCE_NUMERATOR = 2.8
HIDDEN = 4096
IMAGENET_POOL = 7


class VGG(nn.Module):
    """Conv stack, then Linear-ReLU-Dropout twice and the output Linear.

    On CIFAR (32x32) the stack ends at 1x1 and feeds 512 features to the classifier; on ImageNet an
    adaptive 7x7 average pool feeds 512*7*7 (torchvision; here `AvgPoolTo`: none at 224 px). Convs
    keep their biases in every variant. `width` scales every conv and hidden Linear width (512 and
    4096 at width 1).
    """

    def __init__(
        self,
        config: Sequence[int | str],
        variant: Variant,
        num_classes: int,
        family: str = "cifar",
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if family not in ("cifar", "imagenet"):
            raise ValueError(f"unknown model family {family!r}; expected cifar or imagenet")
        self.features = _features(config, variant, width)
        imagenet = family == "imagenet"
        self.pool = AvgPoolTo(IMAGENET_POOL) if imagenet else nn.Identity()
        features = scaled_channels(_out_channels(config), width)
        features *= IMAGENET_POOL**2 if imagenet else 1
        hidden = scaled_channels(HIDDEN, width)
        self.classifier = nn.Sequential(
            nn.Linear(features, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(hidden, num_classes),
        )
        self.last_bn = variant.last_bn(num_classes)
        # One init for every variant (the reference's); only its plain CIFAR twin used He's
        # numerator, all others use 2.8.
        numerator = HE_NUMERATOR if variant.body_bn and not imagenet else CONV_VARIANCE_NUMERATOR
        fan_in_init_(self.classifier, numerator)
        _conv_init_(self.features, numerator, fan_out=imagenet)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.last_bn(self.classifier(x))


def _features(config: Sequence[int | str], variant: Variant, width: float) -> nn.Sequential:
    """3x3 conv (bias) - [BN] - ReLU per channel entry (scaled by `width`), 2x2 max-pool per "M"."""
    layers: list[nn.Module] = []
    in_channels = 3
    for entry in config:
        if entry == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        out_channels = scaled_channels(int(entry), width)
        layers += [
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            *variant.norm2d(out_channels),
            nn.ReLU(inplace=True),
        ]
        in_channels = out_channels
    return nn.Sequential(*layers)


def _conv_init_(features: nn.Module, numerator: float, fan_out: bool) -> None:
    """Convs N(0, numerator/fan), fan k*k*out (ImageNet reference) or k*k*in (CIFAR), biases 0."""
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            channels = m.out_channels if fan_out else m.in_channels
            normal_(m.weight, numerator, kh * kw * channels)
            nn.init.zeros_(m.bias)


def _out_channels(config: Sequence[int | str]) -> int:
    return next(int(entry) for entry in reversed(config) if entry != "M")


@register_model("cifar", "vgg11")
def cifar_vgg11(variant: Variant, num_classes: int, width: float) -> VGG:
    """VGG-11 (configuration A) for 32x32 inputs."""
    return VGG(CONFIGS["vgg11"], variant, num_classes, "cifar", width)


@register_model("cifar", "vgg13")
def cifar_vgg13(variant: Variant, num_classes: int, width: float) -> VGG:
    """VGG-13 (configuration B) for 32x32 inputs."""
    return VGG(CONFIGS["vgg13"], variant, num_classes, "cifar", width)


@register_model("cifar", "vgg16")
def cifar_vgg16(variant: Variant, num_classes: int, width: float) -> VGG:
    """VGG-16 (configuration D) for 32x32 inputs."""
    return VGG(CONFIGS["vgg16"], variant, num_classes, "cifar", width)


@register_model("imagenet", "vgg11")
def imagenet_vgg11(variant: Variant, num_classes: int, width: float) -> VGG:
    """VGG-11 (configuration A) for 224x224 inputs."""
    return VGG(CONFIGS["vgg11"], variant, num_classes, "imagenet", width)


@register_model("imagenet", "vgg16")
def imagenet_vgg16(variant: Variant, num_classes: int, width: float) -> VGG:
    """VGG-16 (configuration D) for 224x224 inputs."""
    return VGG(CONFIGS["vgg16"], variant, num_classes, "imagenet", width)
