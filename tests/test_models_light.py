"""Architecture-specific checks of the light models: SqueezeNet, ShuffleNetV2, MobileNetV2.

Generic per-model checks (forward/backward, variant structure, weight mean): test_models.py.
"""
from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

import models
from benchmarks.memory import saved_tensor_bytes
from models.mimicnorm import (
    CIFAR_RULE,
    IMAGENET_RULE,
    ScaledConv2d,
    centred_conv_weights,
    conv_fan_in,
)
from models.mobilenetv2 import LinearBottleneck
from models.shufflenetv2 import ShuffleUnit

pytestmark = pytest.mark.usefixtures("one_thread")

# (dataset, arch, conv variance numerator, minimum channels per group in the fan)
INIT_CASES = [
    ("cifar", "squeezenet", 2.8, 4),
    ("cifar", "shufflenetv2", 2.0, 4),
    ("cifar", "mobilenetv2", 2.0, 2),
    ("imagenet", "shufflenetv2_x0_5", 2.0, 4),
]
# Plain-twin parameter counts of the reference layouts (pytorch-cifar100 with 100 classes,
# torchvision with 1000); the plain twins also load their state dicts (torchvision: tested below).
PLAIN_PARAMS = {
    ("cifar", "squeezenet"): 781_156,
    ("cifar", "shufflenetv2"): 1_360_896,
    ("cifar", "mobilenetv2"): 2_369_380,
    ("imagenet", "shufflenetv2_x0_5"): 1_366_792,
    ("imagenet", "shufflenetv2_x1_0"): 2_278_604,
}


def build(dataset: str, name: str) -> nn.Module:
    torch.manual_seed(0)
    return models.create_model(name, 100 if dataset == "cifar" else 1000, dataset)


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def scales(model: nn.Module) -> dict[str, float]:
    found = model.named_modules()
    return {name: m.scale.item() for name, m in found if isinstance(m, ScaledConv2d)}


@pytest.mark.parametrize("dataset,arch", list(PLAIN_PARAMS), ids=[a for _, a in PLAIN_PARAMS])
def test_parameter_counts(dataset: str, arch: str) -> None:
    counts = {s or "plain": count(build(dataset, arch + s)) for s in ("", "_cbn", "_nobn")}
    print(f"{dataset} {arch}: {counts}")
    assert counts["plain"] == PLAIN_PARAMS[dataset, arch]
    assert counts["_cbn"] == counts["_nobn"]


@pytest.mark.parametrize("width", ["x0_5", "x1_0"])
def test_imagenet_shufflenet_plain_twin_is_torchvision(width: str) -> None:
    ours = build("imagenet", f"shufflenetv2_{width}").eval()
    reference = getattr(torchvision.models, f"shufflenet_v2_{width}")().eval()
    assert count(ours) == count(reference)
    state = reference.state_dict()
    for key, value in state.items():
        if key.endswith("running_var"):
            value.uniform_(0.5, 1.5)
        elif value.is_floating_point():
            value.normal_(0.0, 0.2)
    ours.load_state_dict(state)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dataset,arch,numerator,min_fan", INIT_CASES, ids=[c[1] for c in INIT_CASES])
