"""The memory benchmark's measurements on graphs whose numbers are known by hand."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks import memory


def test_saved_tensor_bytes_of_a_toy_graph() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(5, 8)
    # first Linear saves its input (5*8 floats), ReLU its output (5*16), which the second Linear
    # saves again (same storage, counted once); the weights are parameters and not counted
    saved = memory.saved_tensor_bytes(lambda: model(x).sum(), memory.state_storages(model))
    assert saved == 4 * (5 * 8 + 5 * 16)


def test_saved_tensor_bytes_counts_a_separate_scale_multiply() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    scale = nn.Parameter(torch.tensor(2.0))
    x = torch.randn(2, 3, 6, 6)
    exclude = memory.state_storages(conv) | {scale.untyped_storage().data_ptr()}
    saved = memory.saved_tensor_bytes(lambda: scale * conv(x), exclude)
    assert saved == 4 * (2 * 3 * 6 * 6 + 2 * 4 * 6 * 6)  # conv input + conv output (for d/dscale)


def test_cpu_peak_step_bytes_sees_temporaries() -> None:
    def step() -> None:
        a = torch.ones(1000, 1000)
        b = a * 2
        del a, b
        torch.ones(10)

    peak = memory.cpu_peak_step_bytes(step)
    assert 8_000_000 <= peak < 8_100_000


def test_strip_batchnorm_replaces_every_batchnorm2d() -> None:
    inner = nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), inner)
    memory.strip_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model[1], nn.Identity) and isinstance(model[2][0], nn.Identity)


@pytest.mark.parametrize(
    "arch", ["resnet18", "resnet50", "vgg16", "squeezenet", "shufflenetv2", "mobilenetv2"]
)
def test_cbn_saves_no_more_than_the_batchnorm_free_limit(arch: str) -> None:
    """The issue-5 target: a _cbn step saves at most 1.05x what the BN twin without BN saves."""
    saved = {}
    for variant in ("cbn", "limit"):
        torch.manual_seed(0)
        model = memory.build_variant(arch, variant, "cifar")
        step = memory.TrainStep(model, 2, 32, 100, torch.device("cpu"))
        saved[variant] = memory.saved_tensor_bytes(step.loss, memory.state_storages(model))
    assert saved["cbn"] <= 1.05 * saved["limit"]


def test_benchmark_writes_table_csv_and_plot(tmp_path) -> None:
    args = memory.get_args_parser().parse_args(
        ["--arch", "squeezenet", "--batch-size", "2", "--steps", "1", "--warmup", "0",
         "--out-dir", str(tmp_path)]
    )
    (row,) = memory.main(args)
    assert row["saved_cbn/plain"] < 1 and row["step_cbn_ms"] > 0 and row["peak_cbn_MiB"] > 0
    written = {p.name for p in tmp_path.iterdir()}
    assert written == {"memory_cifar.csv", "memory_cifar.md", "memory_cifar.png"}


def test_scaled_conv_formulations_save_what_their_docstrings_say() -> None:
    from benchmarks.scaled_conv import formulation
    from models import ScaledConv2d

    conv = ScaledConv2d(3, 4, 3, padding=1, bias=False, scale_init=0.5)
    x = torch.randn(2, 3, 6, 6)
    exclude = memory.state_storages(conv)
    saved = {}
    for name in ("separate", "folded", "custom"):
        with formulation(name):
            saved[name] = memory.saved_tensor_bytes(lambda: conv(x), exclude)
    x_bytes, out_bytes, weight_bytes = 4 * x.numel(), 4 * 2 * 4 * 6 * 6, 4 * conv.weight.numel()
    assert saved == {"separate": x_bytes + out_bytes, "folded": x_bytes + weight_bytes, "custom": x_bytes}
    assert ScaledConv2d.forward.__module__ == "models.mimicnorm"  # restored
