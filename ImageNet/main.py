"""Train an ImageNet classifier with the paper's recipe, e.g. MimicNorm ResNet-50:

    python ImageNet/main.py -a resnet50_cbn --weight mean -b 256 --data-dir /data/imagenet
    torchrun --nproc_per_node 8 ImageNet/main.py -a resnet50_cbn --weight mean -b 32

`--data-dir` holds train.lmdb and val.lmdb (from folder2lmdb.py), or train/ and val/ with -ds folder.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, from any directory

from torch.utils.data import Dataset  # noqa: E402

import training  # noqa: E402
from ImageNet.data_loader import check_val_resize, load_split  # noqa: E402
from ImageNet.lmdb_format import LMDBFormatError  # noqa: E402
from ImageNet.utils import IMAGENET_RECIPE, get_args_parser  # noqa: E402
from training.data import synthetic_classes  # noqa: E402

SYNTHETIC_CLASSES = 1000


class ImageNetData:
    """The ImageNet entry point's `training.DataSource`."""

    recipe = IMAGENET_RECIPE

    def load(self, args: argparse.Namespace, train: bool) -> tuple[Dataset, list[str]]:
        """The split `-ds` selects and its class names; bad data raises UsageError."""
        try:
            check_val_resize(args.image_size, args.val_resize)
        except ValueError as e:
            raise training.UsageError(str(e)) from None
        if args.dataset == "synthetic":
            n_train, n_test = args.synthetic_size
            data = training.SyntheticImages(n_train if train else n_test, SYNTHETIC_CLASSES,
                                            args.image_size, offset=0 if train else n_train)
            return data, synthetic_classes(SYNTHETIC_CLASSES)
        try:
            data = load_split(Path(args.data_dir), args.dataset, train, args.image_size,
                              args.val_resize)
        except (FileNotFoundError, LMDBFormatError, ValueError) as e:
            raise training.UsageError(str(e)) from None
        return data, list(data.classes)


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv), train or evaluate; returns the exit code."""
    args = get_args_parser().parse_args(argv)
    return training.main(args, ImageNetData())


if __name__ == "__main__":
    sys.exit(main())
