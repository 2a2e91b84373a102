"""Plain, MimicNorm (`_cbn`) and un-normalised (`_nobn`) image classifiers for CIFAR and ImageNet."""
from . import mobilenetv2, resnet, shufflenetv2, squeezenet, vgg  # noqa: F401  (register models)
from ._registry import (
    FAMILIES,
    create_model,
    is_mimicnorm_name,
    list_archs,
    list_models,
    parse_name,
    register_model,
    twin_name,
)
from .conversion import PROJECTIONS, convert
from .folding import fold
from .mimicnorm import (
    CIFAR_RULE,
    IMAGENET_RULE,
    CentringRule,
    LastBN,
    ScaledConv2d,
    WeightMean,
    attach_weight_mean,
    centred_conv_weights,
    centring_rule,
    is_mimicnorm,
    weight_mean_,
)
from .variants import BN, MIMIC, NO_NORM, VARIANTS, Variant, get_variant

__all__ = [
    "BN",
    "CIFAR_RULE",
    "FAMILIES",
    "IMAGENET_RULE",
    "MIMIC",
    "NO_NORM",
    "PROJECTIONS",
    "VARIANTS",
    "CentringRule",
    "LastBN",
    "ScaledConv2d",
    "Variant",
    "WeightMean",
    "attach_weight_mean",
    "centred_conv_weights",
    "centring_rule",
    "convert",
    "create_model",
    "fold",
    "get_variant",
    "is_mimicnorm",
    "is_mimicnorm_name",
    "list_archs",
    "list_models",
    "parse_name",
    "register_model",
    "twin_name",
    "weight_mean_",
]
