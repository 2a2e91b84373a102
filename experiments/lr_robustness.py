"""Learning-rate robustness and ablation of MimicNorm (the paper's learning-rate table), at any size.

Trains, through the CIFAR entry point (`Cifar/main.py`, one engine run per cell), every variant at
every learning rate, records the best test top-1 of each run and the test accuracy by epoch:

    None             <arch>_nobn
    WeightMean only  <arch>_nobn --weight mean
    LastBN only      <arch>_cbn             (only at --ablation-lr: the ablation curves)
    MimicNorm        <arch>_cbn --weight mean
    BN               <arch>

The default is the CPU size (about 15 minutes on 2 cores): VGG-16 at a quarter of its width
(`--width 0.25`) on a fixed class-balanced subset of the real CIFAR-10 images in --source (the
first 200 training and 100 test images of each class, sorted by file name), 5 epochs. The paper's size (VGG-16, all of CIFAR-100,
10 epochs, batch 256) on a GPU:

    python -m experiments.lr_robustness --width 1 --dataset cifar100 \
        --data-dir Cifar/data --epochs 10 --batch-size 256 --warm 2 --lrs 0.01 0.05 0.1 0.2 0.5 1.0

Outputs in --out-dir: runs.csv (one row per run and epoch), table.csv and table.md (best test
top-1 per variant and learning rate), curves.png (test top-1 by epoch, one panel per learning
rate, and best top-1 against learning rate). Engine runs (logs only) stay in --work-dir; the
experiment can be stopped and started again with the same command (`experiments.grid`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
from pathlib import Path

import pandas as pd

import models
from experiments.grid import extracted_tree, run_to_end, subset_tree
from experiments.tables import markdown_table, write_csv

REPO = Path(__file__).resolve().parents[1]
# variant -> (registry variant of the model, --weight)
VARIANTS = {
    "None": (models.NO_NORM, "none"),
    "WeightMean only": (models.NO_NORM, "mean"),
    "LastBN only": (models.MIMIC, "none"),
    "MimicNorm": (models.MIMIC, "mean"),
    "BN": (models.BN, "none"),
}
TABLE_VARIANTS = ("None", "WeightMean only", "MimicNorm", "BN")  # the paper's table columns


def settings_key(args: argparse.Namespace, arch: str) -> str:
    """A short hash of everything that changes a run's result except variant and lr."""
    keys = ("dataset", "data_dir", "source", "train_per_class", "test_per_class", "width",
            "epochs", "batch_size", "warm", "seed", "engine_args")
    text = json.dumps({"arch": arch, **{k: str(getattr(args, k)) for k in keys}}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def model_name(arch: str, variant: str) -> str:
    """The registry name trained for `variant` of `arch`."""
    return models.twin_name(arch, VARIANTS[variant][0])


def engine_argv(arch: str, variant: str, lr: float, data_dir: Path,
                args: argparse.Namespace) -> list[str]:
    """The `Cifar/main.py` flags of one run (where it goes aside)."""
    return ["-a", model_name(arch, variant), "--weight", VARIANTS[variant][1],
            "-ds", args.dataset, "--data-dir", str(data_dir), "--width", str(args.width),
            "-b", str(args.batch_size), "-lr", str(lr),
            "--epochs", str(args.epochs), "--warm", str(args.warm), "--seed", str(args.seed),
            "-j", str(args.workers), "--no-progress", *args.engine_args]


def run_name(variant: str, lr: float) -> str:
    """Folder name of one run: variant without spaces, then the learning rate."""
    return f"{variant.replace(' ', '_')}-lr{lr:g}"


def train_one(arch: str, variant: str, lr: float, data_dir: Path, run_root: Path,
              args: argparse.Namespace) -> pd.DataFrame:
    """Train one run to its end (or reuse it, or resume it); returns its log.csv. A run that
    diverged is a result: its log holds the epochs before."""
    run_dir = run_root / model_name(arch, variant) / run_name(variant, lr)
    print(run_to_end(run_dir, engine_argv(arch, variant, lr, data_dir, args), args.epochs),
          flush=True)
    return pd.read_csv(run_dir / "log.csv")


def best(values: list[float]) -> float:
    """Largest finite value, NaN if none."""
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) if finite else math.nan


def write_outputs(records: list[dict[str, object]], args: argparse.Namespace, caption: str) -> None:
    """runs.csv, table.csv, table.md and curves.png in --out-dir."""
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    runs = pd.DataFrame(records)
    write_csv(runs, out / "runs.csv")

    def acc(variant: str, lr: float) -> list[float]:
        return runs.loc[(runs["variant"] == variant) & (runs["lr"] == lr), "test_acc1"].tolist()

    table = pd.DataFrame([{"lr": lr, **{v: best(acc(v, lr)) for v in TABLE_VARIANTS}}
                          for lr in args.lrs])
    write_csv(table, out / "table.csv")
    epochs = [str(e) for e in range(1, args.epochs + 1)]
    ablation = pd.DataFrame([{"variant": v, **dict(zip(epochs, acc(v, args.ablation_lr))),
                              "best": best(acc(v, args.ablation_lr))} for v in VARIANTS],
                            columns=["variant", *epochs, "best"])
    lines = [caption, "", f"Best test top-1 (%) within {args.epochs} epochs:", "",
             markdown_table(table.assign(lr=table["lr"].map("{:g}".format)), floatfmt=".2f"),
             "", f"Ablation at lr {args.ablation_lr:g}: test top-1 (%) by epoch", "",
             markdown_table(ablation, floatfmt=".2f")]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    plot_curves(records, args, caption, out / "curves.png")


