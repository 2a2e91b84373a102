"""The README's figure, from committed result files only: BN vs MimicNorm test top-1 per network
and the CIFAR training-memory ratio.

    python scripts/readme_figure.py                  # writes results/figure.png

Accuracy is the summarizer's last-epoch test top-1 over the runs in
`results/table1_converged/runs.parquet` once that study has been summarised, else in
`results/table1/runs.parquet` (8 epochs: early training, not convergence, and the figure says
so); memory from `results/memory/memory_cifar.csv`.
"""
from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as `python scripts/readme_figure.py`: import from the repo
    sys.path.insert(0, str(REPO))

from experiments.summarize import parse_setting, summarize  # noqa: E402

# (a summarizer's runs.parquet, its data, what its numbers measure), the first that exists wins
ACCURACY_SOURCES = (
    ("results/table1_converged/runs.parquet", "CIFAR-10, 1,000 train images/class",
     "last epoch of the schedule"),
    ("results/table1/runs.parquet", "CIFAR-10, 500 train images/class",
     "early training, not convergence"),
)
MEMORY_SOURCE = "results/memory/memory_cifar.csv"
VARIANTS = ("BN", "MimicNorm")


@dataclass(frozen=True)
class Accuracy:
    """Last-epoch test top-1 (%) of one network's variant, mean and std over `n` seeds."""

    arch: str
    variant: str
    mean: float
    std: float
    n: int


@dataclass(frozen=True)
class FigureData:
    """Everything the figure draws, read from the committed CSV files."""

    accuracy_source: str
    accuracy_title: str
    accuracy: list[Accuracy]
    memory_source: str
    memory_ratio: dict[str, float]  # arch -> activation memory saved for backward, MimicNorm / BN


def accuracy_source(repo: Path = REPO) -> tuple[str, str, str]:
    """(path relative to `repo`, its data, what it measures) of the summary the figure uses."""
    for source in ACCURACY_SOURCES:
        if (repo / source[0]).is_file():
            return source
    raise FileNotFoundError(f"none of {', '.join(s[0] for s in ACCURACY_SOURCES)} exists")


def setting_title(setting: str, data: str, meaning: str) -> str:
    """'CIFAR-10 ..., width 0.25, 8 epochs: early training, ...' from a summarizer setting."""
    values = parse_setting(setting)
    return f"{data}, width {values['width']}, {values['epochs']} epochs: {meaning}"


def read_accuracy(path: Path) -> tuple[str, list[Accuracy]]:
    """The setting and the BN / MimicNorm rows the summarizer computes from a `runs.parquet`
    (one row per run and epoch, as `experiments.summarize` writes it) of one setting."""
    rows = summarize(pd.read_parquet(path)).to_dict("records")
    settings = {row["setting"] for row in rows}
    if len(settings) != 1:
        raise ValueError(f"{path}: expected one setting, found {len(settings)}")
    accuracy = [Accuracy(row["arch"], row["variant"], float(row["last_mean"]),
                         float(row["last_std"]), int(row["n"]))
                for row in rows if row["variant"] in VARIANTS]
    return settings.pop(), sorted(accuracy, key=lambda a: (a.arch, VARIANTS.index(a.variant)))


def read_memory_ratio(path: Path) -> dict[str, float]:
    """arch -> `saved_cbn/plain` of a `benchmarks.memory` CSV."""
    with path.open(newline="") as f:
        return {row["arch"]: float(row["saved_cbn/plain"]) for row in csv.DictReader(f)}


def figure_data(repo: Path = REPO) -> FigureData:
    """Read what the figure shows from the committed results under `repo`."""
    source, dataset, meaning = accuracy_source(repo)
    setting, accuracy = read_accuracy(repo / source)
    return FigureData(source, setting_title(setting, dataset, meaning), accuracy, MEMORY_SOURCE,
                      read_memory_ratio(repo / MEMORY_SOURCE))


def plot(data: FigureData, out: Path) -> None:
    """Two panels: grouped bars of test top-1 with std error bars; the memory ratio per arch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = sorted({a.arch for a in data.accuracy})
    fig, (acc_ax, mem_ax) = plt.subplots(1, 2, figsize=(11, 3.8), width_ratios=(3, 2))
    for offset, variant, colour in ((-0.2, "BN", "#8c8c8c"), (0.2, "MimicNorm", "#1f77b4")):
        rows = {a.arch: a for a in data.accuracy if a.variant == variant}
        xs = [i + offset for i, arch in enumerate(archs) if arch in rows]
        acc_ax.bar(xs, [rows[a].mean for a in archs if a in rows], 0.4, label=variant,
                   yerr=[rows[a].std for a in archs if a in rows], capsize=3, color=colour)
    acc_ax.set_xticks(range(len(archs)), archs, fontsize=8)
    seeds = "/".join(str(n) for n in sorted({a.n for a in data.accuracy}))
    acc_ax.set_ylabel(f"last-epoch test top-1 (%), mean ± std, {seeds} seeds", fontsize=9)
    acc_ax.set_title(data.accuracy_title, fontsize=9)
    acc_ax.legend(fontsize=8)
    mem_archs = sorted(data.memory_ratio)
    mem_ax.barh(mem_archs, [data.memory_ratio[a] for a in mem_archs], color="#1f77b4")
    mem_ax.axvline(1.0, color="#8c8c8c", linestyle="--", linewidth=1)
    mem_ax.set_xlim(0, 1.1)
    mem_ax.tick_params(labelsize=8)
    mem_ax.set_xlabel("activation memory, MimicNorm / BN (1 = BN)")
    mem_ax.set_title("CIFAR training step, batch 16: memory saved for backward", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "figure.png")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Draw the figure from the committed results; 0 when written."""
    args = get_args_parser().parse_args(argv)
    data = figure_data()
    plot(data, args.out)
    print(f"wrote {args.out} from {data.accuracy_source} and {data.memory_source}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
