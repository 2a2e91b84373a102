"""CIFAR-100, CIFAR-10, any small-image ImageFolder tree, or generated images, with the paper's
augmentation: random crop 32 with padding 4, horizontal flip, rotation +-15 degrees."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from torch.utils.data import Dataset
from torchvision import datasets, transforms

from Cifar.utils import NORMALIZATION
from training import SyntheticImages, UsageError

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

    family = "cifar"

    def load(self, args: argparse.Namespace, train: bool) -> tuple[Dataset, int]:
        """The split `-ds` selects and its number of classes; missing files raise UsageError."""
        if args.dataset == "synthetic":
            n_train, n_test = args.synthetic_size
            transform = transforms.Compose(augmentation()) if train else None
            data = SyntheticImages(n_train if train else n_test, SYNTHETIC_CLASSES, IMAGE_SIZE,
                                   offset=0 if train else n_train, transform=transform)
            return data, SYNTHETIC_CLASSES
        transform = image_transform(args.dataset, train)
        if args.dataset == "folder":
            return _image_folder(Path(args.data_dir) / ("train" if train else "test"), transform)
        return _torchvision_cifar(args.dataset, Path(args.data_dir), train, transform)


def _image_folder(root: Path, transform: transforms.Compose) -> tuple[Dataset, int]:
    if not root.is_dir():
        raise UsageError(f"-ds folder needs an ImageFolder tree {root}/<class>/<image>, "
                         f"which does not exist")
    try:
        data = datasets.ImageFolder(root, transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise UsageError(f"cannot use {root} as an ImageFolder tree: {e}") from None
    return data, len(data.classes)


def _torchvision_cifar(name: str, root: Path, train: bool, transform: transforms.Compose
                       ) -> tuple[Dataset, int]:
    cls = datasets.CIFAR100 if name == "cifar100" else datasets.CIFAR10
    try:
        data = cls(root, train=train, transform=transform, download=False)
    except RuntimeError:  # not there yet: try to download it
        try:
            data = cls(root, train=train, transform=transform, download=True)
        except (OSError, RuntimeError) as e:
            raise UsageError(f"{name} is not in {root} and could not be downloaded ({e}); put "
                             f"{cls.filename} (or its extracted {cls.base_folder}/ folder) in "
                             f"{root}, or pass --data-dir") from None
    return data, len(data.classes)
