"""experiments.summarize on run folders written by hand (no training), numbers checked by hand."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from experiments import summarize, tables

HEADER = ("epoch,lr,train_loss,train_acc1,test_loss,test_acc1,test_acc5,epoch_seconds,"
          "images_per_second,peak_memory_mb")
RECIPE = {"dataset": "folder", "data_dir": "/data/cifar10-sub", "synthetic_size": [5000, 1000],
          "batch_size": 128, "lr": 0.1, "weight_decay": 0.0005, "momentum": 0.9, "epochs": 3,
          "warm": 1, "milestones": [2], "gamma": 0.1, "max_steps": None, "width": 0.25,
          "workers": 2}
# test top-1 by epoch of seeds 0, 1, 2
CURVES = {
    # best 30, 32, 34 (mean 32, std 2); final 30, 30, 33 (mean 31, std sqrt(3))
    ("resnet18", "none"): [[20, 30, 30], [25, 32, 30], [22, 34, 33]],
    # best = final = 36, 37, 38 (mean 37, std 1)
    ("resnet18_cbn", "mean"): [[30, 36, 36], [31, 37, 37], [33, 38, 38]],
    # best = final = 40, 41, 42 (mean 41, std 1)
    ("vgg11", "none"): [[35, 40, 40], [35, 41, 41], [35, 42, 42]],
    # best = final = 40, 42, 44 (mean 42, std 2)
    ("vgg11_cbn", "mean"): [[30, 40, 40], [30, 42, 42], [30, 44, 44]],
}
MEMORY = {"none": [100, 110, 120], "mean": [80, 85, 90]}  # run peaks 120 and 90: ratio 0.75
SPEED = {"none": 1000, "mean": 1100}  # images/s ratio 1.1
TRAIN_OVER_TEST = 5  # train top-1 of every epoch: its test top-1 + 5


def write_run(root: Path, arch: str, weight: str, seed: int, accs: list[float],
              name: str | None = None, **flags: object) -> Path:
    """A run folder as Cifar/main.py writes it, with test top-1 `accs` by epoch."""
    folder = root / arch / (name or f"s{seed}")
    folder.mkdir(parents=True)
    args = {**RECIPE, "arch": arch, "weight": weight, "seed": seed, **flags}
    (folder / "args.json").write_text(json.dumps(args, indent=2))
    memory = MEMORY[weight] + [MEMORY[weight][-1]] * len(accs)
    rows = [f"{e},0.1,1.5,{acc + TRAIN_OVER_TEST},1.2,{acc},90,2.5,{SPEED[weight]},{memory[e - 1]}"
            for e, acc in enumerate(accs, 1)]
    (folder / "log.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    (folder / "last.pt").write_bytes(b"not read")
    return folder


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    """Three seeds of BN and MimicNorm for resnet18 and vgg11, one NoNorm seed of resnet18."""
    root = tmp_path / "runs"
    for (arch, weight), curves in CURVES.items():
        for seed, accs in enumerate(curves):
            write_run(root, arch, weight, seed, accs)
    write_run(root, "resnet18_nobn", "none", 0, [10, 15, 12])
    return root


def run_main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = summarize.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_summary_means_stds_and_counts(runs_dir: Path) -> None:
    runs, problems = summarize.load_runs(runs_dir)
    assert problems == []
    summary = summarize.summarize(runs).set_index(["arch", "variant"])
    bn, mimic = summary.loc[("resnet18", "BN")], summary.loc[("resnet18", "MimicNorm")]
    assert bn["n"] == 3 and bn["best_mean"] == 32 and bn["best_std"] == pytest.approx(2)
    assert bn["last_mean"] == 31 and bn["last_std"] == pytest.approx(math.sqrt(3))
    # the last epoch's train top-1 (36), not the best epoch's (37)
    assert bn["train_last_mean"] == 36 and bn["train_last_std"] == pytest.approx(math.sqrt(3))
    assert mimic["best_mean"] == 37 and mimic["best_std"] == pytest.approx(1)
    assert summary.loc[("vgg11", "MimicNorm"), "best_std"] == pytest.approx(2)
    assert bn["peak_memory_mb"] == 120 and mimic["peak_memory_mb"] == 90
    assert bn["images_per_second"] == 1000
    nonorm = summary.loc[("resnet18", "NoNorm")]
    assert nonorm["n"] == 1 and nonorm["best_mean"] == 15 and nonorm["last_mean"] == 12
    assert math.isnan(nonorm["best_std"])
    assert list(summary.index.get_level_values("variant")) == [
        "BN", "MimicNorm", "NoNorm", "BN", "MimicNorm"]


def test_table_shows_cells_differences_and_marks(runs_dir: Path, capsys) -> None:
    code, out, err = run_main([str(runs_dir)], capsys)
    assert code == 0 and err == ""
    table = (runs_dir / "table.md").read_text()
    rows = {arch: next(line for line in table.splitlines() if line.startswith(f"| {arch} |"))
            for arch in ("resnet18", "vgg11")}  # our table's rows, before the paper's
    # resnet18: last 37 - 31 = 6, SE sqrt(1/3 + 3/3) = 1.15 (marked);
    # best 37 - 32 = 5, SE sqrt(1/3 + 4/3) = 1.29 (5 > 2.58: marked)
    assert rows["resnet18"] == ("| resnet18 | 31.00 ± 1.73 / 32.00 ± 2.00 (3) | "
                                "37.00 ± 1.00 / 37.00 ± 1.00 (3) | 12.00 / 15.00 (1) | "
                                "+6.00 ± 1.15 * | +5.00 ± 1.29 * | 0.750 | 1.100 |")
    # vgg11: last and best 42 - 41 = 1, SE sqrt(4/3 + 1/3) = 1.29 (1 < 2.58: not marked)
    assert rows["vgg11"] == ("| vgg11 | 41.00 ± 1.00 / 41.00 ± 1.00 (3) | "
                             "42.00 ± 2.00 / 42.00 ± 2.00 (3) | - | "
                             "+1.00 ± 1.29 | +1.00 ± 1.29 | 0.750 | 1.100 |")
    assert "| arch | BN | MimicNorm | NoNorm | MimicNorm − BN last | MimicNorm − BN best |" in table
    assert "The last epoch is the headline." in table
    assert "* marks a difference larger than 2 standard errors" in table
    assert "so the paper's column is left out" in table
    assert "| resnet18 | 74.72 ± 0.31 (4447 MB) | 74.96 ± 0.14 (4157 MB) | - |" in table


def test_standard_error_of_a_difference_by_hand() -> None:
    a = {"best_mean": 10.0, "best_std": 3.0, "n": 3}
    b = {"best_mean": 7.0, "best_std": 4.0, "n": 4}
    # SE = sqrt(9/3 + 16/4) = sqrt(7) = 2.6458; 3 < 5.29
    assert summarize.difference(a, b, "best") == "+3.00 ± 2.65"
    assert summarize.difference(b, {**a, "best_mean": 13.0}, "best") == "-6.00 ± 2.65 *"
    assert summarize.difference({**a, "best_std": math.nan, "n": 1}, b, "best") == "+3.00"
    assert summarize.difference(None, b, "best") == "-"


def test_runs_parquet_round_trips(runs_dir: Path, capsys) -> None:
    assert run_main([str(runs_dir)], capsys)[0] == 0
    written = summarize.load_runs(runs_dir)[0]
    back = pd.read_parquet(runs_dir / "runs.parquet")
    pd.testing.assert_frame_equal(back, written, check_dtype=True)
    assert list(back.columns[:8]) == ["run", "arch", "variant", "seed", "width", "dataset",
                                      "setting", "finished"]
    assert len(back) == 13 * 3 and back["finished"].all()
    first = back.iloc[0]
    assert (first["run"], first["arch"], first["variant"], first["seed"]) == (
        "resnet18/s0", "resnet18", "BN", 0)
    assert first["width"] == 0.25 and first["dataset"] == "folder"
    assert first["setting"] == (
        'dataset="folder", data_dir="cifar10-sub", width=0.25, epochs=3, batch_size=128, '
        'lr=0.1, weight_decay=0.0005, momentum=0.9, warm=1, milestones=[2], gamma=0.1, '
        'max_steps=null')


def test_summary_csv_has_one_row_per_arch_and_variant(runs_dir: Path, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert run_main([str(runs_dir), "--out", str(out)], capsys)[0] == 0
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == [
        "setting", "arch", "variant", "n", "last_mean", "last_std", "best_mean", "best_std",
        "train_last_mean", "train_last_std", "peak_memory_mb", "images_per_second"]
    assert len(summary) == 5 and summary["n"].tolist() == [3, 3, 1, 3, 3]
    assert not (runs_dir / "summary.csv").exists()


def test_curves_png_is_written(runs_dir: Path, capsys) -> None:
    assert run_main([str(runs_dir)], capsys)[0] == 0
    png = (runs_dir / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000


@pytest.mark.parametrize("make", ["empty", "missing"])
def test_no_runs_is_an_error(tmp_path: Path, make: str, capsys) -> None:
    root = tmp_path / "runs"
    if make == "empty":
        (root / "resnet18" / "s0").mkdir(parents=True)
    code, out, err = run_main([str(root)], capsys)
    assert code == 2 and out == ""
    if make == "missing":
        assert err == (f"error: RUNS_DIR {root} does not exist: give the folder holding the run "
                       "folders\n")
    else:
        assert err == f"error: no runs under {root} (folders holding args.json and log.csv)\n"


@pytest.mark.parametrize("damage, why", [
    ("no log", "no log.csv"),
    ("empty log", "log.csv is empty"),
    ("header only", "log.csv holds no epoch"),
    ("text in log", "log.csv has non-numbers in test_acc1, test_acc5"),
    ("bad args", "args.json is not valid JSON"),
    ("no seed", "args.json lacks seed"),
])
def test_a_broken_run_is_skipped_and_the_rest_summarised(runs_dir: Path, damage: str, why: str,
                                                         capsys) -> None:
    folder = write_run(runs_dir, "resnet18", "none", 7, [1, 2, 3])
    if damage == "no log":
        (folder / "log.csv").unlink()
    elif damage == "empty log":
        (folder / "log.csv").write_text("")
    elif damage == "header only":
        (folder / "log.csv").write_text(HEADER + "\n")
    elif damage == "text in log":
        (folder / "log.csv").write_text(f"{HEADER}\n1,0.1,1,1,1,high,top,1,1,1\n")
    elif damage == "bad args":
        (folder / "args.json").write_text("{not json")
    else:
        (folder / "args.json").write_text(json.dumps({**RECIPE, "arch": "resnet18"}))
    code, out, err = run_main([str(runs_dir)], capsys)
    assert code == 0
    assert err == f"skipped {folder}: {why}\n"
    summary = pd.read_csv(runs_dir / "summary.csv")
    assert summary["n"].tolist() == [3, 3, 1, 3, 3]


def test_unfinished_run_is_listed_not_averaged(runs_dir: Path, capsys) -> None:
    write_run(runs_dir, "resnet18", "none", 9, [90, 95])
    code, _, err = run_main([str(runs_dir)], capsys)
    assert code == 0 and err == ""
    table = (runs_dir / "table.md").read_text()
    assert "Unfinished runs (not in the means):\n\n- resnet18/s9: 2 of 3 epochs\n" in table
    assert "| resnet18 | 31.00 ± 1.73 / 32.00 ± 2.00 (3) |" in table
    runs = pd.read_parquet(runs_dir / "runs.parquet")
    unfinished = runs[runs["run"] == "resnet18/s9"]
    assert len(unfinished) == 2 and not unfinished["finished"].any()
    assert runs["finished"].sum() == 13 * 3


def test_a_diverged_run_is_listed_as_diverged(runs_dir: Path, capsys) -> None:
    folder = write_run(runs_dir, "vgg11_nobn", "none", 0, [10])
    (folder / summarize.DIVERGED).write_text("the run diverged\n")
    assert run_main([str(runs_dir)], capsys)[0] == 0
    assert "- vgg11_nobn/s0: 1 of 3 epochs, diverged\n" in (runs_dir / "table.md").read_text()
    early = write_run(runs_dir, "vgg16_nobn", "none", 0, [])  # diverged in its first epoch
    (early / summarize.DIVERGED).write_text("the run diverged\n")
    assert run_main([str(runs_dir)], capsys)[0] == 0
    assert "- vgg16_nobn/s0: 0 of 3 epochs, diverged\n" in (runs_dir / "table.md").read_text()
    runs = pd.read_parquet(runs_dir / "runs.parquet")
    assert runs.loc[runs["run"] == "vgg11_nobn/s0", "diverged"].tolist() == [True]
    assert not runs.loc[~runs["run"].str.endswith("_nobn/s0"), "diverged"].any()


def test_memory_ratio_is_left_out_for_cpu_runs(tmp_path: Path, capsys) -> None:
    root = tmp_path / "runs"
    for (arch, weight), curves in CURVES.items():
        for seed, accs in enumerate(curves):
            write_run(root, arch, weight, seed, accs, gpu=[-1])
    assert run_main([str(root)], capsys)[0] == 0
    table = (root / "table.md").read_text()
    assert "- memory: left out, these runs were on the CPU" in table
    row = next(line for line in table.splitlines() if line.startswith("| resnet18 |"))
    assert row.split(" | ")[-2] == "-"  # memory MimicNorm/BN, before images/s


def test_log_columns_are_the_engines() -> None:
    """summarize keeps its own copy so that it runs without importing torch."""
    from training.logger import LOG_COLUMNS
    assert summarize.LOG_COLUMNS == LOG_COLUMNS


def test_mixed_settings_get_one_line_and_a_section_each(runs_dir: Path, capsys) -> None:
    for seed in range(2):
        write_run(runs_dir, "resnet18", "none", seed, [50, 60], name=f"long-s{seed}",
                  epochs=2, lr=0.05)
    code, out, err = run_main([str(runs_dir)], capsys)
    assert code == 0 and err == ""
    assert out.splitlines()[0] == (
        "runs of 2 settings, differing in epochs, lr: each gets its own table")
    table = (runs_dir / "table.md").read_text()
    headings = [line for line in table.splitlines() if line.startswith("## ")]
    assert len(headings) == 2
    assert headings[0].startswith("## Setting 1 (curves-1.png): ")
    assert "epochs=2" in headings[0] and "epochs=3" in headings[1]
    assert "| resnet18 | 60.00 ± 0.00 / 60.00 ± 0.00 (2) | - | - | - | - |" in table
    summary = pd.read_csv(runs_dir / "summary.csv")
    assert len(summary) == 6 and summary["setting"].nunique() == 2
    assert (runs_dir / "curves-1.png").stat().st_size > 0
    assert (runs_dir / "curves-2.png").stat().st_size > 0
    assert not (runs_dir / "curves.png").exists()


def test_differing_keys_name_the_data_of_each_dataset() -> None:
    folder = summarize.setting_of({**RECIPE, "arch": "x", "seed": 0})
    synthetic = summarize.setting_of({**RECIPE, "dataset": "synthetic", "arch": "x", "seed": 0})
    assert summarize.parse_setting(synthetic)["synthetic_size"] == [5000, 1000]
    assert summarize.differing_keys([folder, synthetic]) == [
        "dataset", "data_dir", "synthetic_size"]


def test_paper_setting_puts_the_papers_figures_beside_ours(tmp_path: Path, capsys) -> None:
    root = tmp_path / "runs"
    paper = {"dataset": "cifar100", "data_dir": "Cifar/data", "epochs": 150, "width": 1.0}
    for arch, weight, top in (("resnet18", "none", 74.0), ("resnet18_cbn", "mean", 75.0)):
        for seed in range(2):
            write_run(root, arch, weight, seed, [top + seed] * 150, **paper)
    old = write_run(root, "vgg11", "none", 0, [60.0] * 150, **paper) / "args.json"
    flags = json.loads(old.read_text())
    del flags["width"]  # older runs: no width, i.e. 1.0
    old.write_text(json.dumps(flags))
    assert run_main([str(root)], capsys)[0] == 0
    table = (root / "table.md").read_text()
    assert "| arch | BN | paper BN | MimicNorm | paper MimicNorm |" in table
    # memory ratio 90 / 120 = 0.75 ours, 4157 / 4447 = 0.935 the paper's
    assert ("| resnet18 | 74.50 ± 0.71 / 74.50 ± 0.71 (2) | 74.72 ± 0.31 | "
            "75.50 ± 0.71 / 75.50 ± 0.71 (2) | 74.96 ± 0.14 | +1.00 ± 0.71 | +1.00 ± 0.71 | "
            "0.750 | 0.935 | 1.100 |") in table
    assert "| vgg11 | 60.00 / 60.00 (1) | 67.90 ± 0.14 | - | 67.87 ± 0.20 | - | - |" in table
    assert "left out" not in table


def test_markdown_table_formats_numbers_like_the_benchmarks() -> None:
    df = pd.DataFrame({"arch": ["a", "b"], "n": [3, 12], "x": [0.12345, 123.456],
                       "y": [math.nan, 9.9996]})
    assert tables.markdown_table(df) == (
        "| arch | n | x | y |\n|---|---|---|---|\n"
        "| a | 3 | 0.123 | - |\n| b | 12 | 123.5 | 10.000 |")  # 9.9996 < 10: 3 decimals
    assert tables.markdown_table(df, floatfmt=".2f").splitlines()[2] == "| a | 3 | 0.12 | - |"
    assert tables.markdown_table([{"k": "v", "z": 1.5}]).splitlines()[2] == "| v | 1.500 |"


def test_write_table_writes_csv_and_captioned_markdown(tmp_path: Path) -> None:
    df = pd.DataFrame({"arch": ["a"], "ratio": [0.5], "missing": [math.nan]})
    tables.write_table(df, tmp_path / "t", "caption line")
    assert (tmp_path / "t.csv").read_bytes() == b"arch,ratio,missing\r\na,0.5,nan\r\n"
    assert (tmp_path / "t.md").read_text() == (
        "caption line\n\n| arch | ratio | missing |\n|---|---|---|\n| a | 0.500 | - |\n")
    tables.write_table(df, tmp_path / "u")
    assert (tmp_path / "u.md").read_text().startswith("| arch |")