def test_mimic_init_std_matches_formula(
    dataset: str, arch: str, numerator: float, min_fan: int
) -> None:
    model = build(dataset, arch + "_cbn")
    checked = 0
    for name, conv in convs(model).items():
        if conv.bias is not None:
            assert torch.count_nonzero(conv.bias) == 0, name
        if conv.weight.numel() < 4096:
            continue
        kh, kw = conv.kernel_size
        fan = kh * kw * max(min_fan, conv.in_channels // conv.groups)
        expected = math.sqrt(numerator / fan)
        assert conv.weight.std().item() == pytest.approx(expected, rel=0.05), name
        checked += 1
    assert checked >= 5
    for linear in (m for m in model.modules() if isinstance(m, nn.Linear)):
        expected = math.sqrt(2 / linear.in_features)
        assert linear.weight.std().item() == pytest.approx(expected, rel=0.05)
        assert torch.count_nonzero(linear.bias) == 0


def test_mimic_init_clamps_small_fans() -> None:
    """Depthwise convs and the RGB stem use the clamped fan k*k*max(min, in/groups)."""
    model = build("cifar", "shufflenetv2_cbn")
    depthwise = torch.cat([c.weight.flatten() for c in convs(model).values() if c.groups > 1])
    assert depthwise.std().item() == pytest.approx(math.sqrt(2 / (9 * 4)), rel=0.05)
    model = build("cifar", "mobilenetv2_cbn")
    depthwise = torch.cat([c.weight.flatten() for c in convs(model).values() if c.groups > 1])
    assert depthwise.std().item() == pytest.approx(math.sqrt(2 / (9 * 2)), rel=0.05)


@pytest.mark.parametrize("suffix", ["_cbn", "_nobn"])
def test_shufflenet_cifar_scalars(suffix: str) -> None:
    model = build("cifar", "shufflenetv2" + suffix)
    found = scales(model)
    units = [m for m in model.modules() if isinstance(m, ShuffleUnit)]
    assert len(units) == 16
    assert found.pop("conv5.0") == pytest.approx(1.2)
    main = {k: v for k, v in found.items() if ".branch2." in k}
    short = {k: v for k, v in found.items() if ".branch1." in k}
    assert list(main.values()) == pytest.approx([1.44] * 16)
    assert list(short.values()) == pytest.approx([1.2] * 3)
    assert len(found) == len(main) + len(short)
    for unit in units:
        # the scalar sits in the branch's last conv, directly before its ReLU
        assert isinstance(unit.branch2[-2], ScaledConv2d) and isinstance(unit.branch2[-1], nn.ReLU)
        assert unit.gain.dim() == 0 and unit.gain.item() == 1.0
        assert unit.bias.dim() == 0 and unit.bias.item() == 0.0


@pytest.mark.parametrize("width", ["x0_5", "x1_0"])
def test_shufflenet_imagenet_scalars(width: str) -> None:
    model = build("imagenet", f"shufflenetv2_{width}_cbn")
    found = scales(model)
    assert found.pop("conv5.0") == pytest.approx(1.2)
    assert sorted(found.values()) == pytest.approx([1.2] * 3 + [1.44] * 16)
    units = [m for m in model.modules() if isinstance(m, ShuffleUnit)]
    assert len(units) == 16 and all(u.gain is None and u.bias is None for u in units)


@pytest.mark.parametrize("dataset,arch", list(PLAIN_PARAMS), ids=[a for _, a in PLAIN_PARAMS])
def test_plain_twins_have_no_mimicnorm_scalars(dataset: str, arch: str) -> None:
    model = build(dataset, arch)
    assert not scales(model)
    assert all(p.dim() > 0 for p in model.parameters())


def test_shufflenet_unit_gain_and_bias() -> None:
    """CIFAR units compute shuffle(shortcut, gain * main + bias); both scalars get gradients."""
    torch.manual_seed(0)
    unit = ShuffleUnit(16, 16, 1, models.MIMIC, cifar=True)
    x = torch.randn(2, 16, 4, 4)
    with torch.no_grad():
        unit.gain.fill_(-1.5)
        unit.bias.fill_(0.25)
    out = unit(x)
    main = unit.branch2(x[:, 8:])
    torch.testing.assert_close(out[:, 0::2], x[:, :8])
    torch.testing.assert_close(out[:, 1::2], -1.5 * main + 0.25)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(unit.gain.grad, (grad[:, 1::2] * main.detach()).sum())
    torch.testing.assert_close(unit.bias.grad, grad[:, 1::2].sum())


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for backward."""
    params = [p.untyped_storage().data_ptr() for p in module.parameters()]
    return saved_tensor_bytes(lambda: module(x).sum().backward(), exclude=params)


@pytest.mark.parametrize("stride", [1, 2])
def test_shufflenet_unit_gain_saves_no_extra_tensor(stride: int) -> None:
    unit = ShuffleUnit(32, 32 if stride == 1 else 64, stride, models.MIMIC, cifar=True)
    x = torch.randn(2, 32, 8, 8)
    with_gain = saved_bytes(unit, x)
    unit.gain = unit.bias = None
    assert with_gain == saved_bytes(unit, x)


def test_shufflenet_biases() -> None:
    for name in ("shufflenetv2", "shufflenetv2_cbn"):
        assert all(c.bias is not None for c in convs(build("cifar", name)).values())
    assert all(c.bias is None for c in convs(build("imagenet", "shufflenetv2_x0_5")).values())
    nobn = build("imagenet", "shufflenetv2_x0_5_nobn")
    assert all(c.bias is not None for c in convs(nobn).values())
    assert all(c.bias is not None for c in convs(build("cifar", "squeezenet_cbn")).values())


@pytest.mark.parametrize("suffix", ["_cbn", "_nobn"])
def test_mobilenet_biases_follow_fan_in(suffix: str) -> None:
    model = build("cifar", "mobilenetv2" + suffix)
    with_bias = {name for name, c in convs(model).items() if c.bias is not None}
    assert with_bias == {name for name, c in convs(model).items() if conv_fan_in(c) > 50}
    assert "pre.0" not in with_bias and "stage1.residual.0" not in with_bias
    assert "stage4.0.residual.0" not in with_bias  # 32 inputs
    assert "stage4.1.residual.0" in with_bias  # 64 inputs
    assert "conv2" in with_bias
    assert all(c.bias is not None for c in convs(build("cifar", "mobilenetv2")).values())


@pytest.mark.parametrize("suffix", ["_cbn", "_nobn"])
def test_mobilenet_residual_scalars(suffix: str) -> None:
    model = build("cifar", "mobilenetv2" + suffix)
    blocks = [m for m in model.modules() if isinstance(m, LinearBottleneck)]
    assert len(blocks) == 17
    identity = [b for b in blocks if b.identity]
    assert len(identity) == 10
    for l, block in enumerate(identity, start=1):
        assert block.residual[-1].scale.item() == pytest.approx(1.44 / l)
    for block in blocks:
        if not block.identity:
            assert block.residual[-1].scale.item() == pytest.approx(1.44)
    assert len(scales(model)) == 17
    assert not any(isinstance(m, nn.ReLU6) for m in model.modules())
    assert any(isinstance(m, nn.ReLU6) for m in build("cifar", "mobilenetv2").modules())


def test_mobilenet_identity_index_is_explicit() -> None:
    with pytest.raises(ValueError):
        LinearBottleneck(16, 16, 1, 6, models.MIMIC)
    with pytest.raises(ValueError):
        LinearBottleneck(16, 24, 2, 6, models.MIMIC, identity_index=1)
    block = LinearBottleneck(16, 16, 1, 6, models.MIMIC, identity_index=4)
    assert block.residual[-1].scale.item() == pytest.approx(0.36)


DEPTHWISE_CASES = [("cifar", "shufflenetv2"), ("cifar", "mobilenetv2"), ("imagenet", "shufflenetv2_x0_5")]


@pytest.mark.parametrize("dataset,arch", DEPTHWISE_CASES, ids=[a for _, a in DEPTHWISE_CASES])
def test_centring_rules_skip_depthwise(dataset: str, arch: str) -> None:
    model = build(dataset, arch + "_cbn")
    all_convs = convs(model)
    for rule in (CIFAR_RULE, IMAGENET_RULE):
        selected = {id(w) for w in centred_conv_weights(model, rule)}
        assert not any(id(c.weight) in selected for c in all_convs.values() if c.groups > 1)
    dense_imagenet = {id(c.weight) for c in all_convs.values() if c.groups == 1}
    assert {id(w) for w in centred_conv_weights(model, IMAGENET_RULE)} == dense_imagenet
    cifar_selected = {id(w) for w in centred_conv_weights(model, CIFAR_RULE)}
    stem = next(iter(all_convs.values()))
    assert stem.in_channels == 3 and id(stem.weight) not in cifar_selected
    assert id(stem.weight) in dense_imagenet


def test_squeezenet_classifier_conv_is_centred_and_feeds_last_bn() -> None:
    model = build("cifar", "squeezenet_cbn")
    assert any(w is model.conv10.weight for w in centred_conv_weights(model, CIFAR_RULE))
    assert model.last_bn is not None and model.last_bn.bn.num_features == 100
    assert not scales(model)
    model.train()
    out = model(torch.randn(4, 3, 32, 32))
    torch.testing.assert_close(out.mean(0), torch.zeros(100), atol=1e-5, rtol=0)
