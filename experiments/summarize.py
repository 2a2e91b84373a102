"""Summarise training runs: BN vs MimicNorm vs no norm over seeds, in the paper's table layout.

    python -m experiments.summarize RUNS_DIR [--out OUT_DIR]

Reads every run folder under RUNS_DIR (any folder holding args.json and log.csv, as
`Cifar/main.py` writes them) and writes to OUT_DIR (default RUNS_DIR):

* runs.parquet: one row per run and epoch (run, arch, variant, seed, width, dataset, setting,
  finished, then the log.csv columns);
* summary.csv: per setting, arch and variant, the finished runs' last-epoch and best (max over
  epochs) test top-1 mean and std, mean peak memory and images/s;
* table.md: rows = architectures, columns = variants, MimicNorm - BN with its standard error,
  memory and speed ratios, the paper's figures beside ours when the setting is the paper's;
* curves.png (curves-<k>.png for the k-th of several settings): test top-1 by epoch.

Runs are compared only within a setting: the dataset, its data (basename of data_dir for
"folder", synthetic_size for "synthetic") and the RECIPE_KEYS flags. A run that diverged (its
folder holds diverged.txt, or its last test top-1 is NaN) is listed, not averaged. A run whose
log.csv repeats an epoch or holds an accuracy outside 0-100 is skipped, with a line saying so.
Names that are not UTF-8 (a run folder `r\\xff`) are written with `\\xNN` escapes.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from pathlib import Path

if __package__ in (None, ""):  # run as a file: python experiments/summarize.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402

import models  # noqa: E402
from experiments.tables import markdown_table, write_csv  # noqa: E402

LOG_COLUMNS = ("epoch", "lr", "train_loss", "train_acc1", "test_loss", "test_acc1", "test_acc5",
               "epoch_seconds", "images_per_second", "peak_memory_mb")
DIVERGED = "diverged.txt"  # written into a run folder by experiments.grid when a run diverged
ACCURACIES = ("train_acc1", "test_acc1", "test_acc5")  # percentages
REQUIRED_ARGS = ("arch", "dataset", "epochs", "seed")
RECIPE_KEYS = ("width", "epochs", "batch_size", "lr", "weight_decay", "momentum", "warm",
               "milestones", "gamma", "max_steps")
DATA_KEY = {"folder": "data_dir", "synthetic": "synthetic_size"}
# (registry variant of the arch, --weight) -> variant; the first three are the paper's columns,
# in its order
VARIANTS = {(models.BN, "none"): "BN", (models.MIMIC, "mean"): "MimicNorm",
            (models.NO_NORM, "none"): "NoNorm", (models.NO_NORM, "mean"): "WeightMean only",
            (models.MIMIC, "none"): "LastBN only", (models.BN, "mean"): "BN + weight mean"}
VARIANT_ORDER = tuple(VARIANTS.values())
PAPER_SETTING = {"dataset": "cifar100", "width": 1, "epochs": 150}
# The paper's CIFAR-100 top-1 (%): mean, std of 3 runs (NaN: not given), training memory (MB)
PAPER = {
    "vgg11": {"BN": (67.90, 0.14, 2971), "MimicNorm": (67.87, 0.20, 2851),
              "NoNorm": (65.33, math.nan, 2831)},
    "vgg16": {"BN": (72.28, 0.05, 3745), "MimicNorm": (72.47, 0.02, 3489),
              "NoNorm": (68.97, math.nan, 3469)},
    "resnet18": {"BN": (74.72, 0.31, 4447), "MimicNorm": (74.96, 0.14, 4157)},
    "resnet50": {"BN": (78.53, 0.26, 8533), "MimicNorm": (77.91, 0.20, 7533)},
    "squeezenet": {"BN": (70.88, 0.08, 3687), "MimicNorm": (71.15, 0.10, 2693)},
    "shufflenetv2": {"BN": (71.10, 0.49, 3915), "MimicNorm": (70.93, 0.13, 3141)},
}
MINUS = "\u2212"


class RunError(ValueError):
    """Why a run folder cannot be read."""


class NoEpochLogged(RunError):
    """log.csv holds its header only: the run stopped in its first epoch."""


def read_args(path: Path) -> dict[str, object]:
    """The flags in a run's args.json; RunError if unreadable or lacking REQUIRED_ARGS."""
    try:
        flags = pd.read_json(path, typ="series", dtype=False).to_dict()
    except OSError as e:
        raise RunError(f"cannot read args.json ({e.strerror})") from None
    except ValueError:
        raise RunError("args.json is not valid JSON") from None
    missing = [k for k in REQUIRED_ARGS if k not in flags]
    if missing:
        raise RunError(f"args.json lacks {', '.join(missing)}")
    return flags


