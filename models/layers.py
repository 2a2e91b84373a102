"""Building blocks shared by the architectures: channel scaling and initialisations."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

# He et al.'s variance numerator for ReLU networks: N(0, 2 / fan).
HE_NUMERATOR = 2.0


def scaled_channels(channels: int, width: float, multiple: int = 1) -> int:
    """`channels * width` rounded to a multiple of `multiple` (at least one multiple).

    With the default `multiple` this is `max(1, round(channels * width))`; families whose layers
    need divisibility (channel splits, groups) pass the multiple they need.
    """
    return max(multiple, round(channels * width / multiple) * multiple)


def normal_(weight: nn.Parameter, variance_numerator: float, fan: int) -> None:
    """Fill `weight` from N(0, variance_numerator / fan), the reference code's init family."""
    nn.init.normal_(weight, 0.0, math.sqrt(variance_numerator / fan))


def fan_in_init_(model: nn.Module, conv_numerator: float, min_channels_per_group: int = 1) -> None:
    """Convs N(0, numerator / (kh*kw*max(min, in/groups))), Linears N(0, 2/in), biases 0.

    The reference code's fan-in init: the MimicNorm twins' (numerator 2 or 2.8, clamped fans) and,
    with numerator 2 and no clamp, He's init of several plain twins.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            channels = max(min_channels_per_group, module.in_channels // module.groups)
            normal_(module.weight, conv_numerator, kh * kw * channels)
        elif isinstance(module, nn.Linear):
            normal_(module.weight, 2.0, module.in_features)
        else:
            continue
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def he_init_(model: nn.Module) -> None:
    """He's init as the reference code wrote it: `fan_in_init_` with numerator 2 and no clamp."""
    fan_in_init_(model, HE_NUMERATOR)


def plain_init_(model: nn.Module) -> None:
    """torchvision's BN-network init: convs kaiming normal (fan_out), BN 1 and 0, conv biases 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class AvgPoolTo(nn.AdaptiveAvgPool2d):
    """`nn.AdaptiveAvgPool2d(size)` computed without the adaptive kernel where it need not be:
    nothing when the input already has that size, a plain average pool where the size divides
    it. The adaptive pool's CUDA backward has no deterministic kernel (`--deterministic` would
    stop at the first backward); the plain pool's has. Same outputs, no parameters or state."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = _pair(self.output_size)
        height, width = x.shape[-2:]
        # None keeps that side's size; a TorchScript trace must not fix the input size: the
        # adaptive kernel serves both.
        if None in size or torch.jit.is_tracing():
            return super().forward(x)
        if (height, width) == size:
            return x
        if height % size[0] == 0 and width % size[1] == 0:
            kernel = (height // size[0], width // size[1])
            return F.avg_pool2d(x, kernel, kernel)
        return super().forward(x)
