"""Learning-rate robustness and ablation of MimicNorm (the paper's learning-rate table).

Trains, through the CIFAR entry point (`Cifar/main.py`, one engine run per cell, see
`experiments.grid`), every variant at every learning rate and seed, and reports the best test top-1
within the epochs of each run (mean +- std over seeds) beside the paper's figures:

    None             <arch>_nobn
    WeightMean only  <arch>_nobn --weight mean
    LastBN only      <arch>_cbn             (only at --ablation-lr: the ablation curves)
    MimicNorm        <arch>_cbn --weight mean
    BN               <arch>

The default is the CPU size: VGG-16 at a quarter of its width on a fixed class-balanced subset of
the real CIFAR-10 images in --source (the first 1000 training images of each class in file-name
order, every test image), 10 epochs, 3 seeds. The paper's size (all of CIFAR-100, full width,
batch 256) on GPUs:

    python -m experiments.lr_robustness --width 1 --dataset cifar100 --data-dir Cifar/data \
        --batch-size 256 --gpus 0 1 --out-dir runs/lr_robustness

Outputs in --out-dir: runs.csv (one row per run and epoch), table.csv and table.md (best test
top-1 per variant and learning rate, mean, std and n over seeds; the paper's beside), curves.png
(mean test top-1 by epoch, one panel per learning rate, and best top-1 against learning rate);
the cells in runs/, claims, cell outputs and data in .work/. Stopped, it continues with the same
command; `--jobs`, `--threads`, `--gpus` and `--print-commands` work as in `experiments.table1`.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python experiments/lr_robustness.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

import models  # noqa: E402
from experiments import grid  # noqa: E402
from experiments.summarize import DIVERGED  # noqa: E402
from experiments.tables import markdown_table, write_csv  # noqa: E402

# variant -> (registry variant of the model, --weight)
VARIANTS = {
    "None": (models.NO_NORM, "none"),
    "WeightMean only": (models.NO_NORM, "mean"),
    "LastBN only": (models.MIMIC, "none"),
    "MimicNorm": (models.MIMIC, "mean"),
    "BN": (models.BN, "none"),
}
TABLE_VARIANTS = ("None", "WeightMean only", "MimicNorm", "BN")  # the paper's table columns
PAPER_LRS = (0.01, 0.05, 0.1, 0.2, 0.5, 1.0)
# The paper's table: best CIFAR-100 top-1 (%) of VGG-16 in its first 10 epochs, one run each.
PAPER = {0.01: (22.12, 34.81, 38.39, 37.82), 0.05: (25.63, 42.63, 49.53, 37.97),
         0.1: (1.24, 36.49, 46.92, 32.40), 0.2: (1.77, 1.00, 39.41, 25.50),
         0.5: (1.00, 1.00, 22.03, 8.26), 1.0: (1.00, 1.00, 9.83, 3.93)}


def model_name(arch: str, variant: str) -> str:
    """The registry name trained for `variant` of `arch`."""
    return models.twin_name(arch, VARIANTS[variant][0])


def run_name(variant: str, lr: float, seed: int) -> str:
    """Folder name of one run: variant without spaces, learning rate, seed."""
    return f"{variant.replace(' ', '_')}-lr{lr:g}-s{seed}"


def engine_argv(variant: str, lr: float, seed: int, data: list[str],
                args: argparse.Namespace) -> list[str]:
    """The `Cifar/main.py` flags of one run (where it goes aside)."""
    return ["-a", model_name(args.arch, variant), "--weight", VARIANTS[variant][1], *data,
            "--width", str(args.width), "-b", str(args.batch_size), "-lr", str(lr),
            "--epochs", str(args.epochs), "--warm", str(args.warm), "--seed", str(seed),
            "--loader", "device", "-j", str(args.workers), "--no-progress",
            *grid.device_flags(args), *args.engine_args]


def plan(args: argparse.Namespace) -> list[tuple[str, float, int]]:
    """(variant, lr, seed) of every run, seed by seed: the table's variants at every lr, then
    the ablation's LastBN-only run."""
    per_seed = [(v, lr) for lr in args.lrs for v in TABLE_VARIANTS] + [
        (v, args.ablation_lr) for v in VARIANTS if v not in TABLE_VARIANTS]
    return [(v, lr, seed) for seed in args.seeds for v, lr in per_seed]


def data_flags(args: argparse.Namespace, work_dir: Path) -> tuple[list[str], str]:
    """The dataset flags of every run and a caption of the data."""
    if args.dataset == "synthetic":
        return (["-ds", "synthetic", "--synthetic-size", *map(str, args.synthetic_size)],
                f"synthetic images ({args.synthetic_size[0]} train / {args.synthetic_size[1]} "
                "test)")
    if args.dataset != "folder":
        return ["-ds", args.dataset, "--data-dir", str(args.data_dir)], f"{args.dataset}, all"
    root = grid.extracted_tree(args.source, work_dir / "data")
    per_class = {"train": args.train_per_class, "test": args.test_per_class}
    name = f"subset-{args.train_per_class or 'all'}-{args.test_per_class or 'all'}"
    subset = grid.subset_tree(root, work_dir / name, per_class)
    return (["-ds", "folder", "--data-dir", str(subset)],
            f"CIFAR-10 subset: {args.train_per_class or 'all'} train / "
            f"{args.test_per_class or 'all'} test images per class")