def read_log(path: Path) -> pd.DataFrame:
    """The LOG_COLUMNS of a run's log.csv, as numbers; RunError if missing, empty or unreadable."""
    if not path.is_file():
        raise RunError("no log.csv")
    try:
        log = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise RunError("log.csv is empty") from None
    except OSError as e:
        raise RunError(f"cannot read log.csv ({e.strerror})") from None
    except ValueError:
        raise RunError("log.csv is not a readable CSV file") from None
    if log.empty:
        raise NoEpochLogged("log.csv holds no epoch")
    missing = [c for c in LOG_COLUMNS if c not in log.columns]
    if missing:
        raise RunError(f"log.csv lacks {', '.join(missing)}")
    numbers = log[list(LOG_COLUMNS)].apply(pd.to_numeric, errors="coerce")
    bad = [c for c in LOG_COLUMNS if (numbers[c].isna() & log[c].notna()).any()
           or (c == "epoch" and numbers[c].isna().any())]
    if bad:
        raise RunError(f"log.csv has non-numbers in {', '.join(bad)}")
    repeated = numbers["epoch"][numbers["epoch"].duplicated()]
    if not repeated.empty:
        raise RunError(f"log.csv has epoch {int(repeated.iloc[0])} more than once")
    for column in ACCURACIES:
        outside = numbers[column][~numbers[column].between(0, 100) & numbers[column].notna()]
        if not outside.empty:
            raise RunError(f"log.csv has {column} outside 0-100 ({outside.iloc[0]:g})")
    return numbers.astype({"epoch": "int64"}).sort_values("epoch", ignore_index=True)