def plot_curves(records: list[dict[str, object]], args: argparse.Namespace, caption: str,
                path: Path) -> None:
    """One panel per learning rate (test top-1 by epoch per variant) and best top-1 against lr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = len(args.lrs) + 1
    cols = min(3, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    colours = dict(zip(VARIANTS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, lr in zip(axes.flat, args.lrs):
        for v in VARIANTS:
            mine = [r for r in records if r["variant"] == v and r["lr"] == lr]
            if mine:
                ax.plot([r["epoch"] for r in mine], [r["test_acc1"] for r in mine], marker="o",
                        markersize=3, label=v, color=colours[v])
        ax.set_title(f"lr {lr:g}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test top-1 (%)")
    ax = axes.flat[len(args.lrs)]
    for v in TABLE_VARIANTS:
        ax.plot(args.lrs, [best([r["test_acc1"] for r in records if r["variant"] == v
                                 and r["lr"] == lr]) for lr in args.lrs],
                marker="o", label=v, color=colours[v])
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"best test top-1 in {args.epochs} epochs (%)")
    ax.set_title("learning-rate robustness", fontsize=9)
    for extra in list(axes.flat)[panels:]:
        extra.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in axes.flat:  # the ablation panel holds every variant: take its legend
        h, lab = ax.get_legend_handles_labels()
        if len(h) > len(handles):
            handles, labels = h, lab
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
    p.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.05, 0.1, 0.2, 0.5])
    p.add_argument("--ablation-lr", type=float, default=0.1,
                   help="learning rate of the extra LastBN-only run (must be one of --lrs)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--warm", type=int, default=1, help="epochs of linear learning-rate warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", choices=("folder", "cifar10", "cifar100"), default="folder",
                   help="folder: a class-balanced subset of --source; cifar10/100: torchvision's "
                        "files in --data-dir, all images")
    p.add_argument("--source", type=Path, default=None,
                   help="ImageFolder root with train/ and test/, or a .tar.gz holding one "
                        "(needed with --dataset folder)")
    p.add_argument("--data-dir", type=Path, default=REPO / "Cifar" / "data",
                   help="torchvision CIFAR files (with --dataset cifar10/cifar100)")
    p.add_argument("--train-per-class", type=int, default=200, help="0: all (--dataset folder)")
    p.add_argument("--test-per-class", type=int, default=100, help="0: all (--dataset folder)")
    p.add_argument("-j", "--workers", type=int, default=0, help="data-loading processes")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/mimicnorm-experiments"),
                   help="extracted data, subset trees and engine runs (checkpoints deleted)")
    p.add_argument("--out-dir", type=Path, default=REPO / "results" / "lr_robustness")
    p.add_argument("--engine-args", nargs=argparse.REMAINDER, default=[],
                   help="further Cifar/main.py flags for every run, e.g. --amp --gpu 0 (last)")
    return p


def main(args: argparse.Namespace) -> list[dict[str, object]]:
    """Train every run, then write the tables and the plot; returns the per-epoch records."""
    if args.ablation_lr not in args.lrs:
        raise SystemExit(f"--ablation-lr {args.ablation_lr} must be one of --lrs {args.lrs}")
    if args.dataset == "folder" and args.source is None:
        raise SystemExit("--dataset folder needs --source: an ImageFolder tree or its .tar.gz")
    key = settings_key(args, args.arch)
    if args.dataset == "folder":
        root = extracted_tree(args.source, args.work_dir)
        per_class = {"train": args.train_per_class, "test": args.test_per_class}
        data_dir = subset_tree(root, args.work_dir / f"subset-{key}", per_class)
        size = f"CIFAR-10 subset: {args.train_per_class or 'all'} train / " \
               f"{args.test_per_class or 'all'} test images per class"
    else:
        data_dir, size = args.data_dir, f"{args.dataset}, all images"
    run_root = args.work_dir / f"runs-{key}"
    plan = [(v, lr) for lr in args.lrs for v in TABLE_VARIANTS] + [
        (v, args.ablation_lr) for v in VARIANTS if v not in TABLE_VARIANTS]
    records: list[dict[str, object]] = []
    for variant, lr in plan:
        for row in train_one(args.arch, variant, lr, data_dir, run_root, args).itertuples():
            records.append({"variant": variant, "lr": lr, "epoch": int(row.epoch),
                            "train_loss": float(row.train_loss),
                            "test_acc1": float(row.test_acc1),
                            "epoch_seconds": float(row.epoch_seconds)})
    caption = (f"{args.arch} at width {args.width:g}, {size}, {args.epochs} epochs, batch "
               f"{args.batch_size}, warm-up {args.warm}, seed {args.seed}")
    write_outputs(records, args, caption)
    print((args.out_dir / "table.md").read_text())
    return records


if __name__ == "__main__":
    main(get_args_parser().parse_args())
