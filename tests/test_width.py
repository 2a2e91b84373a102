"""The width multiplier of `create_model`, and the reference inits of the plain (BN) twins."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import models
from models.layers import scaled_channels
from models.mimicnorm import conv_fan_in, record_reference_convs_

FAMILY_ARCHS = ("vgg11", "resnet18", "resnet50", "squeezenet", "shufflenetv2", "mobilenetv2")
CIFAR_ARCHS = ("vgg16", *FAMILY_ARCHS)
SUFFIXES = ("", "_cbn", "_nobn")
CLASSES = 10
# (in, out, groups) of named convs and (in, out) of named Linears of the plain twins at width 1/4.
QUARTER_LAYERS: dict[str, dict[str, tuple[int, ...]]] = {
    "vgg11": {
        "features.0": (3, 16, 1),
        "features.4": (16, 32, 1),
        "features.8": (32, 64, 1),
        "classifier.0": (128, 1024),  # the 4096-wide hidden Linears scale too
        "classifier.3": (1024, 1024),
        "classifier.6": (1024, CLASSES),
    },
    "vgg16": {"features.0": (3, 16, 1), "features.3": (16, 16, 1), "classifier.0": (128, 1024)},
    "resnet18": {
        "stem.0": (3, 16, 1),
        "stages.1.0.shortcut.0": (16, 32, 1),
        "stages.3.1.branch.3": (128, 128, 1),
        "fc": (128, CLASSES),
    },
    "resnet50": {
        "stages.0.0.branch.0": (16, 16, 1),
        "stages.0.0.branch.6": (16, 64, 1),
        "stages.0.0.shortcut.0": (16, 64, 1),
        "fc": (512, CLASSES),
    },
    "squeezenet": {
        "stem.0": (3, 24, 1),
        "fire2.squeeze.0": (24, 4, 1),
        "fire2.expand_3x3.0": (4, 16, 1),
        "fire9.expand_1x1.0": (16, 64, 1),
        "conv10": (128, CLASSES, 1),
    },
    "shufflenetv2": {  # stage2: 116 / 4 = 29, rounded to the even 28 (14 per branch)
        "conv1.0": (3, 6, 1),
        "stage2.0.branch1.0": (6, 6, 6),
        "stage2.0.branch1.2": (6, 14, 1),
        "stage2.1.branch2.3": (14, 14, 14),
        "conv5.0": (116, 256, 1),
        "fc": (256, CLASSES),
    },
    "mobilenetv2": {
        "pre.0": (3, 8, 1),
        "stage2.0.residual.0": (4, 24, 1),
        "stage2.0.residual.3": (24, 24, 24),
        "stage7.residual.6": (240, 80, 1),
        "conv2": (320, CLASSES, 1),
    },
}


def build(name: str, width: float | None = None, dataset: str = "cifar", seed: int = 0):
    torch.manual_seed(seed)
    if width is None:
        return models.create_model(name, CLASSES, dataset)
    return models.create_model(name, CLASSES, dataset, width=width)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv(kernel: int, c_in: int, c_out: int, bias: bool) -> int:
    return kernel * kernel * c_in * c_out + (c_out if bias else 0)


def batchnorm(channels: int) -> int:
    return 2 * channels


def linear(c_in: int, c_out: int) -> int:
    return c_in * c_out + c_out


def selected(model: nn.Module, rule: models.CentringRule) -> list[str]:
    return [name for name, m in model.named_modules() if rule.selects(m)]


def full_width(name: str, dataset: str = "cifar") -> nn.Module:
    with torch.device("meta"):
        return models.create_model(name, CLASSES, dataset)


# --- scaled_channels and the width argument --------------------------------------------------


def test_scaled_channels_rounding() -> None:
    assert scaled_channels(64, 0.25) == 16
    assert scaled_channels(64, 0.3) == 19  # 19.2
    assert scaled_channels(3, 0.1) == 1  # never below one channel
    assert scaled_channels(116, 0.25, multiple=2) == 28  # 29 -> the even 28 (29/2 = 14.5 -> 14)
    assert scaled_channels(48, 0.02, multiple=2) == 2  # never below one multiple
    assert scaled_channels(464, 1.0, multiple=2) == 464


@pytest.mark.parametrize("width", [0.0, -0.5, math.nan, math.inf])
def test_width_must_be_positive(width: float) -> None:
    with pytest.raises(ValueError, match="width"):
        models.create_model("resnet18", CLASSES, width=width)


@pytest.mark.parametrize("arch", CIFAR_ARCHS)
def test_quarter_width_forward_and_channels(arch: str) -> None:
    for suffix in SUFFIXES:
        model = build(arch + suffix, 0.25)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, CLASSES)
    layers = dict(build(arch, 0.25).named_modules())
    for name, expected in QUARTER_LAYERS[arch].items():
        layer = layers[name]
        if isinstance(layer, nn.Linear):
            assert (layer.in_features, layer.out_features) == expected, name
        else:
            assert (layer.in_channels, layer.out_channels, layer.groups) == expected, name


@pytest.mark.parametrize("arch", FAMILY_ARCHS)  # vgg16 is vgg11's class: spare its 34M params
def test_width_one_is_the_reference_network(arch: str) -> None:
    for suffix in SUFFIXES:
        default = build(arch + suffix).state_dict()
        explicit = build(arch + suffix, 1.0).state_dict()
        assert list(default) == list(explicit)
        for key, value in default.items():
            assert torch.equal(value, explicit[key]), key


def test_resnet18_quarter_width_parameter_count() -> None:
    widths = (16, 32, 64, 128)  # 64, 128, 256, 512 divided by 4
    expected = conv(3, 3, widths[0], False) + batchnorm(widths[0])
    c_in = widths[0]
    for c_out in widths:
        for _ in range(2):
            expected += conv(3, c_in, c_out, False) + conv(3, c_out, c_out, False)
            expected += 2 * batchnorm(c_out)
            if c_in != c_out:  # projection shortcut, 1x1 conv and BN
                expected += conv(1, c_in, c_out, False) + batchnorm(c_out)
            c_in = c_out
    expected += linear(widths[-1], CLASSES)
    assert expected == 701_466
    assert count(build("resnet18", 0.25)) == expected


def test_vgg11_quarter_width_parameter_count() -> None:
    convs = [(3, 16), (16, 32), (32, 64), (64, 64), (64, 128), (128, 128), (128, 128), (128, 128)]
    expected = sum(conv(3, c_in, c_out, True) + batchnorm(c_out) for c_in, c_out in convs)
    expected += linear(128, 1024) + linear(1024, 1024) + linear(1024, CLASSES)
    assert expected == 1_770_442
    assert count(build("vgg11", 0.25)) == expected


# --- weight-mean selection does not depend on width ------------------------------------------


@pytest.mark.parametrize("arch", CIFAR_ARCHS)
@pytest.mark.parametrize("width", [0.25, 0.5])
def test_centring_selection_matches_full_width(arch: str, width: float) -> None:
    full = selected(full_width(arch + "_cbn"), models.CIFAR_RULE)
    assert full
    assert selected(build(arch + "_cbn", width), models.CIFAR_RULE) == full


def test_narrow_conv_under_the_threshold_is_still_centred() -> None:
    model = build("resnet18_cbn", 0.25)
    shortcut = dict(model.named_modules())["stages.1.0.shortcut"]  # 1x1, 64 -> 16 inputs
    assert conv_fan_in(shortcut) == 16 <= models.CIFAR_RULE.min_fan_in
    assert shortcut.reference_fan_in == 64
    assert models.CIFAR_RULE.selects(shortcut)
    assert any(w is shortcut.weight for w in models.WeightMean(model).weights)


def test_depthwise_conv_narrowed_to_one_channel_stays_depthwise() -> None:
    name = "shufflenetv2_x0_5_cbn"
    model = build(name, 0.02, dataset="imagenet")
    collapsed = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.reference_groups > 1]
    assert any(m.groups == 1 for m in collapsed)  # a one-channel "depthwise" conv
    full = full_width(name, "imagenet")
    for rule in (models.CIFAR_RULE, models.IMAGENET_RULE):
        assert selected(model, rule) == selected(full, rule)


def test_reference_convs_must_share_names() -> None:
    model = nn.Sequential(nn.Conv2d(8, 8, 1))
    with pytest.raises(RuntimeError, match="names"):
        record_reference_convs_(model, nn.Sequential(nn.Identity(), nn.Conv2d(8, 8, 1)))


# --- the plain twins' reference inits ---------------------------------------------------------


def assert_normal(weight: torch.Tensor, numerator: float, fan: int, name: str = "") -> None:
    expected = math.sqrt(numerator / fan)
    assert weight.std().item() == pytest.approx(expected, rel=0.05), name


def assert_pytorch_default(layer: nn.Module, name: str = "") -> None:
    """kaiming_uniform(a=sqrt(5)): U(-b, b) with b = 1/sqrt(fan_in), std b/sqrt(3); bias too."""
    bound = 1 / math.sqrt(fan_in_numel(layer))
    assert layer.weight.abs().max().item() <= bound, name
    assert layer.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05), name
    if layer.bias is not None:
        assert layer.bias.abs().max().item() <= bound and layer.bias.any(), name


def fan_in_numel(layer: nn.Module) -> int:
    return layer.weight[0].numel()  # k*k*in/groups for convs, in_features for Linears


def assert_biases_zero_bn_identity(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            assert not m.bias.any(), name
        elif isinstance(m, nn.BatchNorm2d):
            assert bool((m.weight == 1).all() and (m.bias == 0).all()), name


def test_cifar_vgg_plain_init_is_he_fan_in() -> None:
    model = build("vgg11")
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert_normal(m.weight, 2.0, fan_in_numel(m), name)
    assert_biases_zero_bn_identity(model)


def test_imagenet_vgg_plain_init_is_fan_out_convs_and_fan_in_linears() -> None:
    model = build("vgg11", 0.25, dataset="imagenet")
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            assert_normal(m.weight, 2.8, kh * kw * m.out_channels, name)
        elif isinstance(m, nn.Linear):
            assert_normal(m.weight, 2.0, m.in_features, name)
    assert_biases_zero_bn_identity(model)


@pytest.mark.parametrize("arch", ["squeezenet", "mobilenetv2"])
def test_light_plain_init_is_he_fan_in_per_group(arch: str) -> None:
    model = build(arch)
    checked = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.weight.numel() >= 4096:
            assert_normal(m.weight, 2.0, fan_in_numel(m), name)
            checked += 1
    assert checked >= 10
    classifier = model.conv10 if arch == "squeezenet" else model.conv2
    assert_normal(classifier.weight, 2.0, classifier.in_channels, "classifier")
    if arch == "mobilenetv2":  # depthwise: fan 9 * in/groups = 9, not clamped as in `_cbn`
        depthwise = [m.weight.flatten() for m in model.modules() if getattr(m, "groups", 1) > 1]
        assert_normal(torch.cat(depthwise), 2.0, 9, "depthwise")
    assert_biases_zero_bn_identity(model)


def test_cifar_resnet_plain_init_is_pytorch_default() -> None:
    model = build("resnet18")
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert_pytorch_default(m, name)
        elif isinstance(m, nn.BatchNorm2d):
            assert bool((m.weight == 1).all() and (m.bias == 0).all()), name


def test_cifar_shufflenet_plain_init() -> None:
    model = build("shufflenetv2")
    layers = dict(model.named_modules())
    defaults = ("conv1.0", "conv5.0", "fc")  # PyTorch's defaults, as the reference code left them
    for name in defaults:
        assert_pytorch_default(layers[name], name)
    for name, m in layers.items():
        if isinstance(m, nn.Conv2d) and name not in defaults:  # kaiming normal, fan_out
            assert not m.bias.any(), name
            if m.weight.numel() >= 4096:
                kh, kw = m.kernel_size
                assert_normal(m.weight, 2.0, kh * kw * m.out_channels, name)


def test_imagenet_shufflenet_plain_init_is_pytorch_default() -> None:
    model = build("shufflenetv2_x0_5", dataset="imagenet")
    layers = dict(model.named_modules())
    for name in ("conv1.0", "stage4.1.branch2.0", "conv5.0", "fc"):
        assert_pytorch_default(layers[name], name)
