"""Every registered model in its three variants, and the ResNet/VGG details of the reference code.

Generic tests parametrise over `models.list_models(dataset)`, so architectures registered later are
covered without editing this file. Each model is built once (module-scoped fixture) and shared by
the generic tests that need it.
"""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from models.mimicnorm import LastBN, ScaledConv2d, conv_fan_in
from models.resnet import Bottleneck, ResidualBlock

NUM_CLASSES = {"cifar": 10, "imagenet": 1000}
RESOLUTION = {"cifar": 32, "imagenet": 64}
FULL_RESOLUTION = 224
RULES = {"cifar": models.CIFAR_RULE, "imagenet": models.IMAGENET_RULE}
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

CASES = [(dataset, name) for dataset in models.FAMILIES for name in models.list_models(dataset)]
ARCHS = [(dataset, name) for dataset, name in CASES if models.parse_name(name)[1] is models.BN]


def natural_key(name: str) -> list:
    """"resnet18" < "resnet101": digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def family(arch: str) -> str:
    """"resnet50" -> "resnet", "shufflenetv2_x0_5" -> "shufflenetv"."""
    return re.sub(r"\d+$", "", arch.split("_")[0])


def full_resolution_cases() -> set[tuple[str, str]]:
    """The `_cbn` twin of the smallest ImageNet architecture of each family runs at 224x224."""
    first: dict[str, str] = {}
    for dataset, arch in sorted(ARCHS, key=lambda case: natural_key(case[1])):
        if dataset == "imagenet":
            first.setdefault(family(arch), arch)
    return {("imagenet", arch + "_cbn") for arch in first.values()}


FULL_RESOLUTION_CASES = full_resolution_cases()


def build(dataset: str, name: str, num_classes: int | None = None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return models.create_model(name, num_classes or NUM_CLASSES[dataset], dataset)


def norm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, NORM_TYPES)]


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def filter_means(weight: torch.Tensor) -> torch.Tensor:
    return weight.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module", params=CASES, ids=[f"{d}-{n}" for d, n in CASES])
def case(request: pytest.FixtureRequest) -> tuple[str, str, nn.Module]:
    dataset, name = request.param
    return dataset, name, build(dataset, name)


# --- every registered model -------------------------------------------------------------------


def test_forward_backward(case: tuple[str, str, nn.Module]) -> None:
    dataset, name, model = case
    num_classes = NUM_CLASSES[dataset]
    size = FULL_RESOLUTION if (dataset, name) in FULL_RESOLUTION_CASES else RESOLUTION[dataset]
    model.train()
    model.zero_grad(set_to_none=True)
    seen = {}
    hook = None
    if models.is_mimicnorm(model):
        hook = model.last_bn.register_forward_hook(
            lambda module, args, output: seen.update(input=args[0], output=output)
        )
    torch.manual_seed(1)
    logits = model(torch.randn(2, 3, size, size))
    if hook is not None:
        hook.remove()
        assert seen["input"].shape == (2, num_classes)  # the last BN sees the classifier's logits
        assert seen["output"] is logits  # ... and nothing comes after it
    assert logits.shape == (2, num_classes)
    assert logits.dtype == torch.float32
    F.cross_entropy(logits, torch.tensor([0, num_classes - 1])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} unused"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"


def test_variant_structure(case: tuple[str, str, nn.Module]) -> None:
    dataset, name, model = case
    variant = models.parse_name(name)[1]
    found = norm_layers(model)
    if variant is models.MIMIC:
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        assert isinstance(model.last_bn, LastBN)
        assert found == [model.last_bn.bn]
        bn = model.last_bn.bn
        assert type(bn) is nn.BatchNorm1d and not bn.affine
        assert bn.num_features == NUM_CLASSES[dataset]
        assert (bn.momentum, bn.eps, bn.track_running_stats) == (0.1, 1e-5, True)
        assert models.is_mimicnorm(model)
    else:
        assert type(model.last_bn) is nn.Identity
        assert not models.is_mimicnorm(model)
        if variant is models.NO_NORM:
            assert found == []
        else:
            assert any(isinstance(m, nn.BatchNorm2d) for m in found)


def test_weight_mean_centres_selected_and_skips_the_rest(case: tuple[str, str, nn.Module]) -> None:
    dataset, name, model = case
    rule = RULES[dataset]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    excluded = {id(m): m.weight.detach().clone() for m in convs if not rule.selects(m)}
    models.weight_mean_(model, rule)
    selected = [m for m in convs if rule.selects(m)]
    assert selected
    for m in selected:
        assert filter_means(m.weight).abs().max() < 1e-6
    for m in convs:
        if id(m) in excluded:
            assert torch.equal(m.weight, excluded[id(m)])
    for m in convs:
        if m.in_channels == 3:  # the RGB stem: centred by the ImageNet rule only
            assert rule.selects(m) == (dataset == "imagenet")


@pytest.mark.parametrize("dataset,arch", ARCHS, ids=[f"{d}-{a}" for d, a in ARCHS])
def test_nobn_is_cbn_without_last_bn(dataset: str, arch: str) -> None:
    cbn, nobn = build(dataset, arch + "_cbn"), build(dataset, arch + "_nobn")
    cbn_keys = [k for k in cbn.state_dict() if not k.startswith("last_bn.")]
    assert cbn_keys == list(nobn.state_dict())
    for (n1, p1), (n2, p2) in zip(cbn.named_parameters(), nobn.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1


# --- the weight-mean invariant under training ------------------------------------------------


@pytest.mark.parametrize("dataset", models.FAMILIES)
def test_weight_mean_holds_through_sgd(dataset: str) -> None:
    model = build(dataset, "resnet18_cbn")
    rule = RULES[dataset]
    project = models.WeightMean(model, rule)
    stem = model.stem[0]
    assert len(project) == sum(rule.selects(m) for m in model.modules())
    project()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(4, 3, 16, 16, generator=generator)
        y = torch.randint(0, NUM_CLASSES[dataset], (4,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        project()
        for w in project.weights:
            assert filter_means(w).abs().max() < 1e-6
    assert torch.isfinite(model(x)).all()
    stem_mean = filter_means(stem.weight).abs().max()
    assert (stem_mean < 1e-6) == (dataset == "imagenet")


# --- CentringRule ----------------------------------------------------------------------------


def test_centring_rule_threshold_is_a_parameter() -> None:
    rgb = nn.Conv2d(3, 8, 3)  # fan-in 27
    assert not models.CentringRule(min_fan_in=27).selects(rgb)
    assert models.CentringRule(min_fan_in=26).selects(rgb)
    assert not models.CIFAR_RULE.selects(nn.Conv2d(50, 8, 1))
    assert models.CIFAR_RULE.selects(nn.Conv2d(51, 8, 1))
    assert models.CentringRule(min_fan_in=100).selects(nn.Conv2d(101, 8, 1))
    assert not models.CentringRule(min_fan_in=100).selects(nn.Conv2d(100, 8, 1))


def test_centring_rule_groups() -> None:
    depthwise = nn.Conv2d(64, 64, 3, groups=64)  # fan-in 9
    grouped = nn.Conv2d(128, 128, 3, groups=2)  # fan-in per group 576
    assert conv_fan_in(grouped) == 576
    assert not models.CIFAR_RULE.selects(depthwise)
    assert not models.IMAGENET_RULE.selects(depthwise)
    assert models.CIFAR_RULE.selects(grouped)
    assert not models.IMAGENET_RULE.selects(grouped)
    assert models.CentringRule(min_fan_in=0, dense_only=False).selects(depthwise)


def test_centring_rule_rgb_stem_and_non_convs() -> None:
    cifar_stem, imagenet_stem = nn.Conv2d(3, 64, 3), nn.Conv2d(3, 64, 7, 2, 3)
    assert not models.CIFAR_RULE.selects(cifar_stem)
    assert models.IMAGENET_RULE.selects(cifar_stem)
    assert models.CIFAR_RULE.selects(imagenet_stem) and models.IMAGENET_RULE.selects(imagenet_stem)
    for rule in RULES.values():
        assert not rule.selects(nn.Linear(512, 10))
        assert not rule.selects(nn.BatchNorm2d(8))
    assert models.centring_rule("cifar") is models.CIFAR_RULE
    assert models.centring_rule("imagenet") is models.IMAGENET_RULE
    with pytest.raises(ValueError):
        models.centring_rule("mnist")


def test_centred_weights_listed_once_when_shared() -> None:
    conv = nn.Conv2d(16, 16, 3)
    model = nn.Sequential(conv, nn.ReLU(), conv, nn.Conv2d(16, 4, 1))
    assert models.centred_conv_weights(model, models.CIFAR_RULE) == [conv.weight]


# --- ResNet details --------------------------------------------------------------------------


def blocks(model: nn.Module) -> list[ResidualBlock]:
    return [m for m in model.modules() if isinstance(m, ResidualBlock)]


@pytest.mark.parametrize("dataset", models.FAMILIES)
@pytest.mark.parametrize("arch,n_blocks,k", [("resnet18", 8, 2), ("resnet50", 16, 3)])
@pytest.mark.parametrize("suffix", ["_cbn", "_nobn"])
def test_residual_scale_init(dataset: str, arch: str, n_blocks: int, k: int, suffix: str) -> None:
    model = build(dataset, arch + suffix)
    found = blocks(model)
    assert len(found) == n_blocks
    for index, block in enumerate(found, start=1):
        last = block.branch[-1]
        assert isinstance(last, ScaledConv2d) and last.bias is not None
        assert last.scale.item() == pytest.approx(1.2**k / index, rel=1e-6)
        shortcut = block.shortcut
        if isinstance(shortcut, nn.Identity):
            continue
        if dataset == "imagenet":  # biased 1x1 conv, then a scalar initialised to 1.2
            assert isinstance(shortcut, ScaledConv2d) and shortcut.bias is not None
            assert shortcut.scale.item() == pytest.approx(1.2)
        else:  # plain 1x1 conv, biased for BasicBlock only
            assert type(shortcut) is nn.Conv2d
            assert (shortcut.bias is None) == isinstance(block, Bottleneck)
    if arch == "resnet18":
        expected = [1.44, 0.72, 0.48, 0.36, 0.288, 0.24, 1.44 / 7, 0.18]
        assert [b.branch[-1].scale.item() for b in found] == pytest.approx(expected)


@pytest.mark.parametrize("dataset", models.FAMILIES)
def test_plain_resnet_has_no_scalars_or_conv_biases(dataset: str) -> None:
    model = build(dataset, "resnet18")
    assert not any(isinstance(m, ScaledConv2d) for m in model.modules())
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def std_ratio(weight: torch.Tensor, numerator: float, fan: int) -> float:
    return weight.std().item() / math.sqrt(numerator / fan)


@pytest.mark.parametrize("dataset", models.FAMILIES)
def test_resnet_init(dataset: str) -> None:
    model = build(dataset, "resnet18_cbn")
    for m in model.modules():
        if isinstance(m, nn.Conv2d):  # stem, branch and shortcut convs alike
            assert std_ratio(m.weight, 2.0, conv_fan_in(m)) == pytest.approx(1.0, abs=0.05)
            assert m.bias is not None and not m.bias.any()
    assert std_ratio(model.fc.weight, 2.0, model.fc.in_features) == pytest.approx(1.0, abs=0.05)
    assert not model.fc.bias.any()


def test_imagenet_plain_resnet_init() -> None:
    """The CIFAR plain twin keeps PyTorch's defaults instead: tests/test_width.py."""
    plain = build("imagenet", "resnet18")
    for m in plain.modules():
        if isinstance(m, nn.Conv2d):  # torchvision: kaiming normal, fan_out
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            assert std_ratio(m.weight, 2.0, fan_out) == pytest.approx(1.0, abs=0.05)
        elif isinstance(m, nn.BatchNorm2d):
            assert bool((m.weight == 1).all() and (m.bias == 0).all())


