"""torch.hub entry points: every model of the registry, untrained, named `<family>_<model>`
(`cifar_resnet18_cbn`, `imagenet_resnet18_cbn`, ...), generated from `models.list_models`.

    import torch
    net = torch.hub.load("path/to/mimicnorm", "cifar_resnet18_cbn", source="local", num_classes=10)
    net = torch.hub.load("path/to/mimicnorm", "imagenet_resnet50_cbn", source="local", width=0.5)

Each takes the registry's arguments, `num_classes` and `width` (see `models.create_model`);
`torch.hub.list` and `torch.hub.help` show them for a GitHub copy. A `_cbn` model is MimicNorm
only when trained with the weight-mean hook (`models.attach_weight_mean` on its optimizer), as
`--weight mean` of the training scripts does.
"""
from __future__ import annotations

from pathlib import Path as _Path
from typing import TYPE_CHECKING

import models as _models

if TYPE_CHECKING:
    from typing import Callable

    from torch import nn

# torch.hub lists every public callable of this module: other names start with "_".
dependencies = ["torch"]

if _Path(_models.__file__).resolve().parents[1] != _Path(__file__).resolve().parent:
    raise ImportError(f"another package named 'models' is imported already "
                      f"({_models.__file__}): load this repository's hubconf in a fresh process")

_FAMILY_INPUT = {"cifar": ("CIFAR", 100, 32), "imagenet": ("ImageNet", 1000, 224)}
_VARIANT_TEXT = {
    "bn": "{arch} with BatchNorm, the plain network",
    "mimic": "the MimicNorm twin of {arch}: no BatchNorm2d, a BN on the logits; train it with "
             "the weight-mean hook, models.attach_weight_mean",
    "none": "{arch} without any normalisation: its MimicNorm twin without the last BN",
}


def _entry_point(family: str, name: str) -> Callable[..., nn.Module]:
    """The hub function that builds registry model `name` of `family`."""
    label, default_classes, size = _FAMILY_INPUT[family]
    arch, variant = _models.parse_name(name)

    def build(num_classes: int = default_classes, width: float = 1.0) -> nn.Module:
        return _models.create_model(name, num_classes, family, width=width)

    build.__name__ = build.__qualname__ = f"{family}_{name}"
    build.__doc__ = (
        f"{label} {name}: {_VARIANT_TEXT[variant.name].format(arch=arch)}. Untrained, for "
        f"{size}x{size} images.\n\n"
        f"Args:\n"
        f"    num_classes: outputs of the classifier (default {default_classes}).\n"
        f"    width: multiplies every hidden channel count (default 1.0, the reference network; "
        f"e.g. 0.25 for quick studies).\n")
    return build


for _family in _models.FAMILIES:
    for _name in _models.list_models(_family):
        globals()[f"{_family}_{_name}"] = _entry_point(_family, _name)
del _family, _name
