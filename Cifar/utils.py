"""The CIFAR-100 recipe of the paper (the authors' reference code) as command-line defaults."""
from __future__ import annotations

import argparse
from pathlib import Path

from training import Recipe, get_args_parser as engine_args_parser

CIFAR_RECIPE = Recipe(
    family="cifar",
    eval_split="test",
    datasets=("cifar100", "cifar10", "folder", "synthetic"),
    data_dir=str(Path(__file__).resolve().parent / "data"),
    batch_size=256,
    lr=0.1,
    weight_decay=5e-4,
    epochs=150,
    milestones=(80, 110, 135),
    gamma=0.1,
    warm=2,
)

# Per-channel mean and std of the training images; -ds folder uses CIFAR-10's.
NORMALIZATION = {
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "folder": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def get_args_parser() -> argparse.ArgumentParser:
    """The CIFAR training command line (defaults: the paper's CIFAR-100 recipe)."""
    parser = engine_args_parser(
        CIFAR_RECIPE, "Train a CIFAR classifier, plain, MimicNorm (_cbn) or unnormalised (_nobn).")
    parser.add_argument("--loader", choices=("auto", "pil", "device"), default="auto",
                        help="'pil': decode and augment image by image in -j worker processes; "
                             "'device': decode the split once into a tensor on the training "
                             "device and augment whole batches there (32x32 images only); "
                             "'auto': device when training on a GPU, else pil")
    return parser