def test_scaled_block_matches_separate_multiply() -> None:
    """A `_cbn` block with folded scalars equals conv-then-multiply, in output and gradients."""
    model = build("imagenet", "resnet18_cbn").double()
    block = blocks(model)[2]  # first block of stage 2: strided, projection shortcut with a scalar
    conv1, conv2 = block.branch[0], block.branch[-1]
    shortcut = block.shortcut
    assert isinstance(conv2, ScaledConv2d) and isinstance(shortcut, ScaledConv2d)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x = torch.randn(2, 64, 8, 8, dtype=torch.float64)

    def reference(x: torch.Tensor) -> torch.Tensor:
        h = F.relu(F.conv2d(x, conv1.weight, conv1.bias, conv1.stride, conv1.padding))
        branch = F.conv2d(h, conv2.weight, conv2.bias, conv2.stride, conv2.padding) * conv2.scale
        skip = F.conv2d(x, shortcut.weight, shortcut.bias, shortcut.stride) * shortcut.scale
        return F.relu(branch + skip)

    probe = torch.randn(2, 128, 4, 4, dtype=torch.float64)
    results = []
    for forward in (block, reference):
        block.zero_grad(set_to_none=True)
        out = forward(x)
        (out * probe).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in block.parameters()]))
    (out, grads), (ref_out, ref_grads) = results
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    names = [n for n, _ in block.named_parameters()]
    assert {"branch.2.scale", "shortcut.scale", "branch.2.bias", "shortcut.weight"} <= set(names)
    for pname, g, ref in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-9, atol=1e-10, msg=pname)