def best(values: list[float]) -> float:
    """Largest finite value, NaN if none."""
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) if finite else math.nan


def read_records(runs_dir: Path, args: argparse.Namespace) -> list[dict[str, object]]:
    """One record per run and logged epoch of every cell, with whether the run diverged (its
    log then holds the epochs before; one that diverged in its first epoch gets one record of
    epoch 0 and no accuracy)."""
    records = []
    for variant, lr, seed in plan(args):
        folder = runs_dir / model_name(args.arch, variant) / run_name(variant, lr, seed)
        diverged = (folder / DIVERGED).exists()
        rows = list(pd.read_csv(folder / "log.csv").itertuples())
        ident = {"variant": variant, "lr": lr, "seed": seed, "diverged": diverged}
        records += [{**ident, "epoch": int(row.epoch), "train_loss": float(row.train_loss),
                     "test_acc1": float(row.test_acc1), "epoch_seconds": float(row.epoch_seconds)}
                    for row in rows] or [{**ident, "epoch": 0, "train_loss": math.nan,
                                          "test_acc1": math.nan, "epoch_seconds": math.nan}]
    return records


def best_per_run(records: list[dict[str, object]]) -> pd.DataFrame:
    """variant, lr, seed, whether the run diverged and its best test top-1 (NaN when it
    diverged before its first epoch ended)."""
    runs = pd.DataFrame(records, columns=["variant", "lr", "seed", "diverged", "test_acc1"])
    return (runs.groupby(["variant", "lr", "seed"], sort=False)
            .agg(diverged=("diverged", "any"),
                 best=("test_acc1", lambda accs: best(list(accs)))).reset_index())


def seed_table(records: list[dict[str, object]], lrs: list[float]) -> pd.DataFrame:
    """Per lr, per table variant: mean, std and n over seeds of the best test top-1, and how
    many of the runs diverged."""
    scores = best_per_run(records)
    rows = []
    for lr in lrs:
        row: dict[str, object] = {"lr": lr}
        for v in TABLE_VARIANTS:
            mine = scores[(scores["variant"] == v) & (scores["lr"] == lr)]
            values = mine["best"][mine["best"].notna()]
            row |= {f"{v} mean": values.mean() if len(values) else math.nan,
                    f"{v} std": values.std(ddof=1) if len(values) > 1 else math.nan,
                    f"{v} n": len(values), f"{v} diverged": int(mine["diverged"].sum())}
        rows.append(row)
    return pd.DataFrame(rows)


def display_table(table: pd.DataFrame, with_paper: bool) -> pd.DataFrame:
    """`mean +- std (n)` per variant, with the paper's figure beside each when asked."""
    out = pd.DataFrame({"lr": table["lr"].map("{:g}".format)})
    for i, v in enumerate(TABLE_VARIANTS):
        out[v] = [_mean_std(r[f"{v} mean"], r[f"{v} std"], int(r[f"{v} n"]),
                            int(r[f"{v} diverged"])) for _, r in table.iterrows()]
        if with_paper:
            out[f"{v} (paper)"] = [f"{PAPER[lr][i]:.2f}" if lr in PAPER else "-"
                                   for lr in table["lr"]]
    return out


def _mean_std(mean: float, std: float, n: int, diverged: int) -> str:
    """`mean ± std (n)`, and how many runs diverged."""
    text = f"{mean:.2f}" + (f" ± {std:.2f}" if n > 1 else "") + f" ({n})" if n else ""
    return " ".join(filter(None, [text, f"{diverged} diverged" if diverged else ""])) or "-"


def write_outputs(records: list[dict[str, object]], args: argparse.Namespace, caption: str) -> None:
    """runs.csv, table.csv, table.md and curves.png in --out-dir."""
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    write_csv(pd.DataFrame(records), out / "runs.csv")
    table = seed_table(records, args.lrs)
    write_csv(table, out / "table.csv")
    curves = mean_curves(records)
    epochs = list(range(1, args.epochs + 1))
    ablation = pd.DataFrame(
        [{"variant": v, **{str(e): curves.get((v, args.ablation_lr, e), math.nan)
                           for e in epochs},
          "best (mean over seeds)": _mean_best(records, v, args.ablation_lr)} for v in VARIANTS])
    lines = [caption, "",
             f"Best test top-1 (%) within {args.epochs} epochs: mean ± std (seeds). "
             "The paper's column is CIFAR-100 at full width, one run.", "",
             markdown_table(display_table(table, with_paper=True)), "",
             f"Ablation at lr {args.ablation_lr:g}: test top-1 (%) by epoch, mean over seeds", "",
             markdown_table(ablation, floatfmt=".2f")]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    plot_curves(records, args, caption, out / "curves.png")