def printable(text: str) -> str:
    """`text` with the undecodable bytes of a file name (Python's surrogate escapes) as `\\xNN`
    (any other lone surrogate as `\\uNNNN`): what UTF-8 files, parquet and terminals take."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def final_accuracy_is_nan(log: pd.DataFrame) -> bool:
    """Whether the last logged epoch has no test top-1 (a run that diverged)."""
    return bool(log["test_acc1"].isna().iloc[-1])


def variant_of(arch: str, weight: str) -> tuple[str, str]:
    """(base arch, variant) of a run of `arch` with `--weight weight`."""
    base, model_variant = models.parse_name(arch)
    variant = VARIANTS.get((model_variant, weight))
    if variant is None:
        raise RunError(f"unknown --weight {weight!r}")
    return base, variant


def _plain(value: object) -> object:
    """JSON-ready flag value: NaN as None, integral floats as int."""
    if isinstance(value, float):
        return None if math.isnan(value) else int(value) if value.is_integer() else value
    return value


def setting_of(flags: dict[str, object]) -> str:
    """The recipe runs must share to be compared, as `key=<json>, ...` (see `parse_setting`)."""
    fields = {"dataset": flags["dataset"]}
    data_key = DATA_KEY.get(str(flags["dataset"]))
    if data_key == "data_dir":
        fields[data_key] = printable(Path(str(flags.get(data_key))).name)
    elif data_key:
        fields[data_key] = flags.get(data_key)
    fields |= {k: flags.get(k, 1.0 if k == "width" else None) for k in RECIPE_KEYS}
    return ", ".join(f"{k}={json.dumps(_plain(v), ensure_ascii=False)}" for k, v in fields.items())


def parse_setting(setting: str) -> dict[str, object]:
    """The fields of a `setting_of` string."""
    decoder, fields, pos = json.JSONDecoder(), {}, 0
    while pos < len(setting):
        equals = setting.index("=", pos)
        fields[setting[pos:equals]], pos = decoder.raw_decode(setting, equals + 1)
        pos += len(", ")
    return fields


def read_run(folder: Path, root: Path) -> pd.DataFrame:
    """One row per epoch of the run in `folder`: its identity columns, then the log's."""
    flags = read_args(folder / "args.json")
    diverged = (folder / DIVERGED).exists()
    try:
        log = read_log(folder / "log.csv")
    except NoEpochLogged:
        if not diverged:
            raise
        # Diverged in its first epoch: one placeholder row (epoch 0, no metrics) keeps it listed.
        log = pd.DataFrame({c: [0 if c == "epoch" else math.nan] for c in LOG_COLUMNS})
    diverged = diverged or final_accuracy_is_nan(log)
    arch, variant = variant_of(str(flags["arch"]), str(flags.get("weight", "none")))
    try:
        seed, epochs = int(flags["seed"]), int(flags["epochs"])
        width = float(flags.get("width", 1.0))
    except (TypeError, ValueError):
        raise RunError("args.json: seed, epochs and width must be numbers") from None
    ident = {"run": printable(folder.relative_to(root).as_posix()), "arch": printable(arch),
             "variant": variant, "seed": seed, "width": width,
             "dataset": printable(str(flags["dataset"])),
             "setting": setting_of(flags), "finished": len(log) >= epochs,
             "diverged": diverged, "on_cpu": flags.get("gpu") == [-1]}
    return pd.concat([pd.DataFrame(ident, index=log.index), log], axis=1)


def load_runs(root: Path) -> tuple[pd.DataFrame, list[str]]:
    """Every readable run under `root` (one row per run and epoch) and a "skipped <path>: <why>"
    line for each run folder that is not."""
    folders = sorted(p.parent for p in root.rglob("args.json")) if root.is_dir() else []
    frames, problems = [], []
    for folder in folders:
        try:
            frames.append(read_run(folder, root))
        except RunError as e:
            problems.append(f"skipped {printable(str(folder))}: {e}")
    return (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()), problems


def differing_keys(settings: list[str]) -> list[str]:
    """The setting keys whose values are not the same in all of `settings`."""
    fields = [parse_setting(s) for s in settings]
    keys = list(dict.fromkeys(k for f in fields for k in f))
    return [k for k in keys if len({json.dumps(f.get(k)) for f in fields}) > 1]


def _last(values: pd.Series) -> float:
    """The last value (NaN included, unlike groupby's "last")."""
    return values.iloc[-1]


def averaged(runs: pd.DataFrame) -> pd.DataFrame:
    """The rows of the runs that enter the means: finished, not diverged."""
    return runs[runs["finished"] & ~runs["diverged"]]


