"""ImageNet entry point on the shared engine: one epoch on a tiny LMDB, then --evaluate."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

from ImageNet.lmdb_format import record_key
from ImageNet.main import main
from ImageNet.utils import IMAGENET_RECIPE, get_args_parser
from training import Runtime
from training.runner import resolve_defaults
from tests.helpers import make_lmdb_data_dir

lmdb = pytest.importorskip("lmdb")  # skipped, not a collection error, without it

COMMON = ["--image-size", "32", "--val-resize", "36", "-b", "4", "-j", "0", "--gpu", "-1",
          "--no-progress", "--epochs", "1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lmdb_data_dir(tmp_path_factory)


def test_one_epoch_then_evaluate(data_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "runs"
    argv = ["-a", "resnet18_cbn", "--weight", "mean", "--data-dir", str(data_dir),
            "--out-dir", str(out), "--run-name", "tiny", *COMMON]
    assert main(argv) == 0
    run_dir = out / "resnet18_cbn" / "tiny"
    with open(run_dir / "log.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["epoch"] == "1"
    capsys.readouterr()
    assert main(["-a", "resnet18_cbn", "--data-dir", str(data_dir), "--out-dir", str(tmp_path / "e"),
                 "--evaluate", "--resume", str(run_dir / "best.pt"), *COMMON]) == 0
    assert f"{float(row['test_acc1']):.2f}" in capsys.readouterr().out


def test_missing_data_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["-a", "resnet18_cbn", "--data-dir", str(tmp_path / "none"),
                 "--out-dir", str(tmp_path), *COMMON]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


@pytest.mark.parametrize("argv, processes, device_ids, lr", [
    (["-b", "32"], 2, [], 0.025),  # torchrun: the global batch is 2 x 32
    (["-b", "32"], 8, [], 0.1),  # docs/imagenet.md's 8 x 32 trains at the paper's lr
    (["-b", "64"], 1, [0, 1], 0.025),  # DataParallel splits one batch of 64
    (["-b", "512"], 1, [], 0.2),
    (["-b", "32", "-lr", "0.2"], 2, [], 0.2),  # an explicit -lr always wins
    (["-b", "32", "--lr", "0.2"], 2, [], 0.2),  # the long spelling too
])
def test_lr_follows_the_global_batch_unless_given(argv: list[str], processes: int,
                                                  device_ids: list[int], lr: float) -> None:
    args = get_args_parser().parse_args(["-a", "resnet18", *argv])
    rt = Runtime(torch.device("cpu"), device_ids, world_size=processes, distributed=processes > 1)
    resolve_defaults(args, IMAGENET_RECIPE, rt)
    assert args.lr == pytest.approx(lr)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_one_corrupt_record_is_one_line(data_dir: Path, tmp_path: Path, capsys,
                                        workers: str) -> None:
    damaged = tmp_path / "data"
    damaged.mkdir()
    for split in ("train", "val"):
        shutil.copyfile(data_dir / f"{split}.lmdb", damaged / f"{split}.lmdb")
    env = lmdb.open(str(damaged / "train.lmdb"), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        txn.put(record_key(3), b"\xff\xd8\xff not really a JPEG")
    env.close()
    argv = ["-a", "resnet18_cbn", "--data-dir", str(damaged), "--out-dir", str(tmp_path / "out"),
            *COMMON, "-j", workers]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {damaged / 'train.lmdb'} record 3: not a decodable image "
                   "(unknown format)"]
