"""Train a CIFAR classifier with the paper's recipe, e.g. MimicNorm ResNet-18 on CIFAR-100:

    python main.py --arch resnet18_cbn --weight mean -b 256          (from Cifar/)
    torchrun --nproc_per_node 4 Cifar/main.py -a resnet18_cbn --weight mean -b 64

`python main.py --help` lists every flag; the engine lives in the `training` package.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, from any directory

import training  # noqa: E402
from Cifar.data_loader import CifarData  # noqa: E402
from Cifar.utils import get_args_parser  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv), train or evaluate; returns the exit code."""
    args = get_args_parser().parse_args(argv)
    return training.main(args, CifarData())


if __name__ == "__main__":
    sys.exit(main())
