"""The paper's Table 1 from our own runs: architecture x variant x seed, each cell one run of
`Cifar/main.py` (the same engine, flags and outputs as any user run), then the summary.

Variants: bn (`<arch>`), mimicnorm (`<arch>_cbn --weight mean`), nonorm (`<arch>_nobn`), and on
request weightmean (`<arch>_nobn --weight mean`) and lastbn (`<arch>_cbn`). Epochs keep the
recipe's shape at any length: a warm-up of 2/150 of the run (at least 1 epoch), then x0.1 once
80/150, 110/150 and 135/150 of the epochs are done.

Cells run as processes, `--jobs` at once with `--threads` torch threads each (or `--per-gpu`
per GPU of `--gpus`); a cell's numbers do not depend on the packing. The study can be stopped at
any moment (Ctrl-C, SIGTERM, SIGKILL) and started again with the same command, on a fresh clone
too when its finished cells were committed: they are skipped, cut cells resume from their last
checkpoints (`experiments.grid`). A cell that diverges is a result, recorded and not retried.
`--print-commands` prints one line per unfinished cell for a cluster scheduler.

    python -m experiments.table1 --source data/cifar10-jpeg.tar.gz --out-dir runs/table1  # CPU
    python -m experiments.table1 --paper --data-dir Cifar/data --gpus 0 1 2 3 --out-dir runs/t1
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python experiments/table1.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import models  # noqa: E402
from experiments import grid, summarize  # noqa: E402

# study variant -> (registry variant of the model, --weight)
VARIANTS = {"bn": (models.BN, "none"), "mimicnorm": (models.MIMIC, "mean"),
            "nonorm": (models.NO_NORM, "none"), "weightmean": (models.NO_NORM, "mean"),
            "lastbn": (models.MIMIC, "none")}
PAPER_ARCHS = ("vgg11", "vgg16", "resnet18", "resnet50", "squeezenet", "shufflenetv2")
PAPER_EPOCHS, PAPER_WARM, PAPER_MILESTONES = 150, 2, (80, 110, 135)


@dataclass(frozen=True)
class StudyCell:
    """One run of the study, by what it varies."""

    arch: str
    variant: str
    seed: int

    @property
    def model(self) -> str:
        """The registry name trained for this cell."""
        return models.twin_name(self.arch, VARIANTS[self.variant][0])

    @property
    def run_name(self) -> str:
        """The run folder's name under `<runs>/<model>/`."""
        return f"{self.variant}-s{self.seed}"


def recipe_shape(epochs: int) -> tuple[int, list[int]]:
    """Warm-up epochs and lr milestones of an `epochs`-long run, scaled from the paper's 150."""
    warm = max(1, round(epochs * PAPER_WARM / PAPER_EPOCHS))
    milestones = sorted({max(1, round(epochs * m / PAPER_EPOCHS)) for m in PAPER_MILESTONES})
    return warm, [m for m in milestones if m < epochs] or [epochs]


def study_cells(args: argparse.Namespace) -> list[StudyCell]:
    """Every cell, seed by seed (a study cut short still has whole seeds): archs x variants,
    then the --extra arch:variant cells."""
    pairs = [(arch, variant) for arch in args.archs for variant in args.variants]
    pairs += [tuple(extra.split(":")) for extra in args.extra]
    return [StudyCell(arch, variant, seed) for seed in args.seeds
            for arch, variant in dict.fromkeys(pairs)]


def batch_size(args: argparse.Namespace, arch: str) -> int:
    """`--batch`, or `--batch-resnet50` for resnet50 (the paper used 128 there)."""
    return args.batch_resnet50 if arch == "resnet50" and args.batch_resnet50 else args.batch


def data_flags(args: argparse.Namespace, work_dir: Path) -> list[str]:
    """The dataset flags every cell shares; -ds folder gets its class-balanced subset (in
    `work_dir`) here."""
    if args.data == "synthetic":
        return ["-ds", "synthetic", "--synthetic-size", *map(str, args.synthetic_size)]
    if args.data != "folder":
        return ["-ds", args.data, "--data-dir", str(args.data_dir)]
    root = grid.extracted_tree(args.source, work_dir / "data")
    per_class = {"train": args.train_per_class, "test": args.test_per_class}
    name = f"subset-{args.train_per_class or 'all'}-{args.test_per_class or 'all'}"
    return ["-ds", "folder", "--data-dir",
            str(grid.subset_tree(root, work_dir / name, per_class))]


