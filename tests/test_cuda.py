"""GPU-only checks (marker `cuda`, skipped without CUDA; `scripts/device_check.py` runs them):
mixed precision, channels_last and compile in real runs, the device pipeline on the GPU giving
the CPU's bits without making the host wait, and --deterministic with ImageNet VGG."""
from __future__ import annotations

import pytest
import torch

from Cifar.main import main
from tests.recipes import FP16_LR, TINY
from training.device_loader import CropFlipRotate, TensorImages

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ON_GPU = [*[f for f in TINY if f not in ("--gpu", "-1")], "--gpu", "0", "-j", "0"]


def test_device_pipeline_on_cuda_equals_the_cpu_one():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    data = TensorImages(images, torch.arange(64), [0.5] * 3, [0.25] * 3,
                        [str(i) for i in range(64)], CropFlipRotate())
    index = torch.randperm(64, generator=g)[:48]
    on_cpu, labels_cpu = data.batch(index, seed=5, epoch=2)
    on_gpu, labels_gpu = data.to(torch.device("cuda")).batch(index, seed=5, epoch=2)
    assert torch.equal(on_cpu, on_gpu.cpu()) and torch.equal(labels_cpu, labels_gpu.cpu())


@pytest.mark.parametrize("flags", [["--amp", "fp16", "-lr", str(FP16_LR)],
                                   ["--amp", "bf16", "--channels-last"], ["--compile"],
                                   ["--loader", "device", "--amp", "fp16", "-lr", str(FP16_LR)]],
                         ids=["fp16", "bf16-channels-last", "compile", "device-loader-fp16"])
def test_training_runs_on_the_gpu(tmp_path, flags):
    assert main([*ON_GPU, *flags, "--epochs", "2", "--out-dir", str(tmp_path),
                 "--run-name", "gpu"]) == 0
    ckpt = torch.load(tmp_path / "squeezenet_cbn" / "gpu" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert (ckpt["scaler"] is not None) == ("fp16" in flags)


def test_device_batches_never_make_the_host_wait():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    data = TensorImages(images, torch.arange(64), [0.5] * 3, [0.25] * 3,
                        [str(i) for i in range(64)], CropFlipRotate()).to(torch.device("cuda"))
    torch.cuda.set_sync_debug_mode("error")  # a synchronising CUDA call raises
    try:
        for epoch in range(3):
            data.batch(torch.arange(16 * epoch, 16 * epoch + 16), seed=1, epoch=epoch)
            data.batch(torch.arange(16))  # a test batch
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_deterministic_imagenet_vgg_trains_at_224_px():
    import models
    from training.rng import deterministic_algorithms

    with deterministic_algorithms(True):
        net = models.create_model("vgg11_cbn", 10, "imagenet", width=0.25).cuda()
        net(torch.randn(2, 3, 224, 224, device="cuda")).square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