# --- VGG details -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dataset,arch,fan_mode", [("cifar", "vgg16", "in"), ("imagenet", "vgg11", "out")]
)
def test_vgg_init(dataset: str, arch: str, fan_mode: str) -> None:
    model = build(dataset, arch + "_cbn", num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3 and all(m.bias is not None for m in convs)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.5, 0.5]
    for m in convs:
        channels = m.in_channels if fan_mode == "in" else m.out_channels
        fan = channels * m.kernel_size[0] * m.kernel_size[1]
        assert std_ratio(m.weight, 2.8, fan) == pytest.approx(1.0, abs=0.05)
        assert not m.bias.any()
    for m in linears:
        assert std_ratio(m.weight, 2.0, m.in_features) == pytest.approx(1.0, abs=0.05)
        assert not m.bias.any()


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


def test_vgg_classifier_layout() -> None:
    cifar = build("cifar", "vgg16", num_classes=100)
    imagenet = build("imagenet", "vgg11", num_classes=1000)
    assert linear_shapes(cifar) == [(512, 4096), (4096, 4096), (4096, 100)]
    assert linear_shapes(imagenet) == [(512 * 7 * 7, 4096), (4096, 4096), (4096, 1000)]
    assert isinstance(imagenet.pool, nn.AdaptiveAvgPool2d) and imagenet.pool.output_size == 7
    assert sum(isinstance(m, nn.MaxPool2d) for m in cifar.features) == 5
    assert sum(isinstance(m, nn.Conv2d) for m in cifar.features) == 13
    assert sum(isinstance(m, nn.Conv2d) for m in imagenet.features) == 8


