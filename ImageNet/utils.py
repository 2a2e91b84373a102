"""The ImageNet recipe of the paper (the authors' reference code) as command-line defaults."""
from __future__ import annotations

import argparse
from pathlib import Path

from ImageNet.data_loader import add_data_arguments
from training import Recipe, get_args_parser as engine_args_parser

IMAGENET_RECIPE = Recipe(
    family="imagenet",
    eval_split="val",
    datasets=("lmdb", "folder", "synthetic"),
    data_dir=str(Path(__file__).resolve().parent / "data"),
    batch_size=256,
    lr=0.1,  # for a global batch of 256, scaled linearly (lr_batch) unless -lr is given
    lr_batch=256,
    weight_decay=1e-4,
    epochs=90,
    milestones=(30, 60, 85),
    gamma=0.1,
    warm=2,
    synthetic_size=(512, 128),
)


def get_args_parser() -> argparse.ArgumentParser:
    """The ImageNet training command line (defaults: the paper's ImageNet recipe)."""
    parser = engine_args_parser(
        IMAGENET_RECIPE, "Train an ImageNet classifier, plain, MimicNorm (_cbn) or unnormalised (_nobn).")
    add_data_arguments(parser)
    parser.set_defaults(loader="pil")  # images are decoded and augmented in DataLoader workers
    return parser

