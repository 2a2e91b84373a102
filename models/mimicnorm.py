"""MimicNorm primitives: weight mean, the last BN layer and the folded residual scale.

Fei, Dai, Li, Zou, Xiong, "MimicNorm: Weight Mean and Last BN Layer Mimic the Dynamic of Batch
Normalization", AAAI 2021 (arXiv 2010.09278).

* Weight mean is a projection: after initialisation and after every optimizer step each selected
  conv filter is re-centred to zero mean (`WeightMean`). Which convs are selected is a
  `CentringRule`; the CIFAR and ImageNet reference code used different rules.
* The last BN is a `BatchNorm1d(num_classes, affine=False)` on the logits, the only normalisation
  layer of a MimicNorm network (`LastBN`).
* Residual branches carry a learnable scalar. `ScaledConv2d` folds it into the weight and bias of
  the branch's last conv, which computes exactly `scale * conv(x)` without saving another activation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

# Centring a filter removes about 1/pi of the variance a ReLU network passes on; the reference
# initialisations multiply std (and the residual scalars) by 1/sqrt(1 - 1/pi) ~= 1.2 to compensate.
CENTRING_GAIN = 1.2


@dataclass(frozen=True)
class CentringRule:
    """Which convolutions weight mean centres.

    A conv is selected when its fan-in per group (in_channels / groups * kh * kw) exceeds
    `min_fan_in`; with `dense_only` it must also have groups == 1.
    """

    min_fan_in: int = 50
    dense_only: bool = False

    def selects(self, module: nn.Module) -> bool:
        """True when `module` is a Conv2d whose filters this rule centres."""
        if not isinstance(module, nn.Conv2d):
            return False
        if self.dense_only and module.groups != 1:
            return False
        return conv_fan_in(module) > self.min_fan_in


# CIFAR reference: fan-in per group > 50 (skips the 27-input RGB stem and depthwise convs).
CIFAR_RULE = CentringRule(min_fan_in=50)
# ImageNet reference: every dense conv, the 7x7 stem included.
IMAGENET_RULE = CentringRule(min_fan_in=0, dense_only=True)
_RULES = {"cifar": CIFAR_RULE, "imagenet": IMAGENET_RULE}


def centring_rule(dataset: str) -> CentringRule:
    """The reference code's centring rule for `dataset` ("cifar" or "imagenet")."""
    try:
        return _RULES[dataset]
    except KeyError:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(_RULES)}") from None


def conv_fan_in(conv: nn.Conv2d) -> int:
    """Inputs seen by one output unit: in_channels / groups * kh * kw."""
    kh, kw = conv.kernel_size
    return conv.in_channels // conv.groups * kh * kw


def centred_conv_weights(model: nn.Module, rule: CentringRule = CIFAR_RULE) -> list[nn.Parameter]:
    """The weights of every conv in `model` that `rule` selects, each listed once."""
    weights: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if rule.selects(module):
            weights.setdefault(id(module.weight), module.weight)
    return list(weights.values())


@torch.no_grad()
def centre_filters_(weights: Sequence[torch.Tensor]) -> None:
    """Subtract from every output filter of every weight its own mean, in place."""
    if not weights:
        return
    means = [w.mean(dim=tuple(range(1, w.dim())), keepdim=True) for w in weights]
    torch._foreach_sub_(list(weights), means)


class WeightMean:
    """The weight-mean projection of one model: selection done once, applied after each step."""

    def __init__(self, model: nn.Module, rule: CentringRule = CIFAR_RULE) -> None:
        self.rule = rule
        self.weights = centred_conv_weights(model, rule)

    def __call__(self) -> None:
        centre_filters_(self.weights)

    def __len__(self) -> int:
        return len(self.weights)


def weight_mean_(model: nn.Module, rule: CentringRule = CIFAR_RULE) -> nn.Module:
    """Centre the selected conv filters of `model` once, in place; returns `model`."""
    centre_filters_(centred_conv_weights(model, rule))
    return model


class LastBN(nn.Module):
    """BatchNorm1d(num_classes, affine=False) on the logits, computed in float32 under autocast."""

    def __init__(self, num_classes: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(num_classes, eps=eps, momentum=momentum, affine=False)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return self.bn(logits.float())


def residual_scale_init(block_index: int, convs_in_branch: int) -> float:
    """Initial residual scalar of the reference code: 1.2**convs_in_branch / block_index."""
    if block_index < 1:
        raise ValueError(f"block_index counts from 1, got {block_index}")
    return CENTRING_GAIN**convs_in_branch / block_index


class ScaledConv2d(nn.Conv2d):
    """Conv2d followed by a learnable scalar, folded into the conv: `scale * conv(x)`.

    Scaling the (parameter-sized) weight and bias instead of the output gives the same result and
    gradients, but autograd saves no copy of the output for the scalar's gradient.
    """

    def __init__(self, *args, scale_init: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias * self.scale
        return self._conv_forward(x, self.weight * self.scale, bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", scaled=True"


def is_mimicnorm(model: nn.Module) -> bool:
    """True when `model` (possibly wrapped) ends in a `LastBN`."""
    return any(isinstance(m, LastBN) for m in model.modules())
