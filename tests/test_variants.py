"""The variant object and the registry's name parsing; state-dict keys that checkpoints rely on."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import models

pytestmark = pytest.mark.usefixtures("one_thread")

# Key count and a hash of the keys of every registry model, recorded before the variant object
# replaced the variant strings: checkpoints and reference weights load by these names.
STATE_DICT_KEYS = json.loads((Path(__file__).with_name("state_dict_keys.json")).read_text())
CASES = [(d, name) for d in models.FAMILIES for name in models.list_models(d)]


def keys_digest(model: nn.Module) -> list:
    keys = list(model.state_dict())
    return [len(keys), hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]]


@pytest.mark.parametrize("dataset,name", CASES, ids=[f"{d}-{n}" for d, n in CASES])
def test_state_dict_keys_are_unchanged(dataset: str, name: str) -> None:
    with torch.device("meta"):
        model = models.create_model(name, 10 if dataset == "cifar" else 1000, dataset)
    assert keys_digest(model) == STATE_DICT_KEYS[f"{dataset}/{name}"]


def test_every_registry_model_has_recorded_keys() -> None:
    assert sorted(STATE_DICT_KEYS) == sorted(f"{d}/{n}" for d, n in CASES)


@pytest.mark.parametrize(
    "name,arch,variant",
    [
        ("resnet18", "resnet18", models.BN),
        ("resnet18_cbn", "resnet18", models.MIMIC),
        ("shufflenetv2_x0_5_nobn", "shufflenetv2_x0_5", models.NO_NORM),
    ],
)
def test_parse_name(name: str, arch: str, variant: models.Variant) -> None:
    assert models.parse_name(name) == (arch, variant)
    assert models.twin_name(arch, variant.name) == name
    assert models.is_mimicnorm_name(name) == (variant is models.MIMIC)


def test_twin_name_swaps_the_suffix() -> None:
    assert models.twin_name("vgg16", "mimic") == "vgg16_cbn"
    assert models.twin_name("vgg16_nobn", models.BN) == "vgg16"
    assert models.twin_name("vgg16_cbn", "none") == "vgg16_nobn"


def test_list_models_is_every_arch_in_every_variant() -> None:
    for dataset in models.FAMILIES:
        archs = models.list_archs(dataset)
        assert all(models.parse_name(a) == (a, models.BN) for a in archs)
        expected = {models.twin_name(a, v) for a in archs for v in models.VARIANTS}
        assert set(models.list_models(dataset)) == expected


def test_get_variant() -> None:
    assert models.get_variant("mimic") is models.MIMIC
    assert models.get_variant(models.NO_NORM) is models.NO_NORM
    with pytest.raises(ValueError, match="unknown variant 'cbn'; expected one of bn, mimic, none"):
        models.get_variant("cbn")


def test_variant_layers() -> None:
    assert [type(m) for m in models.BN.norm2d(4)] == [nn.BatchNorm2d]
    assert models.MIMIC.norm2d(4) == [] and models.NO_NORM.norm2d(4) == []
    assert isinstance(models.MIMIC.last_bn(3), models.LastBN)
    assert type(models.BN.last_bn(3)) is nn.Identity is type(models.NO_NORM.last_bn(3))
    assert type(models.BN.conv(2, 3, 1, bias=False, scale=1.2)) is nn.Conv2d
    assert type(models.MIMIC.conv(2, 3, 1, bias=True)) is nn.Conv2d
    scaled = models.NO_NORM.conv(2, 3, 1, bias=True, scale=1.2)
    assert isinstance(scaled, models.ScaledConv2d) and scaled.scale.item() == pytest.approx(1.2)
    assert [v.conv_bias for v in models.VARIANTS.values()] == [False, True, True]
