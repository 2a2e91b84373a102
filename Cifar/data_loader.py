"""CIFAR-100, CIFAR-10, any small-image ImageFolder tree, or generated images, with the paper's
augmentation: random crop 32 with padding 4, horizontal flip, rotation +-15 degrees.

Two data paths give the same augmentation: `--loader pil` transforms image by image in DataLoader
workers (torchvision); `--loader device` decodes a split once into one tensor on the training
device and augments whole batches there (`training.device_loader`).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms
from torchvision.datasets.utils import check_integrity
from torchvision.transforms.functional import pil_to_tensor

from Cifar.utils import CIFAR_RECIPE, NORMALIZATION
from training import SeededSamples, SyntheticImages, UsageError
from training.data import synthetic_classes
from training.device_loader import CropFlipRotate, TensorImages
from training.engine import loader_batches
from training.errors import DataError
from training.image_tree import ImageTree, load_rgb

IMAGE_SIZE = 32
SYNTHETIC_CLASSES = 100  # the shapes of CIFAR-100


def augmentation() -> list[Callable]:
    """The training augmentation of the reference code (before normalisation)."""
    return [transforms.RandomCrop(IMAGE_SIZE, padding=4), transforms.RandomHorizontalFlip(),
            transforms.RandomRotation(15)]


def image_transform(dataset: str, train: bool) -> transforms.Compose:
    """PIL image -> normalised tensor, augmented for training; test images are centre-cropped
    to 32 pixels (a no-op for CIFAR itself)."""
    mean, std = NORMALIZATION[dataset]
    first = augmentation() if train else [transforms.CenterCrop(IMAGE_SIZE)]
    return transforms.Compose([*first, transforms.ToTensor(), transforms.Normalize(mean, std)])


class CifarData:
    """The CIFAR entry point's `training.DataSource`."""

    recipe = CIFAR_RECIPE

    def load(self, args: argparse.Namespace, train: bool) -> tuple[Dataset, list[str]]:
        """The split `-ds` selects and its class names, as `TensorImages` with `--loader
        device`; missing files raise UsageError."""
        if args.loader == "device":
            data = load_tensors(args, train)
            return data, data.classes
        if args.dataset == "synthetic":
            n_train, n_test = args.synthetic_size
            transform = transforms.Compose(augmentation()) if train else None
            data = SyntheticImages(n_train if train else n_test, SYNTHETIC_CLASSES, IMAGE_SIZE,
                                   offset=0 if train else n_train, transform=transform)
            return data, synthetic_classes(SYNTHETIC_CLASSES)
        transform = image_transform(args.dataset, train)
        if args.dataset == "folder":
            return _image_folder(Path(args.data_dir) / ("train" if train else "test"), transform)
        return _torchvision_cifar(args.dataset, Path(args.data_dir), train, transform)


def load_tensors(args: argparse.Namespace, train: bool) -> TensorImages:
    """The split `-ds` selects decoded into one tensor (uint8 images; generated ones are float),
    with the paper's augmentation for training."""
    augment = CropFlipRotate(IMAGE_SIZE, padding=4, degrees=15) if train else None
    if args.dataset == "synthetic":
        n_train, n_test = args.synthetic_size
        data = SyntheticImages(n_train if train else n_test, SYNTHETIC_CLASSES, IMAGE_SIZE,
                               offset=0 if train else n_train)
        pairs = [data[i] for i in range(len(data))]
        images = torch.stack([image for image, _ in pairs])
        labels = torch.tensor([label for _, label in pairs])
        return TensorImages(images, labels, [0.0] * 3, [1.0] * 3,
                            synthetic_classes(SYNTHETIC_CLASSES), augment)
    if args.dataset == "folder":
        folder, classes = _image_folder(Path(args.data_dir) / ("train" if train else "test"),
                                        pil_to_tensor, loader=_exact_size_image)
        images, labels = _decode_all(folder, args.workers)
    else:
        cifar, classes = _torchvision_cifar(args.dataset, Path(args.data_dir), train, None)
        images = torch.from_numpy(np.ascontiguousarray(cifar.data.transpose(0, 3, 1, 2)))
        labels = torch.tensor(cifar.targets)
    mean, std = NORMALIZATION[args.dataset]
    return TensorImages(images, labels, mean, std, classes, augment)


def _exact_size_image(path: str) -> Image.Image:
    image = load_rgb(path)
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"--loader device needs {IMAGE_SIZE}x{IMAGE_SIZE} images, {path} is "
                        f"{image.size[0]}x{image.size[1]}; use --loader pil")
    return image


def _decode_all(folder: Dataset, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (image, label) of `folder`, decoded by `workers` processes, stacked."""
    loader = DataLoader(SeededSamples(folder, None), batch_size=512, num_workers=workers)
    with loader_batches(loader) as batches:
        parts = list(batches)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _image_folder(root: Path, transform: Callable, loader: Callable[[str], Image.Image] = load_rgb
                  ) -> tuple[Dataset, list[str]]:
    if not root.is_dir():
        raise UsageError(f"-ds folder needs an ImageFolder tree {root}/<class>/<image>, "
                         f"which does not exist")
    try:
        data = ImageTree(root, transform=transform, loader=loader)
    except FileNotFoundError as e:  # no class folders, or one without images
        raise UsageError(f"-ds folder: {e}") from None
    except OSError as e:
        raise UsageError(f"cannot read the ImageFolder tree {root}: {e}") from None
    return data, list(data.classes)


def _torchvision_cifar(name: str, root: Path, train: bool, transform: transforms.Compose | None
                       ) -> tuple[Dataset, list[str]]:
    cls = datasets.CIFAR100 if name == "cifar100" else datasets.CIFAR10
    try:
        data = cls(root, train=train, transform=transform, download=False)
    except RuntimeError:  # not there yet: try to download it
        _refuse_a_damaged_archive(name, root / cls.filename, cls.tgz_md5)
        try:
            data = cls(root, train=train, transform=transform, download=True)
        except (OSError, RuntimeError) as e:
            extracted = root / cls.base_folder
            missing = (f"{extracted} is incomplete or corrupt" if extracted.exists()
                       else f"{name} is not in {root}")
            raise UsageError(f"{missing} and could not be downloaded ({e}); put "
                             f"{cls.filename} (or its extracted {cls.base_folder}/ folder) in "
                             f"{root} or pass --data-dir, or train on your own images with -ds "
                             "folder or on generated ones with -ds synthetic") from None
    return data, list(data.classes)


def _refuse_a_damaged_archive(name: str, archive: Path, md5: str) -> None:
    """A UsageError naming `archive` when it exists but is unreadable or not the published file
    (a download would otherwise replace it, or fail and blame a missing dataset)."""
    if not archive.exists():
        return
    try:
        intact = check_integrity(archive, md5)
    except OSError as e:
        raise UsageError(f"cannot read {archive}: {e.strerror or e}") from None
    if not intact:
        raise UsageError(f"{archive} is corrupt or incomplete (its MD5 checksum is not that of "
                         f"the {name} archive): copy it again, or delete it to download it")
