"""Small building blocks shared by the architectures: what each normalisation variant changes."""
from __future__ import annotations

import math

from torch import nn

from ._registry import NORMS
from .mimicnorm import LastBN


def check_norm(norm: str) -> str:
    """Return `norm` if it is one of "bn", "mimic", "none", else raise ValueError."""
    if norm not in NORMS:
        raise ValueError(f"unknown normalisation {norm!r}; expected one of {', '.join(NORMS)}")
    return norm


def batchnorm2d(norm: str, channels: int) -> list[nn.Module]:
    """`[BatchNorm2d(channels)]` for the plain twin, `[]` for the BN-free variants."""
    return [nn.BatchNorm2d(channels)] if check_norm(norm) == "bn" else []


def last_bn(norm: str, num_classes: int) -> LastBN | None:
    """The last BN on the logits for a MimicNorm twin, None otherwise."""
    return LastBN(num_classes) if check_norm(norm) == "mimic" else None


def normal_(weight: nn.Parameter, variance_numerator: float, fan: int) -> None:
    """Fill `weight` from N(0, variance_numerator / fan), the reference code's init family."""
    nn.init.normal_(weight, 0.0, math.sqrt(variance_numerator / fan))
