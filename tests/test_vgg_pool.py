"""ImageNet VGG's 7x7 pool avoids the adaptive kernel, whose CUDA backward is not deterministic:
at 224 px nothing is pooled at all, and the outputs are those of `nn.AdaptiveAvgPool2d(7)`."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import models
from models.layers import AvgPoolTo

pytestmark = pytest.mark.usefixtures("one_thread")


class _Ops(TorchDispatchMode):
    """Records the name of every aten op dispatched in the block."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


def _adaptive(names: set[str]) -> set[str]:
    return {name for name in names if "adaptive" in name}


@pytest.mark.parametrize("arch", ["vgg11_cbn", "vgg16"])
def test_vgg_at_224_px_trains_without_adaptive_pooling(arch):
    torch.manual_seed(0)
    net = models.create_model(arch, 10, "imagenet", width=0.0625)
    x = torch.randn(2, 3, 224, 224)
    with _Ops() as ops:
        net(x).square().sum().backward()
    assert "aten::convolution_backward" in ops.names  # the backward was recorded
    assert not _adaptive(ops.names)
    reference = nn.Sequential(net.features, nn.AdaptiveAvgPool2d(7))
    assert torch.equal(net.pool(net.features(x)), reference(x))


def test_vgg_imagenet_pool_keeps_state_dict_keys_and_folds():
    net = models.create_model("vgg11_cbn", 10, "imagenet", width=0.0625).eval()
    assert not [key for key in net.state_dict() if key.startswith("pool")]
    x = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(models.fold(net)(x), net(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size,kernel", [(14, "aten::avg_pool2d"),
                                         (10, "aten::_adaptive_avg_pool2d")])
def test_avg_pool_to_other_sizes_equals_the_adaptive_pool(size, kernel):
    x = torch.randn(2, 3, size, size, requires_grad=True)
    with _Ops() as ops:
        out = AvgPoolTo(7)(x)
    torch.testing.assert_close(out, nn.AdaptiveAvgPool2d(7)(x), rtol=0, atol=1e-6)
    assert kernel in ops.names
