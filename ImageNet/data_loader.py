"""ImageNet data: the LMDB dataset, the ImageFolder fallback and the recipe's transforms.

``--data-dir DIR`` holds ``train.lmdb`` and ``val.lmdb`` (written by ``folder2lmdb.py``), or
``train/`` and ``val/`` ImageFolder trees with ``--data-format folder``. Both give the same labels.
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path
from typing import Any, Callable

from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import ImageFolder

from ImageNet.lmdb_format import LMDBFormatError, load_index, record_key, shared_env

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DATA_FORMATS = ("lmdb", "folder")


class LMDBImageFolder(Dataset):
    """An image LMDB written by ``folder2lmdb.py``, with ImageFolder's ``classes``,
    ``class_to_idx`` and ``targets``.

    The index is read once, here. Records are read through `shared_env`: one read-only, lock-free
    handle per process (DataLoader worker, DDP rank), opened on first use and never pickled.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        transform: Callable[[Image.Image], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
    ) -> None:
        self.path = Path(path)
        index = load_index(self.path)
        self.classes = index.classes
        self.class_to_idx = {name: label for label, name in enumerate(self.classes)}
        self.targets = index.labels
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        i %= len(self)
        with shared_env(self.path).begin() as txn:
            data = txn.get(record_key(i))
        if data is None:
            raise LMDBFormatError(f"{self.path}: record {i} is missing (corrupt database)")
        image = decode_image(data, f"{self.path} record {i}")
        target = int(self.targets[i])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}({str(self.path)!r}, {len(self)} images, {len(self.classes)} classes)"


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode encoded image bytes to an RGB PIL image; ``name`` goes into the error message."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise LMDBFormatError(f"{name}: not a decodable image ({exc})") from exc


def train_transform(image_size: int = 224) -> transforms.Compose:
    """Random-resized crop and horizontal flip, then ImageNet normalisation."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def val_transform(image_size: int = 224, val_resize: int = 256) -> transforms.Compose:
    """Resize the short side to ``val_resize``, centre-crop ``image_size``, normalise."""
    return transforms.Compose([
        transforms.Resize(val_resize),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def image_folder(root: Path, transform: Callable[[Image.Image], Any] | None = None) -> ImageFolder:
    """torchvision's ImageFolder with a one-line error for a missing or empty tree."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (expected an ImageFolder tree)")
    try:
        return ImageFolder(str(root), transform=transform)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{root}: {exc}") from exc


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--data-dir``, ``--data-format``, ``--image-size`` and ``--val-resize``."""
    parser.add_argument(
        "--data-dir", type=Path, required=True,
        help="holds train.lmdb and val.lmdb, or train/ and val/ with --data-format folder",
    )
    parser.add_argument("--data-format", choices=DATA_FORMATS, default="lmdb")
    parser.add_argument("--image-size", type=int, default=224, help="training and eval crop size")
    parser.add_argument(
        "--val-resize", type=int, default=None,
        help="eval: short side resized to this, then the centre crop (default image size * 8/7)",
    )


def build_datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset, int]:
    """Train and val datasets with the recipe's transforms, and the number of classes."""
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data-dir {data_dir}: no such folder")
    val_resize = args.val_resize or round(args.image_size * 256 / 224)
    train_tf, val_tf = train_transform(args.image_size), val_transform(args.image_size, val_resize)
    if args.data_format == "lmdb":
        train = LMDBImageFolder(data_dir / "train.lmdb", train_tf)
        val = LMDBImageFolder(data_dir / "val.lmdb", val_tf)
    elif args.data_format == "folder":
        train = image_folder(data_dir / "train", train_tf)
        val = image_folder(data_dir / "val", val_tf)
    else:
        raise ValueError(f"--data-format {args.data_format!r}: expected one of {DATA_FORMATS}")
    if train.classes != val.classes:
        raise ValueError(
            f"{data_dir}: train has {len(train.classes)} classes and val {len(val.classes)}, "
            "or the names differ; both must list the same classes"
        )
    return train, val, len(train.classes)
