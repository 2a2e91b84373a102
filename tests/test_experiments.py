"""The experiments' data subset and tables (no training here)."""
from __future__ import annotations

import argparse

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
    curves = {(0.1, "None"): [10.0, 10.0], (0.1, "WeightMean only"): [20.0, 25.5],
              (0.1, "LastBN only"): [30.0, 31.25], (0.1, "MimicNorm"): [40.0, 45.0],
              (0.1, "BN"): [50.0, 48.0], (0.5, "None"): [10.0, 10.0],
              (0.5, "WeightMean only"): [10.0, 10.0], (0.5, "MimicNorm"): [35.0, 36.0],
              (0.5, "BN"): [9.5, 9.0]}
    records = [{"variant": v, "lr": lr, "epoch": e, "train_loss": 1.0, "test_acc1": acc,
                "epoch_seconds": 2.0}
               for (lr, v), accs in curves.items() for e, acc in enumerate(accs, 1)]
    args = argparse.Namespace(out_dir=tmp_path, lrs=[0.1, 0.5], epochs=2, ablation_lr=0.1)
    lr_robustness.write_outputs(records, args, "caption")
    assert (tmp_path / "table.md").read_text() == (
        "caption\n\nBest test top-1 (%) within 2 epochs:\n\n"
        "| lr | None | WeightMean only | MimicNorm | BN |\n|---|---|---|---|---|\n"
        "| 0.1 | 10.00 | 25.50 | 45.00 | 50.00 |\n| 0.5 | 10.00 | 10.00 | 36.00 | 9.50 |\n\n"
        "Ablation at lr 0.1: test top-1 (%) by epoch\n\n"
        "| variant | 1 | 2 | best |\n|---|---|---|---|\n| None | 10.00 | 10.00 | 10.00 |\n"
        "| WeightMean only | 20.00 | 25.50 | 25.50 |\n| LastBN only | 30.00 | 31.25 | 31.25 |\n"
        "| MimicNorm | 40.00 | 45.00 | 45.00 |\n| BN | 50.00 | 48.00 | 50.00 |\n")
    assert (tmp_path / "table.csv").read_bytes() == (
        b"lr,None,WeightMean only,MimicNorm,BN\r\n0.1,10.0,25.5,45.0,50.0\r\n"
        b"0.5,10.0,10.0,36.0,9.5\r\n")
    runs = (tmp_path / "runs.csv").read_bytes().split(b"\r\n")
    assert runs[:2] == [b"variant,lr,epoch,train_loss,test_acc1,epoch_seconds",
                        b"None,0.1,1,1.0,10.0,2.0"]
    assert len(runs) == 2 + len(records) and (tmp_path / "curves.png").stat().st_size > 0