# --- parameter counts of the plain twins -------------------------------------------------------


@pytest.mark.parametrize(
    "dataset,name,num_classes,millions",
    [
        ("cifar", "resnet18", 100, 11.22),
        ("cifar", "resnet50", 100, 23.71),
        ("cifar", "vgg16", 100, 34.02),
        ("imagenet", "resnet18", 1000, 11.69),
        ("imagenet", "resnet50", 1000, 25.56),
    ],
)
def test_plain_parameter_counts(dataset: str, name: str, num_classes: int, millions: float) -> None:
    assert count(build(dataset, name, num_classes)) / 1e6 == pytest.approx(millions, rel=0.01)


# --- LastBN ----------------------------------------------------------------------------------


def test_last_bn_fp32_under_bf16_autocast() -> None:
    bn = LastBN(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bn(torch.randn(4, 5, dtype=torch.bfloat16))
    assert out.dtype == torch.float32
    x = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert build("cifar", "resnet18")(x).dtype == torch.bfloat16  # autocast is on
        mimic = build("cifar", "resnet18_cbn")
        logits = mimic(x)
    assert logits.dtype == torch.float32
    logits.sum().backward()
    assert all(p.grad is not None for p in mimic.parameters())


def test_last_bn_running_statistics_in_eval() -> None:
    bn = LastBN(4)
    x = torch.randn(8, 4) * 3 + 1
    train_out = bn(x)
    torch.testing.assert_close(train_out.mean(0), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(bn.bn.running_mean, 0.1 * x.mean(0))
    torch.testing.assert_close(bn.bn.running_var, 0.9 + 0.1 * x.var(0, unbiased=True))
    bn.eval()
    y = torch.randn(3, 4)
    expected = (y - bn.bn.running_mean) / torch.sqrt(bn.bn.running_var + 1e-5)
    torch.testing.assert_close(bn(y), expected)


def test_channels_last_matches_contiguous() -> None:
    model = build("cifar", "resnet18_cbn").eval()
    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        out = channels_last(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
