"""Model registry: each architecture registers one builder that serves all three variants.

A builder takes `(norm, num_classes, width)` with norm one of "bn" (the plain BatchNorm network),
"mimic" (its MimicNorm twin, registered as `<arch>_cbn`) and "none" (no normalisation at all,
`<arch>_nobn`). `create_model` is the single door.

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

from .mimicnorm import record_reference_convs_

Builder = Callable[[str, int, float], nn.Module]

DATASETS = ("cifar", "imagenet")
NORMS = ("bn", "mimic", "none")
VARIANT_SUFFIX = {"bn": "", "mimic": "_cbn", "none": "_nobn"}

_builders: dict[str, dict[str, Builder]] = {dataset: {} for dataset in DATASETS}


def register_model(dataset: str, arch: str) -> Callable[[Builder], Builder]:
    """Decorator registering `builder(norm, num_classes, width)` as `arch` for `dataset`."""
    _check_dataset(dataset)

    def decorate(builder: Builder) -> Builder:
        if arch in _builders[dataset]:
            raise ValueError(f"{dataset} model {arch!r} registered twice")
        _builders[dataset][arch] = builder
        return builder

    return decorate


def list_models(dataset: str = "cifar") -> list[str]:
    """Every model name for `dataset`: each architecture and its `_cbn` and `_nobn` twins."""
    _check_dataset(dataset)
    return sorted(arch + suffix for arch in _builders[dataset] for suffix in VARIANT_SUFFIX.values())


def split_model_name(name: str) -> tuple[str, str]:
    """`"resnet18_cbn"` -> `("resnet18", "mimic")`; names without a suffix are the BN twin."""
    for norm, suffix in VARIANT_SUFFIX.items():
        if suffix and name.endswith(suffix):
            return name[: -len(suffix)], norm
    return name, "bn"


def create_model(
    name: str, num_classes: int = 100, dataset: str = "cifar", width: float = 1.0
) -> nn.Module:
    """Build the registered model `name` for `dataset` with `num_classes` outputs at `width`."""
    _check_dataset(dataset)
    arch, norm = split_model_name(name)
    builder = _builders[dataset].get(arch)
    if builder is None:
        close = difflib.get_close_matches(name, list_models(dataset), n=4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown {dataset} model {name!r}{hint}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if not (width > 0 and math.isfinite(width)):
        raise ValueError(f"width must be a positive number, got {width}")
    model = builder(norm, num_classes, width)
    if width != 1.0:
        # The full-width twin only lends its conv shapes: on the meta device it costs no memory.
        with torch.device("meta"):
            reference = builder(norm, num_classes, 1.0)
        record_reference_convs_(model, reference)
    return model


def _check_dataset(dataset: str) -> None:
    if dataset not in _builders:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
