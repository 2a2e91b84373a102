"""Plain, MimicNorm (`_cbn`) and un-normalised (`_nobn`) image classifiers for CIFAR and ImageNet."""
from . import mobilenetv2, resnet, shufflenetv2, squeezenet, vgg  # noqa: F401  (register models)
from ._registry import DATASETS, NORMS, create_model, list_models, register_model, split_model_name
from .mimicnorm import (
    CIFAR_RULE,
    IMAGENET_RULE,
    CentringRule,
    LastBN,
    ScaledConv2d,
    WeightMean,
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
    "CentringRule",
    "LastBN",
    "ScaledConv2d",
    "WeightMean",
    "centred_conv_weights",
    "centring_rule",
    "create_model",
    "is_mimicnorm",
    "list_models",
    "register_model",
    "split_model_name",
    "weight_mean_",
]
