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

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.hooks import RemovableHandle

# Centring a filter removes about 1/pi of the variance a ReLU network passes on; the reference
# initialisations multiply std (and the residual scalars) by 1/sqrt(1 - 1/pi) ~= 1.2 to compensate.
CENTRING_GAIN = 1.2


@dataclass(frozen=True)
class CentringRule:
    """Which convolutions weight mean centres.

    A conv is selected when its fan-in per group (in_channels / groups * kh * kw) exceeds
    `min_fan_in`; with `dense_only` it must also have groups == 1. A conv of a reduced-width
    network is judged by its full-width twin's fan-in and groups (`record_reference_convs_`).
    """

    min_fan_in: int = 50
    dense_only: bool = False

    def selects(self, module: nn.Module) -> bool:
        """True when `module` is a Conv2d whose filters this rule centres."""
        if not isinstance(module, nn.Conv2d):
            return False
        if self.dense_only and getattr(module, "reference_groups", module.groups) != 1:
            return False
        return getattr(module, "reference_fan_in", conv_fan_in(module)) > self.min_fan_in


# CIFAR reference: fan-in per group > 50 (skips the 27-input RGB stem and depthwise convs).
CIFAR_RULE = CentringRule(min_fan_in=50)
# ImageNet reference: every dense conv, the 7x7 stem included.
IMAGENET_RULE = CentringRule(min_fan_in=0, dense_only=True)
_RULES = {"cifar": CIFAR_RULE, "imagenet": IMAGENET_RULE}


def centring_rule(family: str) -> CentringRule:
    """The reference code's centring rule for `family` ("cifar" or "imagenet")."""
    try:
        return _RULES[family]
    except KeyError:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(_RULES)}") from None


def conv_fan_in(conv: nn.Conv2d) -> int:
    """Inputs seen by one output unit: in_channels / groups * kh * kw."""
    kh, kw = conv.kernel_size
    return conv.in_channels // conv.groups * kh * kw


def record_reference_convs_(model: nn.Module, reference: nn.Module) -> None:
    """Record on each conv of `model` the fan-in per group and groups of its twin in `reference`.

    `reference` is the full-width network (same conv names). With `reference_fan_in` and
    `reference_groups` the centring selection does not depend on width: otherwise a narrowed 1x1
    conv could fall under a rule's threshold, and a depthwise conv narrowed to one channel would
    look dense.
    """
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    twins = [(name, m) for name, m in reference.named_modules() if isinstance(m, nn.Conv2d)]
    if [name for name, _ in convs] != [name for name, _ in twins]:
        raise RuntimeError("model and reference differ in their convolutions' names")
    for (_, conv), (_, twin) in zip(convs, twins):
        conv.reference_fan_in = conv_fan_in(twin)
        conv.reference_groups = twin.groups


def check_num_classes(num_classes: object) -> None:
    """TypeError unless `num_classes` is an int, ValueError unless it is positive."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__} "
                        f"{num_classes!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")


def check_module(model: object, signature: str) -> None:
    """TypeError, naming the caller's `signature`, unless `model` is an nn.Module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{signature}: the model must be an nn.Module, got "
                        f"{type(model).__name__} {model!r:.60}")


def _check_rule(rule: object) -> None:
    """TypeError unless `rule` is a CentringRule (a family name gets the call that makes one)."""
    if isinstance(rule, CentringRule):
        return
    hint = f": use models.centring_rule({rule!r})" if isinstance(rule, str) else ""
    raise TypeError(f"rule must be a CentringRule (models.CIFAR_RULE, models.IMAGENET_RULE), got "
                    f"{type(rule).__name__} {rule!r:.60}{hint}")


def centred_conv_weights(model: nn.Module, rule: CentringRule = CIFAR_RULE) -> list[nn.Parameter]:
    """The weights of every conv in `model` that `rule` selects, each listed once."""
    check_module(model, "centred_conv_weights(model, rule)")
    _check_rule(rule)
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

    def __init__(
        self, model: nn.Module, rule: CentringRule = CIFAR_RULE,
        only: Callable[[nn.Parameter], bool] | None = None,
    ) -> None:
        self.rule = rule
        self.weights = [w for w in centred_conv_weights(model, rule) if only is None or only(w)]

    def __call__(self) -> None:
        centre_filters_(self.weights)

    def __len__(self) -> int:
        return len(self.weights)


