"""`models.fold`: eval-mode copies without BatchNorm, LastBN or ScaledConv2d, and their export.

Every registry model (width 1/4, 32x32 inputs) is folded with random BN affines and running
statistics taken from a batch. The float32 bound: the folded outputs differ from the unfolded ones
by less than 1e-5, or (deep BN twins, whose own float32 outputs are off the float64 ones by more
than that) by less than 4x the unfolded network's own float32 rounding error. In float64 the
fold is exact (relative and absolute error below 1e-9).
"""
from __future__ import annotations

import copy
import io
from contextlib import nullcontext

import pytest
import torch
import torchvision
from torch import nn

import models
from tests.helpers import calibrated

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [(d, name) for d in models.FAMILIES for name in models.list_models(d)]
LEFT_OUT = (nn.modules.batchnorm._NormBase, models.LastBN, models.ScaledConv2d)


def registry_model(dataset: str, name: str) -> tuple[nn.Module, torch.Tensor]:
    """Model `name` at width 1/4 calibrated on 8 images, and 2 other images to evaluate it on."""
    torch.manual_seed(0)
    model = models.create_model(name, 10, dataset, width=0.25)
    return calibrated(model, torch.randn(8, 3, 32, 32)), torch.randn(2, 3, 32, 32)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_folds(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Fold `model` (eval mode) and check the bounds above; returns the folded float32 copy."""
    state = copy.deepcopy(model.state_dict())
    folded = models.fold(model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # untouched
    assert not any(isinstance(m, LEFT_OUT) for m in folded.modules())
    assert not folded.training
    with torch.no_grad():
        reference, out = model(x), folded(x)
        reference64 = copy.deepcopy(model).double()(x.double())
        folded64 = models.fold(copy.deepcopy(model).double())(x.double())
    assert max_diff(out, reference) < max(1e-5, 4 * max_diff(reference, reference64))
    torch.testing.assert_close(folded64, reference64, rtol=1e-9, atol=1e-9)
    return folded


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace is deprecated
@pytest.mark.parametrize("dataset,name", CASES, ids=[f"{d}-{n}" for d, n in CASES])
def test_fold_registry_model(dataset: str, name: str) -> None:
    model, x = registry_model(dataset, name)
    folded = assert_folds(model, x)
    traced = torch.jit.trace(folded, x, check_trace=False)
    with torch.no_grad():
        assert torch.equal(traced(x), folded(x))


@pytest.mark.parametrize("dataset,name", CASES, ids=[f"{d}-{n}" for d, n in CASES])
def test_folded_registry_model_exports(dataset: str, name: str) -> None:
    model, x = registry_model(dataset, name)
    folded = models.fold(model)
    exported = torch.export.export(folded, (x,)).module()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), folded(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "shufflenet_v2_x1_0"])
def test_fold_converted_torchvision_model(arch: str) -> None:
    torch.manual_seed(0)
    calibration, x = torch.randn(8, 3, 32, 32), torch.randn(2, 3, 32, 32)
    residuals = arch == "mobilenet_v2"
    with pytest.warns(UserWarning, match="InvertedResidual") if residuals else nullcontext():
        converted = models.convert(getattr(torchvision.models, arch)(num_classes=10), 10)
    assert_folds(calibrated(converted, calibration), x)


def test_fold_of_kept_bn_weights_is_the_bn_network() -> None:
    # convert(init=False) folds the BNs into the convs; fold of the BN twin does the same.
    torch.manual_seed(0)
    model = models.create_model("resnet18", 10, "imagenet", width=0.25).double()
    bn_twin = calibrated(model, torch.randn(8, 3, 32, 32, dtype=torch.float64))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    body = models.convert(bn_twin, 10, init=False).body
    torch.testing.assert_close(models.fold(body)(x), models.fold(bn_twin)(x), rtol=1e-10, atol=0)


def test_folded_model_exports_to_onnx() -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")  # torch.onnx.export's exporter needs it
    model, x = registry_model("cifar", "resnet18_cbn")
    buffer = io.BytesIO()
    torch.onnx.export(models.fold(model), (x,), buffer)
    graph = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(graph)
    ops = {node.op_type for node in graph.graph.node}
    assert "Conv" in ops and "BatchNormalization" not in ops


class LogitsThenReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.last_bn = nn.Linear(4, 3), models.LastBN(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_bn(torch.relu(self.fc(x)))


def test_fold_refuses_what_it_cannot_fold() -> None:
    with pytest.raises(ValueError, match=r"cannot fold LastBN 'last_bn': its input \(relu\)"):
        models.fold(LogitsThenReLU())
    with pytest.raises(ValueError, match=r"BatchNorm2d '1' is not fed by a Conv2d of its own"):
        models.fold(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)))
    with pytest.raises(ValueError, match=r"fold cannot fold '1' \(GroupNorm\)"):
        models.fold(nn.Sequential(nn.Conv2d(3, 4, 1), nn.GroupNorm(2, 4)))
