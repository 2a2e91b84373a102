"""ImageNet data: the LMDB dataset, the ImageFolder fallback and the recipe's transforms.

``--data-dir DIR`` holds ``train.lmdb`` and ``val.lmdb`` (written by ``folder2lmdb.py``), or
``train/`` and ``val/`` ImageFolder trees with ``-ds folder``. Both give the same labels.
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import transforms

from ImageNet.lmdb_format import load_index, record_key, shared_env

if TYPE_CHECKING:
    import lmdb
from training.cli import positive_int
from training.errors import UNKNOWN_IMAGE_FORMAT, DataError
from training.image_tree import ImageTree, rgb_image

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
        self._env: lmdb.Environment | None = None  # shared_env(path), cached for this process
        self._env_pid: int | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        i %= len(self)
        if self._env_pid != os.getpid():
            self._env, self._env_pid = shared_env(self.path), os.getpid()
        with self._env.begin() as txn:
            data = txn.get(record_key(i))
        if data is None:
            raise DataError(f"{self.path}: record {i} is missing (corrupt database)")
        image = decode_image(data, f"{self.path} record {i}")
        target = int(self.targets[i])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_env": None, "_env_pid": None}

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}({str(self.path)!r}, {len(self)} images, {len(self.classes)} classes)"


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode encoded image bytes to an 8-bit RGB PIL image (`rgb_image`); a failure is a
    DataError naming `name`."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return rgb_image(img)
    except UnidentifiedImageError:
        raise DataError(f"{name}: {UNKNOWN_IMAGE_FORMAT}") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{name}: not a decodable image ({exc})") from None


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
    check_val_resize(image_size, val_resize)
    return transforms.Compose([
        transforms.Resize(val_resize),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def check_val_resize(image_size: int, val_resize: int | None) -> None:
    """Refuse (ValueError) an eval resize below the crop, which would pad the crop with black;
    None (the default resize) is always fine."""
    if val_resize is not None and val_resize < image_size:
        raise ValueError(f"--val-resize {val_resize} is smaller than --image-size {image_size}: "
                         "the centre crop would pad the validation images with black; give "
                         f"--val-resize {image_size} or more (default "
                         f"{default_val_resize(image_size)})")


def image_folder(root: Path, transform: Callable[[Image.Image], Any] | None = None) -> ImageTree:
    """An ImageFolder tree (`training.image_tree.ImageTree`: torchvision's labels, walked
    safely) with a one-line error for a missing, empty or unreadable tree."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (expected an ImageFolder tree)")
    try:
        return ImageTree(root, transform=transform)
    except FileNotFoundError:  # no class folders, or one without images: the message says so
        raise
    except OSError as exc:
        raise FileNotFoundError(f"cannot read the ImageFolder tree {root}: {exc}") from exc


def default_val_resize(image_size: int) -> int:
    """The eval resize that keeps the recipe's 256/224 ratio: 256 for 224, 37 for 32."""
    return round(image_size * 256 / 224)


MIN_IMAGE_SIZE = 32  # every ImageNet network here halves the resolution five times


def image_size(text: str) -> int:
    """argparse type of ``--image-size``: an integer the networks can downsample."""
    value = int(text)
    if value < MIN_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(
            f"must be at least {MIN_IMAGE_SIZE} (the networks downsample by 32), got {text}"
        )
    return value


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ImageNet-only flags ``--image-size`` and ``--val-resize``."""
    parser.add_argument(
        "--image-size", type=image_size, default=224, help="training and eval crop size"
    )
    parser.add_argument(
        "--val-resize", type=positive_int, default=None,
        help="eval: short side resized to this, then the centre crop (default image size * 8/7)",
    )


def load_split(
    data_dir: Path,
    data_format: str,
    train: bool,
    image_size: int = 224,
    val_resize: int | None = None,
) -> LMDBImageFolder | ImageTree:
    """``train.lmdb`` / ``val.lmdb`` (or ``train/`` / ``val/`` trees) under ``data_dir``, with the
    recipe's training or eval transform."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data-dir {data_dir}: no such folder")
    if train:
        transform = train_transform(image_size)
    else:
        transform = val_transform(image_size, val_resize or default_val_resize(image_size))
    split = "train" if train else "val"
    if data_format == "lmdb":
        return LMDBImageFolder(data_dir / f"{split}.lmdb", transform)
    if data_format == "folder":
        return image_folder(data_dir / split, transform)
    raise ValueError(f"data format {data_format!r}: expected one of {DATA_FORMATS}")