def mean_curves(records: list[dict[str, object]]) -> dict[tuple[str, float, int], float]:
    """(variant, lr, epoch) -> mean test top-1 over the seeds that logged that epoch."""
    runs = pd.DataFrame(records, columns=["variant", "lr", "seed", "epoch", "test_acc1"])
    runs = runs[runs["epoch"] > 0]
    return runs.groupby(["variant", "lr", "epoch"])["test_acc1"].mean().to_dict()


def _mean_best(records: list[dict[str, object]], variant: str, lr: float) -> float:
    scores = best_per_run(records)
    values = scores.loc[(scores["variant"] == variant) & (scores["lr"] == lr), "best"]
    return float(values.mean()) if values.notna().any() else math.nan


def plot_curves(records: list[dict[str, object]], args: argparse.Namespace, caption: str,
                path: Path) -> None:
    """One panel per learning rate (mean test top-1 by epoch per variant) and best top-1
    (mean +- std over seeds) against lr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(args.lrs) + 1
    cols = min(4, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.1 * rows), squeeze=False)
    colours = dict(zip(VARIANTS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    curves = mean_curves(records)
    for ax, lr in zip(axes.flat, args.lrs):
        for v in VARIANTS:
            points = sorted((e, acc) for (var, r, e), acc in curves.items() if var == v and r == lr)
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=v, color=colours[v])
        ax.set_title(f"lr {lr:g}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test top-1 (%)")
    ax = axes.flat[len(args.lrs)]
    table = seed_table(records, args.lrs)
    for v in TABLE_VARIANTS:
        ax.errorbar(args.lrs, table[f"{v} mean"], yerr=table[f"{v} std"].fillna(0), marker="o",
                    capsize=3, label=v, color=colours[v])
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"best test top-1 in {args.epochs} epochs (%)")
    ax.set_title("learning-rate robustness", fontsize=9)
    for extra in list(axes.flat)[panels:]:
        extra.axis("off")
    handles, labels = max((a.get_legend_handles_labels() for a in axes.flat),
                          key=lambda hl: len(hl[0]))
    fig.legend(handles, labels, loc="lower center", ncol=len(VARIANTS), fontsize=8)
    fig.suptitle(caption, fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options; every size is a flag."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="vgg16", help="registered CIFAR architecture")
    p.add_argument("--width", type=float, default=0.25,
                   help="channel width multiplier of the network (Cifar/main.py --width)")
    p.add_argument("--lrs", type=float, nargs="+", default=list(PAPER_LRS))
    p.add_argument("--ablation-lr", type=float, default=0.1,
                   help="learning rate of the extra LastBN-only run (must be one of --lrs)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warm", type=int, default=2, help="epochs of linear learning-rate warm-up")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--dataset", choices=("folder", "cifar10", "cifar100", "synthetic"),
                   default="folder",
                   help="folder: a class-balanced subset of --source; cifar10/100: torchvision's "
                        "files in --data-dir, all images")
    p.add_argument("--source", type=Path, default=None,
                   help="ImageFolder root with train/ and test/, or a .tar.gz holding one "
                        "(needed with --dataset folder)")
    p.add_argument("--data-dir", type=Path, default=Path("Cifar/data"),
                   help="torchvision CIFAR files (with --dataset cifar10/cifar100)")
    p.add_argument("--train-per-class", type=int, default=1000, help="0: all (--dataset folder)")
    p.add_argument("--test-per-class", type=int, default=0, help="0: all (--dataset folder)")
    p.add_argument("--synthetic-size", nargs=2, type=int, default=[200, 100])
    p.add_argument("-j", "--workers", type=int, default=0, help="data-loading processes per cell")
    p.add_argument("--out-dir", type=Path, default=Path("runs/lr_robustness"))
    grid.add_study_args(p)
    p.add_argument("engine_args", nargs=argparse.REMAINDER,
                   help="after --: further Cifar/main.py flags for every run")
    return p


def main(argv: list[str] | None = None) -> int:
    """Train every run not done yet, then write the tables and the plot; returns the exit
    code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args_parser().parse_args(argv)
    args.engine_args = [a for a in args.engine_args if a != "--"]
    size = ""

    def make_cells(work: Path) -> list[grid.Cell]:
        nonlocal size
        if args.ablation_lr not in args.lrs:
            raise grid.StudyError(f"--ablation-lr {args.ablation_lr:g} must be one of --lrs")
        if args.dataset == "folder" and args.source is None:
            raise grid.StudyError("--dataset folder needs --source: an ImageFolder tree or its "
                                  ".tar.gz")
        data, size = data_flags(args, work)
        return [grid.Cell(f"{model_name(args.arch, v)}/{run_name(v, lr, seed)}",
                          tuple(engine_argv(v, lr, seed, data, args)), args.epochs)
                for v, lr, seed in plan(args)]

    code = grid.run_from_args(args, argv, "experiments.lr_robustness", make_cells)
    if code != 0 or args.cells is not None or args.print_commands:
        return code
    caption = (f"{args.arch} at width {args.width:g}, {size}, {args.epochs} epochs, batch "
               f"{args.batch_size}, warm-up {args.warm}, seeds {' '.join(map(str, args.seeds))}")
    write_outputs(read_records(args.out_dir / "runs", args), args, caption)
    print((args.out_dir / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
