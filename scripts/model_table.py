"""Print a markdown table of every registered model with its parameter count in each variant.

    python scripts/model_table.py > table.md          # both model families
    python scripts/model_table.py --family cifar

CIFAR models are built with 100 classes, ImageNet models with 1000. The model table in
docs/training.md is this script's output.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402

NUM_CLASSES = {"cifar": 100, "imagenet": 1000}
COLUMNS = {models.BN: "plain (BN)", models.MIMIC: "`_cbn` (MimicNorm)",
           models.NO_NORM: "`_nobn` (no norm)"}


def architectures(family: str) -> list[str]:
    """Registered architecture names for `family`, in natural order (resnet18 before resnet101)."""
    return sorted(models.list_archs(family), key=_natural_key)


def _natural_key(name: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def parameter_count(name: str, family: str) -> int:
    """Number of parameters of model `name` built with the family's usual number of classes."""
    model = models.create_model(name, NUM_CLASSES[family], family)
    return sum(p.numel() for p in model.parameters())


def table(families: list[str]) -> str:
    """The markdown table: one row per family and architecture, parameters in millions."""
    lines = [
        "| family | model | " + " | ".join(COLUMNS.values()) + " |",
        "|---|---|" + "---:|" * len(COLUMNS),
    ]
    for family in families:
        label = f"{family} ({NUM_CLASSES[family]} classes)"
        for arch in architectures(family):
            names = [models.twin_name(arch, variant) for variant in COLUMNS]
            counts = [parameter_count(name, family) for name in names]
            cells = " | ".join(f"{n / 1e6:.3f}M" for n in counts)
            lines.append(f"| {label} | {arch} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=models.FAMILIES, help="only this model family")
    args = parser.parse_args(argv)
    print(table([args.family] if args.family else list(models.FAMILIES)))


if __name__ == "__main__":
    main()