def run_scores(runs: pd.DataFrame) -> pd.DataFrame:
    """Per averaged run: last-epoch and best test top-1, last-epoch train top-1, largest peak
    memory, mean images/s."""
    done = averaged(runs).sort_values(["run", "epoch"])
    return done.groupby(["setting", "arch", "variant", "run"], as_index=False).agg(
        last=("test_acc1", _last), best=("test_acc1", "max"), train_last=("train_acc1", _last),
        peak_memory_mb=("peak_memory_mb", "max"), images_per_second=("images_per_second", "mean"))


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Per setting, arch and variant: n averaged runs, last-epoch and best test top-1 and
    last-epoch train top-1 mean and sample std (ddof=1, NaN for n=1), mean of the runs' peak
    memory and of their images/s."""
    summary = run_scores(runs).groupby(["setting", "arch", "variant"], as_index=False).agg(
        n=("run", "size"), last_mean=("last", "mean"), last_std=("last", "std"),
        best_mean=("best", "mean"), best_std=("best", "std"),
        train_last_mean=("train_last", "mean"), train_last_std=("train_last", "std"),
        peak_memory_mb=("peak_memory_mb", "mean"),
        images_per_second=("images_per_second", "mean"))
    rank = summary["variant"].map(VARIANT_ORDER.index)
    return summary.assign(rank=rank).sort_values(["setting", "arch", "rank"]).drop(
        columns="rank").reset_index(drop=True)


def mean_std(mean: float, std: float) -> str:
    """The mean ± std with 2 decimals (the mean alone when std is NaN)."""
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def difference(a: dict | None, b: dict | None, key: str) -> str:
    """Mean of `key` in summary row `a` minus that in `b` ± its standard error, "*" when
    |difference| > 2 standard errors; "-" when a row is missing."""
    if a is None or b is None:
        return "-"
    diff = a[f"{key}_mean"] - b[f"{key}_mean"]
    se = math.sqrt(a[f"{key}_std"] ** 2 / a["n"] + b[f"{key}_std"] ** 2 / b["n"])
    if math.isnan(se):
        return f"{diff:+.2f}"
    return f"{diff:+.2f} ± {se:.2f}" + (" *" if abs(diff) > 2 * se else "")


def ratio(a: dict | None, b: dict | None, key: str) -> float:
    """`key` of summary row `a` over that of `b`, NaN when a row is missing."""
    return a[key] / b[key] if a is not None and b is not None and b[key] else math.nan


def paper_cell(arch: str, variant: str, memory: bool = False) -> str:
    """The paper's top-1 of `variant` of `arch` (and its memory), "-" where it gives none."""
    figures = PAPER.get(arch, {}).get(variant)
    if figures is None:
        return "-"
    mean, std, mb = figures
    return mean_std(mean, std) + (f" ({mb} MB)" if memory else "")


def paper_memory_ratio(arch: str) -> float:
    """The paper's MimicNorm / BN training memory of `arch`, NaN if not given."""
    figures = PAPER.get(arch, {})
    if "BN" not in figures or "MimicNorm" not in figures:
        return math.nan
    return figures["MimicNorm"][2] / figures["BN"][2]


def arch_table(summary: pd.DataFrame, with_paper: bool) -> pd.DataFrame:
    """The table of one setting: a row per arch, a "last / best (n)" cell per variant, then
    MimicNorm - BN (last epoch, then best epoch) and the memory and speed ratios (with the
    paper's figures if `with_paper`)."""
    present = [v for v in VARIANT_ORDER if v in set(summary["variant"])]
    rows = []
    for arch, group in summary.groupby("arch"):
        cells = {r["variant"]: r for r in group.to_dict("records")}
        row: dict[str, object] = {"arch": arch}
        for v in present:
            r = cells.get(v)
            row[v] = "-" if r is None else (f"{mean_std(r['last_mean'], r['last_std'])} / "
                                            f"{mean_std(r['best_mean'], r['best_std'])} "
                                            f"({r['n']})")
            if with_paper and v in VARIANT_ORDER[:3]:
                row[f"paper {v}"] = paper_cell(arch, v)
        mimic, bn = cells.get("MimicNorm"), cells.get("BN")
        row[f"MimicNorm {MINUS} BN last"] = difference(mimic, bn, "last")
        row[f"MimicNorm {MINUS} BN best"] = difference(mimic, bn, "best")
        row["memory MimicNorm/BN"] = ratio(mimic, bn, "peak_memory_mb")
        if with_paper:
            row["paper memory MimicNorm/BN"] = paper_memory_ratio(arch)
        row["images/s MimicNorm/BN"] = ratio(mimic, bn, "images_per_second")
        rows.append(row)
    return pd.DataFrame(rows)


