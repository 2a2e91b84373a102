"""Checkpoint files, the CSV log and the small pieces of the engine that need no training."""
import csv

import pytest
import torch

from training import SyntheticImages, UsageError
from training.checkpoint import CheckpointSaver
from training.engine import correct_topk
from training.logger import CsvLog
from tests.helpers import checkpoint_dict
from training.checkpoint import load_checkpoint, save_atomic
from training.cli import check_args
from training.distributed import select_gpus
from Cifar.utils import get_args_parser


def _header(**overrides):
    return checkpoint_dict(dataset="cifar100", **overrides)


def test_save_atomic_round_trips_and_leaves_no_temporary_file(tmp_path):
    save_atomic(_header(), tmp_path / "c.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    assert torch.equal(load_checkpoint(tmp_path / "c.pt", {"arch": "resnet18_cbn"}).model["w"],
                       torch.ones(2))


def test_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "c.pt"
    save_atomic(_header(), path)
    with pytest.raises(Exception):
        save_atomic({"unpicklable": lambda: None}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]
    assert load_checkpoint(path, {}).arch == "resnet18_cbn"


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "checkpoint not found"),
    (lambda p: p.write_bytes(b"not a zip file at all"), "cannot read checkpoint"),
    (lambda p: (torch.save(_header(), p), p.write_bytes(p.read_bytes()[:300])), "cannot read"),
    (lambda p: torch.save(torch.zeros(3), p), "is not a mimicnorm training checkpoint"),
    (lambda p: torch.save(_header(version=99), p), "format version 99"),
    (lambda p: torch.save(_header(arch="vgg11_cbn"), p),
     "arch vgg11_cbn, this run has arch resnet18_cbn"),
    (lambda p: torch.save(_header(num_classes=10), p),
     "num_classes 10, this run has num_classes 100"),
])
def test_load_checkpoint_rejects_bad_files_with_one_line(tmp_path, setup, message):
    path = tmp_path / "c.pt"
    setup(path)
    with pytest.raises(UsageError, match=message) as info:
        load_checkpoint(path, {"arch": "resnet18_cbn", "num_classes": 100, "dataset": "cifar100"})
    assert "\n" not in str(info.value) and info.value.exit_code == 2


def test_checkpoint_saver_keeps_last_and_best(tmp_path):
    saver = CheckpointSaver(tmp_path)
    saver.save(_header(epoch=1), is_best=True)
    saver.save(_header(epoch=2), is_best=False)
    assert torch.load(saver.last_path, weights_only=True)["epoch"] == 2
    assert torch.load(saver.best_path, weights_only=True)["epoch"] == 1
    saver.save(_header(epoch=3), is_best=True)
    assert torch.load(saver.best_path, weights_only=True)["epoch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def _row(epoch):
    return {"epoch": epoch, "lr": 0.1, "train_loss": 1.0, "train_acc1": 50.0, "test_loss": 1.0,
            "test_acc1": 50.0, "test_acc5": 90.0, "epoch_seconds": 1.0,
            "images_per_second": 10.0, "peak_memory_mb": 100.0}


def test_csv_log_resume_keeps_rows_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "log.csv"
    log = CsvLog(path)
    for epoch in (1, 2, 3):
        log.write(_row(epoch))
    CsvLog(path, resume_epoch=2).write(_row(3))
    with open(path, newline="") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3]


def test_correct_topk_counts_hits():
    output = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
    top1, top2, top5 = correct_topk(output, torch.tensor([2, 0]), [1, 2, 5])
    assert (top1.item(), top2.item(), top5.item()) == (1, 2, 2)


def test_synthetic_images_are_deterministic_and_splits_differ():
    a, b = SyntheticImages(8, 4, 32), SyntheticImages(8, 4, 32)
    test = SyntheticImages(8, 4, 32, offset=8)
    assert torch.equal(a[5][0], b[5][0]) and a[5][1] == 5 % 4
    assert a[5][0].shape == (3, 32, 32) and not torch.equal(a[5][0], test[5][0])


def test_gpu_selection_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_gpus(None) == [] and select_gpus([-1]) == []
    with pytest.raises(UsageError, match="CUDA is not available.*--gpu -1"):
        select_gpus([0])


@pytest.mark.parametrize("flags, message", [
    (["--milestones", "80", "40"], "strictly increasing"),
    (["--evaluate"], "--evaluate tests a checkpoint"),
    (["--sync-lastbn", "-a", "resnet18"], "needs a MimicNorm"),
    (["--gpu", "-1", "0"], "cannot be combined"),
])
def test_check_args_rejects_flag_combinations(flags, message):
    args = get_args_parser().parse_args(["-a", "resnet18_cbn", *flags])
    with pytest.raises(UsageError, match=message):
        check_args(args)
