"""The Table 1 study runner: the recipe's shape at any length, the grid, and a study that is
killed mid-cell and started again ending with the logs of an uninterrupted one."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import table1

REPO = Path(__file__).resolve().parents[1]
TINY_STUDY = ["--data", "synthetic", "--synthetic-size", "32", "16", "--archs", "squeezenet",
              "vgg11", "--variants", "bn", "mimicnorm", "--extra", "squeezenet:nonorm",
              "--seeds", "0", "--width", "0.25", "--epochs", "3", "--batch", "8", "--lr", "0.02",
              "-j", "0"]


def test_recipe_shape_scales_the_papers_schedule():
    assert table1.recipe_shape(150) == (2, [80, 110, 135])
    assert table1.recipe_shape(15) == (1, [8, 11, 14])
    assert table1.recipe_shape(4) == (1, [2, 3])


def test_grid_crosses_archs_variants_seeds_then_the_extra_cells():
    args = table1.get_args_parser().parse_args(
        ["--archs", "vgg11", "resnet18", "--seeds", "0", "1", "--extra", "resnet18:nonorm",
         "vgg11:bn"])
    cells = table1.study_cells(args)
    assert len(cells) == 2 * 2 * 2 + 2  # vgg11:bn is in the grid already
    assert cells[0] == table1.Cell("vgg11", "bn", 0) and cells[-1].model == "resnet18_nobn"
    assert len(set(cells)) == len(cells)


def test_paper_preset_is_the_papers_study():
    args = table1.get_args_parser().parse_args(["--paper"])
    table1.apply_paper_preset(args)
    cells = table1.study_cells(args)
    assert len(cells) == 6 * 2 * 3 + 3
    argv = table1.cell_argv(table1.Cell("resnet50", "mimicnorm", 2), args,
                            ["-ds", "cifar100", "--data-dir", "Cifar/data"])
    flags = " ".join(argv)
    assert flags.startswith("-a resnet50_cbn --weight mean -ds cifar100 --data-dir Cifar/data")
    for expected in ("--width 1.0", "-b 128", "-lr 0.1", "--epochs 150", "--warm 2",
                     "--milestones 80 110 135", "--seed 2"):
        assert expected in flags
    assert "-b 256" in " ".join(table1.cell_argv(cells[0], args, []))


def test_bad_extra_cell_is_one_line(capsys, tmp_path):
    assert table1.main([*TINY_STUDY, "--extra", "vgg11-bn", "--out-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --extra takes ARCH:VARIANT")


def _logs(out: Path) -> dict[str, list[list[str]]]:
    """Every run's log.csv without the timing columns."""
    logs = {}
    for log in sorted((out / "runs").glob("*/*/log.csv")):
        rows = [line.split(",") for line in log.read_text().splitlines()]
        keep = [i for i, c in enumerate(rows[0])
                if c not in ("epoch_seconds", "images_per_second", "peak_memory_mb")]
        logs[str(log.relative_to(out))] = [[row[i] for i in keep] for row in rows]
    return logs


def _study(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "experiments.table1", *TINY_STUDY,
                             "--out-dir", str(out)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
@pytest.mark.numerics
def test_killed_study_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    straight = _study(tmp_path / "straight")
    out, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, out
    assert (tmp_path / "straight" / "table.md").is_file()
    assert len(_logs(tmp_path / "straight")) == 5

    cut = tmp_path / "cut"
    proc = _study(cut)
    second = cut / "runs" / "squeezenet_cbn" / "mimicnorm-s0"
    while not (second / "last.pt").exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.kill()  # SIGKILL (a no-op if the study already ended)
    proc.communicate(timeout=60)
    mid_cell = (second / "last.pt").exists()

    again = _study(cut)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    assert "[1/5] done before" in out  # squeezenet bn finished before the kill
    if mid_cell:
        assert "[2/5] resumed" in out
    assert _logs(cut) == _logs(tmp_path / "straight")
    assert not list((cut / "runs").glob("*/*/*.pt"))  # finished cells keep only their logs