def cell_argv(cell: StudyCell, args: argparse.Namespace, data: list[str]) -> list[str]:
    """The Cifar/main.py flags of `cell` (without where the run goes)."""
    warm, milestones = recipe_shape(args.epochs)
    device = grid.device_flags(args)
    return ["-a", cell.model, "--weight", VARIANTS[cell.variant][1], *data,
            "--width", str(args.width), "-b", str(batch_size(args, cell.arch)),
            "-lr", str(args.lr), "--epochs", str(args.epochs), "--warm", str(warm),
            "--milestones", *map(str, milestones), "--seed", str(cell.seed), "--loader",
            args.loader, "-j", str(args.workers), "--no-progress", *device, *args.engine_args]


def grid_cells(args: argparse.Namespace, data: list[str]) -> list[grid.Cell]:
    """The study's cells as the engine runs them."""
    return [grid.Cell(f"{c.model}/{c.run_name}", tuple(cell_argv(c, args, data)), args.epochs)
            for c in study_cells(args)]


def apply_paper_preset(args: argparse.Namespace) -> None:
    """The paper's CIFAR-100 study: six archs, BN vs MimicNorm (+ NoNorm VGG-16), 3 seeds,
    150 epochs, batch 256 (128 for ResNet-50), full width and data."""
    args.archs, args.variants, args.extra = list(PAPER_ARCHS), ["bn", "mimicnorm"], [
        "vgg16:nonorm"]
    args.seeds, args.epochs, args.batch, args.batch_resnet50 = [0, 1, 2], PAPER_EPOCHS, 256, 128
    args.width, args.lr, args.data = 1.0, 0.1, "cifar100"


def get_args_parser() -> argparse.ArgumentParser:
    """The study's command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--paper", action="store_true",
                   help="the paper's full CIFAR-100 study (overrides the grid and recipe flags)")
    p.add_argument("--archs", nargs="+", default=list(PAPER_ARCHS))
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["bn", "mimicnorm"])
    p.add_argument("--extra", nargs="*", default=["resnet18:nonorm", "vgg16:nonorm"],
                   metavar="ARCH:VARIANT", help="further cells, each with every seed")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--width", type=float, default=0.25, help="channel width multiplier")
    p.add_argument("--data", choices=("folder", "cifar10", "cifar100", "synthetic"),
                   default="folder")
    p.add_argument("--source", type=Path, help="--data folder: an ImageFolder tree with train/ "
                                               "and test/, or a .tar.gz holding one")
    p.add_argument("--data-dir", type=Path, default=Path("Cifar/data"),
                   help="--data cifar10/cifar100: torchvision's files")
    p.add_argument("--train-per-class", type=int, default=500, help="0: all (--data folder)")
    p.add_argument("--test-per-class", type=int, default=0, help="0: all (--data folder)")
    p.add_argument("--synthetic-size", nargs=2, type=int, default=[2000, 500])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batch-resnet50", type=int, default=None, help="default: --batch")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--loader", choices=("pil", "device"), default="device")
    p.add_argument("-j", "--workers", type=int, default=0,
                   help="data-loading processes per cell (each cell is its own process)")
    p.add_argument("--out-dir", type=Path, default=Path("runs/table1"),
                   help="runs/ (the cells), the summary, and .work/ (claims, cell outputs, "
                        "data; never committed)")
    grid.add_study_args(p)
    p.add_argument("engine_args", nargs=argparse.REMAINDER,
                   help="after --: further Cifar/main.py flags for every cell")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run every cell not done yet, then summarise the study; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(argv)
    args.engine_args = [a for a in args.engine_args if a != "--"]
    if args.paper:
        apply_paper_preset(args)

    def make_cells(work: Path) -> list[grid.Cell]:
        check_args(args)
        return grid_cells(args, data_flags(args, work))

    code = grid.run_from_args(args, argv, "experiments.table1", make_cells)
    if code != 0 or args.print_commands:
        return code
    if args.cells is not None:
        print(f"summarise the study with: python -m experiments.summarize {args.out_dir}/runs "
              f"--out {args.out_dir}")
        return 0
    return summarize.main([str(args.out_dir / "runs"), "--out", str(args.out_dir)])


def check_args(args: argparse.Namespace) -> None:
    """StudyError for flags argparse cannot check."""
    if args.data == "folder" and args.source is None:
        raise grid.StudyError("--data folder needs --source (an ImageFolder tree or its .tar.gz)")
    bad = [e for e in args.extra if e.count(":") != 1 or e.split(":")[1] not in VARIANTS]
    if bad:
        raise grid.StudyError(f"--extra takes ARCH:VARIANT with VARIANT in {', '.join(VARIANTS)}"
                              f", got {' '.join(bad)}")
    unknown = [a for a in [*args.archs, *(e.split(":")[0] for e in args.extra)]
               if a not in models.list_models("cifar")]
    if unknown:
        raise grid.StudyError(f"unknown architecture(s) {' '.join(unknown)}")


if __name__ == "__main__":
    sys.exit(main())
