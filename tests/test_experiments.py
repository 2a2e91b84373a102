"""The experiments' data subset and tables (no training here)."""
from __future__ import annotations

import argparse
import math

import pandas as pd

from experiments import grid, lr_robustness


def test_subset_tree_links_the_first_images_of_each_class(tmp_path) -> None:
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            folder = tmp_path / "src" / split / cls
            folder.mkdir(parents=True)
            for i in range(4):
                (folder / f"{i:04d}.jpg").write_bytes(b"x")
    dest = grid.subset_tree(tmp_path / "src", tmp_path / "sub", {"train": 3, "test": 0})
    linked = sorted(p.name for p in (dest / "train" / "dog").iterdir())
    assert linked == ["0000.jpg", "0001.jpg", "0002.jpg"]
    assert len(list((dest / "test" / "cat").iterdir())) == 4
    source = tmp_path / "src" / "train" / "cat" / "0001.jpg"
    assert (dest / "train" / "cat" / "0001.jpg").resolve() == source.resolve()


def test_write_outputs_tables_by_hand(tmp_path) -> None:
    # (lr, variant) -> per seed, test top-1 by epoch; [] = diverged in its first epoch
    curves = {(0.1, "None"): [[10.0, 10.0], [12.0, 11.0]],
              (0.1, "WeightMean only"): [[20.0, 25.5], [20.0, 24.5]],
              (0.1, "LastBN only"): [[30.0, 31.25], [30.0, 31.25]],
              (0.1, "MimicNorm"): [[40.0, 45.0], [42.0, 43.0]],
              (0.1, "BN"): [[50.0, 48.0], [46.0, 47.0]],
              (0.5, "None"): [[], []], (0.5, "WeightMean only"): [[10.0], [10.0, 10.0]],
              (0.5, "MimicNorm"): [[35.0, 36.0], [33.0, 36.0]], (0.5, "BN"): [[9.5, 9.0], []]}
    records = []
    for (lr, v), seeds in curves.items():
        for seed, accs in enumerate(seeds):
            ident = {"variant": v, "lr": lr, "seed": seed, "diverged": len(accs) < 2}
            records += [{**ident, "epoch": e, "train_loss": 1.0, "test_acc1": acc,
                         "epoch_seconds": 2.0} for e, acc in enumerate(accs, 1)] or [
                {**ident, "epoch": 0, "train_loss": math.nan, "test_acc1": math.nan,
                 "epoch_seconds": math.nan}]
    args = argparse.Namespace(out_dir=tmp_path, lrs=[0.1, 0.5], epochs=2, ablation_lr=0.1)
    lr_robustness.write_outputs(records, args, "caption")
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[4] == ("| lr | None | None (paper) | WeightMean only | WeightMean only (paper) "
                        "| MimicNorm | MimicNorm (paper) | BN | BN (paper) |")
    assert table[6] == ("| 0.1 | 11.00 ± 1.41 (2) | 1.24 | 25.00 ± 0.71 (2) | 36.49 "
                        "| 44.00 ± 1.41 (2) | 46.92 | 48.50 ± 2.12 (2) | 32.40 |")
    assert table[7] == ("| 0.5 | 2 diverged | 1.00 | 10.00 ± 0.00 (2) 1 diverged | 1.00 "
                        "| 36.00 ± 0.00 (2) | 22.03 | 9.50 (1) 1 diverged | 8.26 |")
    ablation = table[table.index("| variant | 1 | 2 | best (mean over seeds) |") + 2:]
    assert ablation[0] == "| None | 11.00 | 10.50 | 11.00 |"
    assert ablation[3] == "| MimicNorm | 41.00 | 44.00 | 44.00 |"
    saved = pd.read_csv(tmp_path / "table.csv")
    assert saved["BN n"].tolist() == [2, 1] and saved["None diverged"].tolist() == [0, 2]
    assert saved["MimicNorm std"].round(4).tolist() == [1.4142, 0.0]
    runs = pd.read_csv(tmp_path / "runs.csv")
    assert len(runs) == len(records) and set(runs.columns) >= {"seed", "diverged", "test_acc1"}
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_plan_is_seed_by_seed_with_the_ablation_run_last() -> None:
    args = lr_robustness.get_args_parser().parse_args(["--lrs", "0.1", "0.5", "--seeds", "3",
                                                       "4"])
    plan = lr_robustness.plan(args)
    assert len(plan) == 2 * (2 * 4 + 1)
    assert plan[0] == ("None", 0.1, 3) and plan[8] == ("LastBN only", 0.1, 3)
    assert plan[9][2] == 4 and len(set(plan)) == len(plan)
