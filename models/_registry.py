"""Model registry: each architecture registers one builder that serves all three variants.

A builder takes `(variant, num_classes, width)` with variant one of `BN` (the plain BatchNorm
network, named `<arch>`), `MIMIC` (its MimicNorm twin, `<arch>_cbn`) and `NO_NORM` (no
normalisation at all, `<arch>_nobn`). `create_model` is the single door, and this module the only
one that reads the suffixes of model names: elsewhere ask `parse_name`, `twin_name` or
`is_mimicnorm_name`.

Width: every hidden channel count c (conv and Linear) becomes `scaled_channels(c, width)`, i.e.
max(1, round(c * width)), rounded to a multiple where a family needs divisibility. The 3 input
channels and the classes never scale; topology, residual scalars and init rules do not depend on
width, and width 1 is the reference network. A reduced network's convs are centred by weight mean
exactly where the full-width network's are (judged by the full-width fan-in).
"""
from __future__ import annotations

import difflib
import math
from typing import Callable

import torch
from torch import nn

from .mimicnorm import check_num_classes, record_reference_convs_
from .variants import BN, VARIANTS, Variant, get_variant

Builder = Callable[[Variant, int, float], nn.Module]

FAMILIES = ("cifar", "imagenet")

_builders: dict[str, dict[str, Builder]] = {family: {} for family in FAMILIES}


def register_model(family: str, arch: str) -> Callable[[Builder], Builder]:
    """Decorator registering `builder(variant, num_classes, width)` as `arch` for `family`."""
    _check_family(family)

    def decorate(builder: Builder) -> Builder:
        if arch in _builders[family]:
            raise ValueError(f"{family} model {arch!r} registered twice")
        _builders[family][arch] = builder
        return builder

    return decorate


def list_models(family: str = "cifar") -> list[str]:
    """Every model name for `family`: each architecture and its `_cbn` and `_nobn` twins."""
    return sorted(twin_name(arch, v) for arch in list_archs(family) for v in VARIANTS.values())


def list_archs(family: str = "cifar") -> list[str]:
    """Every registered architecture for `family`, i.e. the names of the BN twins."""
    _check_family(family)
    return sorted(_builders[family])


def parse_name(name: str) -> tuple[str, Variant]:
    """`"resnet18_cbn"` -> `("resnet18", MIMIC)`; a name without a suffix is the BN twin.

    Only the suffix is read: whether the architecture is registered is `create_model`'s business.
    """
    if not isinstance(name, str):
        raise TypeError(f"a model name must be a str, got {type(name).__name__} {name!r:.60}")
    for variant in VARIANTS.values():
        if variant.suffix and name.endswith(variant.suffix):
            return name[: -len(variant.suffix)], variant
    return name, BN


def twin_name(name: str, variant: Variant | str) -> str:
    """Model `name`'s twin in `variant`: `twin_name("vgg16", "mimic")` -> "vgg16_cbn"."""
    return parse_name(name)[0] + get_variant(variant).suffix


def is_mimicnorm_name(name: str) -> bool:
    """True for the name of a MimicNorm twin (`_cbn`: the variant with a last BN)."""
    return parse_name(name)[1].has_last_bn


def create_model(
    name: str, num_classes: int = 100, family: str = "cifar", width: float = 1.0
) -> nn.Module:
    """Build the registered model `name` for `family` with `num_classes` outputs at `width`.

    Raises TypeError for an argument of the wrong type, ValueError for a wrong value.
    """
    arch, variant = parse_name(name)
    check_num_classes(num_classes)
    _check_family(family)
    builder = _builders[family].get(arch)
    if builder is None:
        close = difflib.get_close_matches(name, list_models(family), n=4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown {family} model {name!r}{hint}")
    if isinstance(width, bool) or not isinstance(width, (int, float)):
        raise TypeError(f"width must be a number, got {type(width).__name__} {width!r:.60}")
    if not (width > 0 and math.isfinite(width)):
        raise ValueError(f"width must be a positive number, got {width}")
    model = builder(variant, num_classes, width)
    if width != 1.0:
        # The full-width twin only lends its conv shapes: on the meta device it costs no memory.
        with torch.device("meta"):
            reference = builder(variant, num_classes, 1.0)
        record_reference_convs_(model, reference)
    return model


def _check_family(family: str) -> None:
    if not isinstance(family, str) or family not in _builders:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
