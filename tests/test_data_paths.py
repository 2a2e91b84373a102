"""The two CIFAR data paths: per-sample seeding of the PIL path (any worker count, persistent
workers), the device pipeline (augmentation semantics, statistics, determinism, shards), and
exact mid-epoch resume with each."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

import training
from Cifar.data_loader import CifarData
from Cifar.main import main
from Cifar.utils import get_args_parser
from tests.recipes import FP16_LR, TINY
from training.data import sample_seed
from training.device_loader import CropFlipRotate, DeviceLoader, TensorImages, hash32
from training.engine import loader_batches


def _cifar_args(*flags: str):
    return get_args_parser().parse_args([*TINY, *flags])


def _epoch_batches(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.sampler.set_epoch(epoch)
    with loader_batches(loader) as batches:
        return list(batches)


def _same_batches(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
                                    for x, y in zip(a, b))


# --- PIL path: per-sample seeds ---------------------------------------------------------------

def test_per_sample_seeding_gives_the_images_of_a_global_seed():
    """Seeding only the CPU generator (fast in CUDA builds) draws what torch.manual_seed did."""
    args = _cifar_args()
    base, _ = CifarData().load(args, train=True)
    seeded = training.SeededSamples(base, seed=7)
    for epoch, index in [(0, 3), (2, 11)]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(7, epoch, index))
            expected = base[index][0]
        assert torch.equal(seeded[epoch, index][0], expected)


def test_images_do_not_depend_on_workers_or_persistence():
    args = _cifar_args()
    train_set, _ = CifarData().load(args, train=True)
    test_set, _ = CifarData().load(args, train=False)
    rt = training.Runtime(torch.device("cpu"))

    def loader(workers: int):
        args.workers = workers
        return training.build_loaders(train_set, test_set, args, rt)[0]

    persistent = loader(2)
    assert persistent.persistent_workers
    try:
        runs = {"persistent": [_epoch_batches(persistent, e) for e in (0, 1)]}
    finally:
        training.engine.shutdown_workers(persistent)
    for workers in (0, 2):
        runs[workers] = [_epoch_batches(loader(workers), e) for e in (0, 1)]
    one_shot = DataLoader(training.SeededSamples(train_set, args.seed), batch_size=4,
                          sampler=persistent.sampler, num_workers=2, drop_last=True)
    runs["not persistent"] = [_epoch_batches(one_shot, e) for e in (0, 1)]
    for name in (2, "persistent", "not persistent"):
        assert all(_same_batches(runs[0][e], runs[name][e]) for e in (0, 1)), name
    # the epoch reached the persistent workers: every sample is augmented anew in epoch 2
    by_index = [{int(t): img for b in runs["persistent"][e] for img, t in zip(*b)} for e in (0, 1)]
    assert by_index[0].keys() == by_index[1].keys() == set(range(24))  # label = index here
    assert not any(torch.equal(by_index[0][i], by_index[1][i]) for i in range(24))


# --- device pipeline --------------------------------------------------------------------------

def _random_split(n: int, seed: int = 0) -> TensorImages:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(1, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return TensorImages(images, torch.arange(n), [0.5, 0.4, 0.3], [0.2, 0.25, 0.3],
                        [str(i) for i in range(n)], CropFlipRotate())


def test_hash_is_exact_32_bit_arithmetic():
    x = torch.tensor([0, 1, 2**32 - 1, 123456789], dtype=torch.int64)

    def lowbias32(v: int) -> int:
        v ^= v >> 16
        v = (v * 0x7FEB352D) & 0xFFFFFFFF
        v ^= v >> 15
        v = (v * 0x846CA68B) & 0xFFFFFFFF
        return v ^ (v >> 16)

    assert hash32(x).tolist() == [lowbias32(v) for v in x.tolist()]


def test_device_batch_equals_torchvision_ops_with_the_same_parameters():
    """Known images: pad + crop, flip, then RandomRotation's nearest/zero-fill rotation, each
    as torchvision does it, then ToTensor/Normalize arithmetic."""
    data = _random_split(64)
    index = torch.arange(64)
    images, labels = data.batch(index, seed=3, epoch=1)
    assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32
    assert torch.equal(labels, index)
    params = data.augment.parameters(3, 1, index)
    mean, std = data.mean[0], data.std[0]
    for i in range(64):
        x = TF.crop(TF.pad(data.images[i], [4] * 4), int(params["top"][i]),
                    int(params["left"][i]), 32, 32)
        x = TF.hflip(x) if params["flip"][i] else x
        x = TF.rotate(x, float(params["angle"][i]), InterpolationMode.NEAREST)
        expected = (x.float() / 255 - mean) / std
        same = (images[i] == expected).all(0).float().mean()
        assert same >= 0.995, f"image {i}: {same:.4f} of pixels agree"


def test_device_augmentation_statistics():
    index = torch.arange(20_000)
    params = CropFlipRotate().parameters(seed=0, epoch=0, index=index)
    assert abs(params["flip"].float().mean() - 0.5) < 0.02
    angle = params["angle"]
    assert -15 <= angle.min() < -14.9 and 14.9 < angle.max() <= 15 and abs(angle.mean()) < 0.3
    for key in ("top", "left"):
        counts = torch.bincount(params[key], minlength=9)
        assert len(counts) == 9 and counts.min() > 0.8 * 20_000 / 9


def test_rotation_turns_a_known_image_counter_clockwise():
    """A bright pixel right of the centre moves up for positive angles (PIL's direction)."""
    image = torch.zeros(1, 1, 32, 32, dtype=torch.uint8)
    image[0, 0, 15, 25] = 255
    data = TensorImages(image, torch.zeros(1), [0.0], [1.0], ["0"],
                        CropFlipRotate(padding=0, degrees=15))
    for seed in range(40):
        params = data.augment.parameters(seed, 0, torch.tensor([0]))
        if params["flip"][0]:
            continue
        out, _ = data.batch(torch.tensor([0]), seed=seed)
        (row, col), = torch.nonzero(out[0, 0] > 0.5).tolist()
        angle = float(params["angle"][0])
        assert abs(row - (15 - round(9.5 * np.sin(np.radians(angle))))) <= 1
        assert abs(col - (15.5 + 9.5 * np.cos(np.radians(angle)))) <= 1


def test_device_batches_are_a_function_of_seed_epoch_and_index():
    data = _random_split(16)
    a, _ = data.batch(torch.tensor([3, 5, 7]), seed=1, epoch=2)
    b, _ = data.batch(torch.tensor([9, 5]), seed=1, epoch=2)
    assert torch.equal(a[1], b[1])  # sample 5 alike in any batch
    c, _ = data.batch(torch.tensor([5]), seed=1, epoch=3)
    d, _ = data.batch(torch.tensor([5]), seed=2, epoch=2)
    assert not torch.equal(a[1], c[0]) and not torch.equal(a[1], d[0])
    plain, _ = data.batch(torch.tensor([5]))  # no seed: not augmented
    assert torch.equal(plain[0], data[5][0])


def test_device_loader_shards_are_disjoint_and_cover_the_split():
    data = _random_split(20)
    seen = []
    for rank in (0, 1):
        sampler = training.ResumableSampler(data, 5, num_replicas=2, rank=rank, seed=4)
        loader = DeviceLoader(data, 5, sampler, seed=4, drop_last=True)
        sampler.set_epoch(3)
        batches = list(loader)
        assert len(batches) == len(loader) == 2
        for images, labels in batches:
            expected, _ = data.batch(labels, seed=4, epoch=3)
            assert torch.equal(images, expected)
            seen += labels.tolist()
    assert sorted(seen) == list(range(20))


def _write_cifar_like_folder(root: Path, size: int = 32, per_class: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for k in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{k}.png")
    return root


def test_folder_test_split_is_the_same_bits_on_both_paths(tmp_path):
    root = _write_cifar_like_folder(tmp_path / "data")
    flags = ["-ds", "folder", "--data-dir", str(root), "-j", "0"]
    rt = training.Runtime(torch.device("cpu"))
    batches = {}
    for loader in ("pil", "device"):
        args = _cifar_args(*flags, "--loader", loader)
        test_set, classes = CifarData().load(args, train=False)
        assert len(classes) == 2
        _, test_loader = training.build_loaders(None, test_set, args, rt)
        with loader_batches(test_loader) as it:
            batches[loader] = list(it)
    assert _same_batches(batches["pil"], batches["device"])


def test_device_loader_refuses_other_image_sizes(tmp_path, capsys):
    root = _write_cifar_like_folder(tmp_path / "data", size=40, per_class=1)
    assert main([*TINY, "-ds", "folder", "--data-dir", str(root), "--loader", "device", "-j", "0",
                 "--out-dir", str(tmp_path / "runs")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --loader device needs 32x32 images, ") and "is 40x40" in line


# --- exact mid-epoch resume with each path ----------------------------------------------------

def _load_state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def _assert_same_state(a: dict, b: dict) -> None:
    assert (a["epoch"], a["step"]) == (b["epoch"], b["step"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert a["scaler"] == b["scaler"]


@pytest.mark.numerics
@pytest.mark.parametrize("flags", [["--loader", "pil", "-j", "2"], ["--loader", "device"],
                                   ["--loader", "device", "--amp", "fp16", "-lr", str(FP16_LR)]],
                         ids=["pil-2-workers", "device", "device-fp16"])
def test_resume_from_a_mid_epoch_checkpoint_is_exact(tmp_path, flags):
    common = [*TINY, *flags, "--epochs", "2", "--out-dir", str(tmp_path)]
    assert main([*common, "--save-every", "3", "--run-name", "straight"]) == 0
    straight = tmp_path / "squeezenet_cbn" / "straight"
    cut = tmp_path / "squeezenet_cbn" / "cut"
    cut.mkdir()
    shutil.copy(straight / "step-00000009.pt", cut / "last.pt")  # epoch 2, step 3 of 6
    assert _load_state(cut / "last.pt")["step"] == 3
    assert main([*common, "--resume", str(cut)]) == 0
    _assert_same_state(_load_state(straight / "last.pt"), _load_state(cut / "last.pt"))
    if "fp16" in flags:
        assert _load_state(cut / "last.pt")["scaler"]["scale"] > 0


# --- fp16 ------------------------------------------------------------------------------------

def test_plain_amp_still_means_bfloat16():
    assert _cifar_args("--amp").amp == "bf16"
    assert _cifar_args("--amp", "fp16").amp == "fp16" and _cifar_args().amp is None


def test_an_inf_gradient_is_skipped_by_the_scaler_not_reported_as_divergence(tmp_path,
                                                                             monkeypatch):
    real_create, real_update = training.trainer.models.create_model, torch.amp.GradScaler.update
    backward_calls, scales = [], []

    def with_inf_gradient_at_step_4(*args, **kwargs):
        net = real_create(*args, **kwargs)

        def poison(grad: torch.Tensor) -> torch.Tensor:
            backward_calls.append(1)
            return grad * float("inf") if len(backward_calls) == 4 else grad
        next(p for p in net.parameters() if p.dim() == 4).register_hook(poison)
        return net

    def recording_update(self, *args, **kwargs):
        before = self.get_scale()
        real_update(self, *args, **kwargs)
        scales.append((before, self.get_scale()))

    monkeypatch.setattr(training.trainer.models, "create_model", with_inf_gradient_at_step_4)
    monkeypatch.setattr(torch.amp.GradScaler, "update", recording_update)
    assert main([*TINY, "--amp", "fp16", "-j", "0", "--epochs", "1",
                 "--out-dir", str(tmp_path)]) == 0
    assert len(scales) == 6
    before, after = scales[3]
    assert after == before / 2  # the scaler found the inf and skipped the step
    (run_dir,) = (tmp_path / "squeezenet_cbn").iterdir()
    saved = _load_state(run_dir / "last.pt")
    assert saved["scaler"]["scale"] == scales[-1][1]
    assert all(torch.isfinite(v).all() for v in saved["model"].values())
