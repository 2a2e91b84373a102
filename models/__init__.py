"""Plain, MimicNorm (`_cbn`) and un-normalised (`_nobn`) image classifiers for CIFAR and ImageNet."""
from . import mobilenetv2, resnet, shufflenetv2, squeezenet, vgg  # noqa: F401  (register models)
from ._registry import DATASETS, NORMS, create_model, list_models, register_model, split_model_name
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

__all__ = [
    "CIFAR_RULE",
    "DATASETS",
    "IMAGENET_RULE",
    "NORMS",
    "PROJECTIONS",
    "CentringRule",
    "LastBN",
    "ScaledConv2d",
    "WeightMean",
    "attach_weight_mean",
    "centred_conv_weights",
    "centring_rule",
    "convert",
    "create_model",
    "fold",
    "is_mimicnorm",
    "list_models",
    "register_model",
    "split_model_name",
    "weight_mean_",
]