def paper_table() -> pd.DataFrame:
    """The paper's figures: top-1 mean ± std (memory MB) per arch and variant."""
    return pd.DataFrame([{"arch": arch, **{v: paper_cell(arch, v, memory=True)
                                           for v in VARIANT_ORDER[:3]}} for arch in PAPER])


def is_paper_setting(setting: str) -> bool:
    """Whether `setting` is the paper's: CIFAR-100, full width, 150 epochs."""
    fields = parse_setting(setting)
    return all(fields.get(k) == v for k, v in PAPER_SETTING.items())


NOTES = [
    "- Each variant's cell: last-epoch test top-1 (%) mean ± std / best test top-1 (max over "
    "epochs, chosen on the test set: optimistic) mean ± std (n finished seeds); std is the "
    "sample std (ddof=1). The last epoch is the headline.",
    f"- MimicNorm {MINUS} BN: difference of the means ± its standard error "
    "sqrt(s_MimicNorm²/n_MimicNorm + s_BN²/n_BN); * marks a difference larger than 2 standard "
    "errors.",
    "- memory: mean over seeds of each run's largest peak_memory_mb; images/s: mean over epochs "
    "and seeds.",
]


def unfinished_lines(runs: pd.DataFrame) -> list[str]:
    """The "Unfinished runs" list of one setting's runs: unfinished or diverged ([] when every
    run is averaged)."""
    unfinished = runs[~runs["finished"] | runs["diverged"]].sort_values(["run", "epoch"])
    if unfinished.empty:
        return []
    epochs = parse_setting(unfinished["setting"].iloc[0])["epochs"]
    counts = unfinished.groupby("run").agg(epochs=("epoch", lambda e: int((e > 0).sum())),
                                           diverged=("diverged", "any"),
                                           nan=("test_acc1", lambda a: bool(a.isna().iloc[-1])))
    return ["", "Unfinished runs (not in the means):", ""] + [
        f"- {run}: {row.epochs} of {epochs} epochs" + (", diverged" if row.diverged else "")
        + (" (last test top-1 is NaN)" if row.nan and row.epochs else "")
        for run, row in counts.iterrows()]


def setting_section(setting: str, summary: pd.DataFrame, runs: pd.DataFrame, title: str) -> str:
    """The markdown section of one setting: heading, table, notes, unfinished runs."""
    lines = [f"## {title}: {setting}", ""]
    if summary.empty:
        lines.append("No finished runs.")
    else:
        paper = is_paper_setting(setting)
        table, notes = arch_table(summary, paper), list(NOTES)
        if runs["on_cpu"].all():
            table["memory MimicNorm/BN"] = math.nan
            notes.append("- memory: left out, these runs were on the CPU (`--gpu -1`), where "
                         "log.csv's peak_memory_mb is the process's peak resident set, libraries "
                         "and earlier runs of the same process included.")
        lines += [markdown_table(table), "", *notes]
        if paper:
            lines.append("- paper: the paper's CIFAR-100 top-1 (%), mean ± std of 3 runs; paper "
                         "memory: the ratio of its training memory (MB).")
        else:
            lines += ["", "The setting differs from the paper's (dataset cifar100, width 1, "
                      "150 epochs), so the paper's column is left out; the paper's CIFAR-100 "
                      "top-1 (%), mean ± std of 3 runs (training memory), for reference:", "",
                      markdown_table(paper_table())]
    return "\n".join(lines + unfinished_lines(runs)) + "\n"


def markdown_report(summary: pd.DataFrame, runs: pd.DataFrame) -> str:
    """table.md: one section per setting of `runs` (sorted), with `summary`'s rows."""
    settings = sorted(runs["setting"].unique())
    sections = ["# Test top-1 by architecture and variant\n"]
    for k, setting in enumerate(settings, 1):
        title = "Setting" if len(settings) == 1 else f"Setting {k} (curves-{k}.png)"
        sections.append(setting_section(setting, summary[summary["setting"] == setting],
                                        runs[runs["setting"] == setting], title))
    return "\n".join(sections)


