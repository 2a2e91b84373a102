"""The Table 1 study: the recipe's shape at any length, the grid of cells and their flags (the
engine that runs them: tests/test_study.py)."""
from __future__ import annotations

from experiments import table1

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
    assert cells[0] == table1.StudyCell("vgg11", "bn", 0) and cells[-1].model == "resnet18_nobn"
    assert len(set(cells)) == len(cells)


def test_paper_preset_is_the_papers_study():
    args = table1.get_args_parser().parse_args(["--paper"])
    table1.apply_paper_preset(args)
    cells = table1.study_cells(args)
    assert len(cells) == 6 * 2 * 3 + 3
    argv = table1.cell_argv(table1.StudyCell("resnet50", "mimicnorm", 2), args,
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