def attach_weight_mean(
    optimizer: torch.optim.Optimizer, model: nn.Module, rule: CentringRule = CIFAR_RULE
) -> RemovableHandle:
    """Centre `model`'s selected filters now and after every `optimizer.step()`.

    The projection is an optimizer step post-hook (it runs only when a step ran, e.g. not when a
    GradScaler skips one); the returned handle's `remove()` detaches it. Selected weights that
    `optimizer` does not hold (a frozen backbone) are left as they are, with a warning: the
    projection centres what the optimizer moves.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"attach_weight_mean(optimizer, model, rule): optimizer must be a "
                        f"torch.optim.Optimizer, got {type(optimizer).__name__}")
    check_module(model, "attach_weight_mean(optimizer, model, rule)")
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    project = WeightMean(model, rule, only=lambda weight: id(weight) in owned)
    left = len(centred_conv_weights(model, rule)) - len(project)
    if left:
        warnings.warn(f"attach_weight_mean: {left} conv weight(s) selected by the rule are not "
                      "in the optimizer (frozen?) and are left uncentred", stacklevel=2)
    project()
    return optimizer.register_step_post_hook(lambda _optimizer, _args, _kwargs: project())


def weight_mean_(model: nn.Module, rule: CentringRule = CIFAR_RULE) -> nn.Module:
    """Centre the selected conv filters of `model` once, in place; returns `model`."""
    centre_filters_(centred_conv_weights(model, rule))
    return model


class LastBN(nn.Module):
    """BatchNorm1d(num_classes, affine=False) on the logits, in float32 at least (autocast too).

    Its running statistics follow the network's device and its dtype down to float32: a network
    cast to float16 or bfloat16 keeps them in float32, a `.double()` one has them in float64.
    The logits are normalised, and returned, in the statistics' dtype.
    """

    def __init__(self, num_classes: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        check_num_classes(num_classes)
        super().__init__()
        self.bn = nn.BatchNorm1d(num_classes, eps=eps, momentum=momentum, affine=False)

    def _apply(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        """`nn.Module._apply` (`.to`, `.half()`, ...), with statistics kept in float32 at least."""
        super()._apply(fn, *args, **kwargs)
        for name, stat in self.bn.named_buffers(recurse=False):
            if stat.is_floating_point() and stat.element_size() < 4:
                setattr(self.bn, name, stat.float())
        return self

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return self.bn(logits.to(self.bn.running_mean.dtype))


def residual_scale_init(block_index: int, convs_in_branch: int) -> float:
    """Initial residual scalar of the reference code: 1.2**convs_in_branch / block_index."""
    if block_index < 1:
        raise ValueError(f"block_index counts from 1, got {block_index}")
    return CENTRING_GAIN**convs_in_branch / block_index


class _ScaledConv2dFunction(torch.autograd.Function):
    """`conv2d(x, scale * weight, scale * bias)` that saves only x and the parameters for backward.

    Autograd of the plain expression would save the non-parameter product `scale * weight`;
    here backward recomputes it (parameter-sized, cheap) and calls the conv backward once.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, stride, padding, dilation, groups):  # type: ignore
        ctx.save_for_backward(x, weight, bias, scale)
        ctx.conv_args = (stride, padding, dilation, groups)
        scaled_weight, scaled_bias = _scale_conv_params(weight, bias, scale, x.dtype)
        return F.conv2d(x, scaled_weight, scaled_bias, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        x, weight, bias, scale = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        need_x, need_weight, need_bias, need_scale = ctx.needs_input_grad[:4]
        has_bias = bias is not None
        scaled_weight, _ = _scale_conv_params(weight, None, scale, x.dtype)
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out, x, scaled_weight, [bias.shape[0]] if has_bias else None,
            stride, padding, dilation, False, [0, 0], groups,
            [need_x, need_weight or need_scale, has_bias and (need_bias or need_scale)],
        )
        # d(loss)/d(scale) = <dL/dW', W> + <dL/db', b>; the scaled gradients are then rescaled in place.
        grad_weight = grad_bias = grad_scale = None
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
            if need_scale:
                grad_scale = torch.dot(grad_w.reshape(-1), weight.reshape(-1))
            grad_weight = grad_w.mul_(scale) if need_weight else None
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
            if need_scale:
                grad_scale = grad_scale + torch.dot(grad_b, bias)
            grad_bias = grad_b.mul_(scale) if need_bias else None
        return grad_x, grad_weight, grad_bias, grad_scale, None, None, None, None


def _scale_conv_params(
    weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`scale * weight` and `scale * bias` computed in the parameters' dtype, then cast to `dtype`."""
    scaled_bias = None if bias is None else (bias * scale).to(dtype)
    return (weight * scale).to(dtype), scaled_bias


class ScaledConv2d(nn.Conv2d):
    """Conv2d followed by a learnable scalar, folded into the conv: `scale * conv(x)`.

    The scalar multiplies the (parameter-sized) weight and bias instead of the output, and a custom
    backward recomputes the scaled weight, so autograd saves exactly what a plain conv saves: its
    input. Under autocast the input is cast like a native conv's and the cast input is saved.
    """

    def __init__(self, *args, scale_init: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros" or isinstance(padding, str):
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x, padding = F.pad(x, self._reversed_padding_repeated_twice, mode=mode), (0, 0)
        if x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return _ScaledConv2dFunction.apply(
            x, self.weight, self.bias, self.scale, self.stride, padding, self.dilation, self.groups
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + ", scaled=True"


def is_mimicnorm(model: nn.Module) -> bool:
    """True when `model` (possibly wrapped) ends in a `LastBN`."""
    return any(isinstance(m, LastBN) for m in model.modules())
