"""hubconf.py: torch.hub lists and builds every registry model, CIFAR and ImageNet, by name."""
from __future__ import annotations

import sys
import types

import pytest
import torch

import models
from tests.helpers import REPO

pytestmark = pytest.mark.usefixtures("one_thread")

ENTRY_POINTS = [(family, name) for family in models.FAMILIES
                for name in models.list_models(family)]


@pytest.fixture
def local_hub(monkeypatch: pytest.MonkeyPatch) -> str:
    """torch.hub.list and torch.hub.help only take GitHub repositories: point their download step
    at this checkout, so that the rest (import hubconf.py, pick its entry points) runs for real."""
    monkeypatch.setattr(torch.hub, "_get_cache_or_reload", lambda *args, **kwargs: str(REPO))
    return "owner/mimicnorm"


def _parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_hub_lists_every_registry_model_under_its_family(local_hub):
    listed = torch.hub.list(local_hub)
    assert listed == sorted(f"{family}_{name}" for family, name in ENTRY_POINTS)
    assert {"cifar_resnet18_cbn", "imagenet_resnet18_cbn", "cifar_vgg16_nobn"} <= set(listed)


@pytest.mark.parametrize("family, name", ENTRY_POINTS, ids=[f"{f}_{n}" for f, n in ENTRY_POINTS])
def test_hub_load_builds_the_registry_model(family, name):
    torch.manual_seed(0)
    net = torch.hub.load(str(REPO), f"{family}_{name}", source="local", num_classes=10,
                         width=0.125)
    torch.manual_seed(0)
    reference = models.create_model(name, 10, family, width=0.125)
    assert type(net) is type(reference)
    assert models.is_mimicnorm(net) == models.is_mimicnorm_name(name)
    assert {k: v.shape for k, v in net.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()}
    for key, value in reference.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key


def test_hub_defaults_are_the_full_network_with_the_family_classes():
    for family, classes in (("cifar", 100), ("imagenet", 1000)):
        net = torch.hub.load(str(REPO), f"{family}_resnet18_cbn", source="local")
        reference = models.create_model("resnet18_cbn", classes, family)
        assert _parameters(net) == _parameters(reference)
        assert net.fc.out_features == classes


def test_hub_help_documents_the_arguments(local_hub):
    doc = torch.hub.help(local_hub, "imagenet_resnet50_cbn")
    assert doc.startswith("ImageNet resnet50_cbn: the MimicNorm twin of resnet50")
    assert "num_classes: outputs of the classifier (default 1000)" in doc
    assert "width:" in doc and "224x224" in doc


def test_another_models_package_is_refused(monkeypatch):
    other = types.SimpleNamespace(__file__="/x/models/__init__.py")
    monkeypatch.setitem(sys.modules, "models", other)
    with pytest.raises(ImportError, match=r"another package named 'models' .*/x/models"):
        torch.hub.load(str(REPO), "cifar_resnet18", source="local")
