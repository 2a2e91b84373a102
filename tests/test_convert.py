"""`models.convert` (a BatchNorm network -> its MimicNorm twin) and `models.attach_weight_mean`.

The reference for convert is our registry: a converted torchvision ResNet must be our `_cbn`
ResNet, parameter for parameter and logit for logit.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.mobilenetv2 import InvertedResidual

import models
from models.layers import HE_NUMERATOR, fan_in_init_
from models.mimicnorm import CIFAR_RULE, IMAGENET_RULE, WeightMean, centred_conv_weights
from tests.helpers import calibrated

pytestmark = pytest.mark.usefixtures("one_thread")


def shapes(model: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in model.parameters()]


def scales(model: nn.Module) -> list[float]:
    return [m.scale.item() for m in model.modules() if isinstance(m, models.ScaledConv2d)]


def copy_parameters_(source: nn.Module, target: nn.Module) -> None:
    """Copy `source`'s parameters into `target`'s, in order (the shapes must agree)."""
    assert shapes(source) == shapes(target)
    with torch.no_grad():
        for p, q in zip(source.parameters(), target.parameters()):
            q.copy_(p)


def assert_same_logits(ours: nn.Module, converted: nn.Module, x: torch.Tensor) -> None:
    """Bit-identical float64 outputs, train mode (batch statistics) then eval (running ones)."""
    ours, converted = ours.double(), converted.double()
    x = x.double()
    assert torch.equal(converted.train()(x), ours.train()(x))
    assert torch.equal(converted.eval()(x), ours.eval()(x))


def cifar_torchvision_resnet18(num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 with the usual CIFAR stem: 3x3 stride-1 conv, no max-pool."""
    net = torchvision.models.resnet18(num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    return net


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_resnet_converts_to_our_imagenet_cbn(arch: str) -> None:
    torch.manual_seed(0)
    converted = models.convert(getattr(torchvision.models, arch)(num_classes=1000), 1000)
    ours = models.create_model(f"{arch}_cbn", 1000, "imagenet")
    assert shapes(converted) == shapes(ours)
    assert scales(converted) == scales(ours)  # 1.2**k / l per block, 1.2 per projection
    copy_parameters_(ours, converted)
    assert_same_logits(ours, converted, torch.randn(3, 3, 32, 32))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_our_bn_resnet_converts_to_our_cbn(arch: str) -> None:
    for dataset in ("cifar", "imagenet"):
        with torch.device("meta"):  # full-width shapes cost nothing on the meta device
            full = models.convert(models.create_model(arch, 100, dataset), 100, family=dataset)
            assert shapes(full) == shapes(models.create_model(f"{arch}_cbn", 100, dataset))
    torch.manual_seed(0)
    bn_twin = models.create_model(arch, 10, "cifar", width=0.25)
    converted = models.convert(bn_twin, 10, family="cifar")
    ours = models.create_model(f"{arch}_cbn", 10, "cifar", width=0.25)
    assert scales(converted) == scales(ours)
    copy_parameters_(ours, converted)
    assert_same_logits(ours, converted, torch.randn(3, 3, 32, 32))


def test_cifar_style_torchvision_resnet_converts_to_our_cifar_cbn() -> None:
    torch.manual_seed(0)
    converted = models.convert(cifar_torchvision_resnet18(100), 100, family="cifar")
    ours = models.create_model("resnet18_cbn", 100, "cifar")
    assert scales(converted) == scales(ours)
    copy_parameters_(ours, converted)
    assert_same_logits(ours, converted, torch.randn(2, 3, 16, 16))


def test_convert_init_is_the_cbn_resnet_init() -> None:
    # convert draws no random numbers before its init, which is the _cbn ResNets' fan_in_init_.
    torch.manual_seed(0)
    ours = models.create_model("resnet18_cbn", 1000, "imagenet")
    torch.manual_seed(1)
    fan_in_init_(ours, HE_NUMERATOR)
    model = torchvision.models.resnet18()
    torch.manual_seed(1)
    converted = models.convert(model, 1000)
    for p, q in zip(ours.parameters(), converted.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("arch,dataset", [("resnet18", "cifar"), ("resnet50", "imagenet")])
def test_kept_weights_compute_the_bn_network_in_eval_mode(arch: str, dataset: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    bn_twin = calibrated(models.create_model(arch, 10, dataset, width=0.25).double(), x)
    before = copy.deepcopy(bn_twin.state_dict())
    converted = models.convert(bn_twin, 10, family=dataset, init=False)
    assert all(torch.equal(before[k], v) for k, v in bn_twin.state_dict().items())  # untouched
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    torch.testing.assert_close(converted.body(x), bn_twin(x), rtol=1e-10, atol=1e-10)


def test_cifar_bottleneck_projection_has_no_bias() -> None:
    converted = models.convert(torchvision.models.resnet50(num_classes=10), 10, family="cifar")
    projection = converted.body.layer1[0].downsample[0]
    assert type(projection) is nn.Conv2d and projection.bias is None
    basic = models.convert(torchvision.models.resnet18(num_classes=10), 10, family="cifar")
    assert type(basic.body.layer2[0].downsample[0]) is nn.Conv2d
    assert basic.body.layer2[0].downsample[0].bias is not None


def convert_recording_warnings(model: nn.Module) -> tuple[nn.Module, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = models.convert(model, 10)
    return converted, [str(w.message) for w in caught]


def listed_modules(messages: list[str]) -> list[str]:
    """The module names a convert warning lists: `name (Class), ...` after the colon."""
    assert len(messages) == 1, messages
    return [item.split(" (")[0] for item in messages[0].rsplit(": ", 1)[1].split(", ")]


def check_converted_trains(converted: nn.Module, size: int) -> None:
    """No BatchNorm2d, every conv biased, a LastBN that normalises the logits; gradients flow."""
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    assert isinstance(converted.last_bn, models.LastBN)
    assert all(m.bias is not None for m in converted.modules() if isinstance(m, nn.Conv2d))
    out = converted.train()(torch.randn(4, 3, size, size))
    torch.testing.assert_close(out.mean(0), torch.zeros(10), rtol=0, atol=1e-5)
    torch.testing.assert_close(out.var(0, unbiased=False), torch.ones(10), rtol=0, atol=1e-3)
    out.square().sum().backward()
    grads = [p.grad for p in converted.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_torchvision_mobilenet_v2_warns_about_its_inverted_residuals() -> None:
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10)
    residual = [n for n, m in model.named_modules()
                if isinstance(m, InvertedResidual) and m.use_res_connect]
    converted, messages = convert_recording_warnings(model)
    assert len(residual) == 10 and listed_modules(messages) == residual
    assert "InvertedResidual" in messages[0]
    assert not any(isinstance(m, models.ScaledConv2d) for m in converted.modules())
    check_converted_trains(converted, 32)


def test_torchvision_shufflenet_converts_without_scalars() -> None:
    # Its units concatenate (split, branch, concat, shuffle) and add nothing: no warning, and no
    # scalar (our shufflenetv2_x1_0_cbn's 1.2 / 1.2**2 gains are not produced by convert).
    torch.manual_seed(0)
    model = torchvision.models.shufflenet_v2_x1_0(num_classes=10)
    converted, messages = convert_recording_warnings(model)
    assert messages == []
    assert not any(isinstance(m, models.ScaledConv2d) for m in converted.modules())
    check_converted_trains(converted, 32)


def test_torchvision_vgg16_bn_converts() -> None:
    torch.manual_seed(0)
    model = torchvision.models.vgg16_bn(num_classes=10)
    converted, messages = convert_recording_warnings(model)
    assert messages == []
    assert sum(isinstance(m, nn.Conv2d) for m in converted.modules()) == 13
    check_converted_trains(converted, 32)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return x if x.sum() > 0 else -x  # data-dependent control flow


class SwishBatchNorm2d(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.silu(super().forward(x))


def conv_then(*layers: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), *layers)


BAD_INPUTS = {
    "no-batchnorm": (conv_then(nn.ReLU()), r"Sequential has no BatchNorm2d: nothing to convert"),
    "torchvision-squeezenet": (torchvision.models.squeezenet1_0(), "SqueezeNet has no BatchNorm2d"),
    "batchnorm1d": (
        conv_then(nn.BatchNorm2d(4), nn.Flatten(2), nn.BatchNorm1d(4)), r"'3' is a BatchNorm1d"
    ),
    "batchnorm3d": (conv_then(nn.BatchNorm3d(4)), r"'1' is a BatchNorm3d"),
    "groupnorm": (conv_then(nn.BatchNorm2d(4), nn.GroupNorm(2, 4)), r"'2' is a GroupNorm"),
    "layernorm": (conv_then(nn.LayerNorm([4, 1, 1])), r"'1' is a LayerNorm"),
    "bn-subclass": (conv_then(SwishBatchNorm2d(4)), r"'1' is a SwishBatchNorm2d, a BatchNorm2d"),
    "bn-first": (
        nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3)),
        r"BatchNorm2d '0' is not fed by a Conv2d of its own \(its input: the network input\)",
    ),
    "conv-feeds-two": (
        nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.BatchNorm2d(3)),
        r"BatchNorm2d '2' is not fed by a Conv2d of its own \(its input: '1' \(BatchNorm2d\)\)",
    ),
    "untraceable": (Untraceable(), r"Untraceable cannot be traced by torch.fx"),
    "mimicnorm-already": (
        models.create_model("resnet18_cbn", 10, "cifar", width=0.25),
        r"ResNet already has a LastBN: it is a MimicNorm network",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_named(case: str) -> None:
    model, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        models.convert(model, 10)


def test_unknown_dataset() -> None:
    with pytest.raises(ValueError, match="unknown model family 'mnist'"):
        models.convert(conv_then(nn.BatchNorm2d(4)), 10, family="mnist")


def filter_means(weights: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([w.detach().flatten(1).mean(1).abs() for w in weights])


def sgd_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, after=None) -> None:
    """`steps` SGD steps on fixed random batches; `after()` runs after each step when given."""
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if after is not None:
            after()


def small_cbn() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = models.create_model("resnet18_cbn", 10, "cifar", width=0.25)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def test_attached_weight_mean_centres_selected_filters_after_each_step() -> None:
    model, optimizer = small_cbn()
    selected = centred_conv_weights(model, CIFAR_RULE)
    skipped = [m.weight for m in model.modules()
               if isinstance(m, nn.Conv2d) and not CIFAR_RULE.selects(m)]
    assert len(selected) == 19 and len(skipped) == 1  # the 27-input RGB stem is left alone
    assert filter_means(selected).max() > 1e-3
    handle = models.attach_weight_mean(optimizer, model, CIFAR_RULE)
    assert filter_means(selected).max() < 1e-7  # centred at attach time
    sgd_steps(model, optimizer, 2)
    assert filter_means(selected).max() < 1e-7
    assert filter_means(skipped).max() > 1e-3
    handle.remove()
    sgd_steps(model, optimizer, 1)
    assert filter_means(selected).max() > 1e-6  # detached: the step moved the means


def test_hook_equals_explicit_projection_bit_for_bit() -> None:
    hooked, hooked_optimizer = small_cbn()
    models.attach_weight_mean(hooked_optimizer, hooked, IMAGENET_RULE)
    sgd_steps(hooked, hooked_optimizer, 3)
    explicit, optimizer = small_cbn()
    project = WeightMean(explicit, IMAGENET_RULE)
    project()
    sgd_steps(explicit, optimizer, 3, after=project)
    for p, q in zip(hooked.parameters(), explicit.parameters()):
        assert torch.equal(p, q)


def test_example_script_converts_trains_and_folds() -> None:
    from scripts.convert_torchvision import main

    result = main(["--steps", "3", "--batch-size", "4", "--image-size", "32"])
    assert result["batchnorm_left"] == 0 and result["scaled_convs"] == 8 + 3
    assert result["max_filter_mean"] < 1e-6
    assert all(math.isfinite(loss) for loss in result["losses"]) and len(result["losses"]) == 3
    assert result["max_abs_diff"] <= 1e-6 * max(1.0, result["max_abs_output"])
