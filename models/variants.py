"""The three networks every architecture builds: the BN twin, its MimicNorm twin, and neither.

An architecture takes a `Variant` (as timm's models take a `norm_layer`) and asks it for its norm
layers, residual-branch convs, head and init instead of testing names:

* `BN` ("bn", no suffix): the plain network, BatchNorm2d after its convs, no last BN;
* `MIMIC` ("mimic", `_cbn`): no BatchNorm2d, biased convs, residual scalars folded into the
  `ScaledConv2d` that ends each residual branch, the fan-in init, and the last BN on the logits;
* `NO_NORM` ("none", `_nobn`): the MimicNorm twin without its last BN.

Only the registry turns model names into variants (`models.parse_name`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from .layers import fan_in_init_
from .mimicnorm import LastBN, ScaledConv2d


@dataclass(frozen=True)
class Variant:
    """What distinguishes the BN twin, the MimicNorm twin and the un-normalised network."""

    name: str
    suffix: str
    body_bn: bool
    has_last_bn: bool

    @property
    def conv_bias(self) -> bool:
        """Whether a conv gets a bias by default: only where no BatchNorm2d follows it."""
        return not self.body_bn

    def norm2d(self, channels: int) -> list[nn.Module]:
        """`[BatchNorm2d(channels)]` with BN in the body, else `[]` (to splice into Sequentials:
        an `nn.Identity` there would shift the state-dict indices of the layers after it)."""
        return [nn.BatchNorm2d(channels)] if self.body_bn else []

    def conv(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        *,
        groups: int = 1,
        bias: bool,
        scale: float | None = None,
    ) -> nn.Conv2d:
        """A Conv2d; given the residual scalar `scale`, a BN-free variant's `ScaledConv2d` instead.

        A residual branch ends in a plain conv (followed by BN) in the BN twin and in a conv
        carrying the branch's learnable scalar, initialised to `scale`, without BN.
        """
        args = (in_channels, out_channels, kernel_size, stride, padding)
        if scale is None or self.body_bn:
            return nn.Conv2d(*args, groups=groups, bias=bias)
        return ScaledConv2d(*args, groups=groups, bias=bias, scale_init=scale)

    def last_bn(self, num_classes: int) -> nn.Module:
        """The head on the logits: `LastBN(num_classes)` for the MimicNorm twin, else identity."""
        return LastBN(num_classes) if self.has_last_bn else nn.Identity()

    def init_(
        self,
        model: nn.Module,
        conv_numerator: float,
        min_channels_per_group: int = 1,
        *,
        plain: Callable[[nn.Module], None] | None = None,
    ) -> None:
        """Initialise `model`: the BN twin by its reference's `plain` init (None: PyTorch's layer
        defaults), the BN-free variants by `fan_in_init_(model, conv_numerator, min_channels)`."""
        if not self.body_bn:
            fan_in_init_(model, conv_numerator, min_channels_per_group)
        elif plain is not None:
            plain(model)


BN = Variant("bn", "", body_bn=True, has_last_bn=False)
MIMIC = Variant("mimic", "_cbn", body_bn=False, has_last_bn=True)
NO_NORM = Variant("none", "_nobn", body_bn=False, has_last_bn=False)
VARIANTS: dict[str, Variant] = {v.name: v for v in (BN, MIMIC, NO_NORM)}


def get_variant(variant: Variant | str) -> Variant:
    """The variant named `variant` ("bn", "mimic" or "none"); a `Variant` is returned as is."""
    if isinstance(variant, Variant):
        return variant
    try:
        return VARIANTS[variant]
    except KeyError:
        raise ValueError(
            f"unknown variant {variant!r}; expected one of {', '.join(VARIANTS)}"
        ) from None