def plot_curves(runs: pd.DataFrame, path: Path, title: str) -> None:
    """One panel per arch: test top-1 by epoch of each variant's finished runs, mean line and
    min-max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    archs = sorted(runs["arch"].unique())
    cols = min(3, len(archs))
    rows = math.ceil(len(archs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    colours = dict(zip(VARIANT_ORDER, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    done = averaged(runs)
    for ax, arch in zip(axes.flat, archs):
        for variant in VARIANT_ORDER:
            mine = done[(done["arch"] == arch) & (done["variant"] == variant)]
            if mine.empty:
                continue
            by_epoch = mine.groupby("epoch")["test_acc1"].agg(["mean", "min", "max"])
            ax.plot(by_epoch.index, by_epoch["mean"], label=variant, color=colours[variant])
            ax.fill_between(by_epoch.index, by_epoch["min"], by_epoch["max"], alpha=0.2,
                            color=colours[variant])
        ax.set_title(arch, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("test top-1 (%)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for extra in list(axes.flat)[len(archs):]:
        extra.axis("off")
    fig.suptitle(textwrap.fill(f"test top-1, mean and min-max over seeds; {title}", 110),
                 fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(runs: pd.DataFrame, out: Path) -> list[Path]:
    """runs.parquet, summary.csv, table.md and the curves in `out`; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    runs.to_parquet(out / "runs.parquet", engine="pyarrow", index=False)
    summary = summarize(runs)
    write_csv(summary, out / "summary.csv")
    (out / "table.md").write_text(markdown_report(summary, runs))
    settings = sorted(runs["setting"].unique())
    curves = [out / ("curves.png" if len(settings) == 1 else f"curves-{k}.png")
              for k in range(1, len(settings) + 1)]
    for setting, path in zip(settings, curves):
        plot_curves(runs[runs["setting"] == setting], path, setting)
    return [out / "runs.parquet", out / "summary.csv", out / "table.md", *curves]


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs_dir", type=Path, metavar="RUNS_DIR",
                        help="searched at any depth for run folders (args.json and log.csv)")
    parser.add_argument("--out", type=Path, metavar="OUT_DIR", help="default: RUNS_DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Summarise the runs under RUNS_DIR; 0 when written, 2 when there is no run, 1 when the
    outputs cannot be written."""
    args = get_args_parser().parse_args(argv)
    if not args.runs_dir.is_dir():
        what = "is a file" if args.runs_dir.exists() else "does not exist"
        print(f"error: RUNS_DIR {printable(str(args.runs_dir))} {what}: give the folder "
              "holding the run folders", file=sys.stderr)
        return 2
    runs, problems = load_runs(args.runs_dir)
    for line in problems:
        print(line, file=sys.stderr)
    if runs.empty:
        print(f"error: no runs under {printable(str(args.runs_dir))} (folders holding args.json "
              "and log.csv)", file=sys.stderr)
        return 2
    for run in nan_runs(runs):
        print(f"run {run}: its last test top-1 is NaN: listed as diverged, not in the means",
              file=sys.stderr)
    settings = sorted(runs["setting"].unique())
    if len(settings) > 1:
        print(f"runs of {len(settings)} settings, differing in "
              f"{', '.join(differing_keys(settings))}: each gets its own table")
    out = args.out or args.runs_dir
    try:
        written = write_outputs(runs, out)
    except OSError as e:
        print(f"error: cannot write to {printable(str(out))}: {e.strerror or e}",
              file=sys.stderr)
        return 1
    print("wrote " + ", ".join(printable(str(p)) for p in written))
    return 0


def nan_runs(runs: pd.DataFrame) -> list[str]:
    """The runs whose last logged epoch has a NaN test top-1."""
    last = runs.sort_values("epoch").groupby("run").tail(1)
    return sorted(last.loc[last["test_acc1"].isna() & (last["epoch"] > 0), "run"])


if __name__ == "__main__":
    sys.exit(main())
