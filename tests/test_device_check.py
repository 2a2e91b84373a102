"""scripts/device_check.py: its CPU tiny mode runs every stage as the GPU machine would (without
tqdm and lmdb, which that machine may lack), a failed stage fails the check and is named, and
--prepare's CIFAR-10 subset; benchmarks/train_speed.py, which times the speed rows."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from benchmarks import train_speed
from scripts import device_check
from tests.helpers import REPO

TINY_CIFAR = ["-a", "squeezenet_cbn", "--weight", "mean", "-ds", "synthetic", "--synthetic-size",
              "16", "8", "--gpu", "-1", "-b", "4", "--loader", "device", "--threads", "1"]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _check(tmp_path: Path, without: str, *flags: str) -> subprocess.CompletedProcess:
    """The tiny check in a subprocess where the modules in `without` cannot be imported."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests" / "without"),
           "MIMICNORM_WITHOUT": without, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "scripts/device_check.py", "--tiny", "--out",
                           str(tmp_path / "out"), "--scratch", str(tmp_path / "scratch"), *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_tiny_check_runs_every_stage_without_tqdm_and_lmdb(tmp_path):
    proc = _check(tmp_path, "tqdm,lmdb")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "log.txt", "memory.csv", "short_run.csv", "speed.csv", "stages.csv", "summary.md"]
    stages = _rows(out / "stages.csv")
    assert [(r["stage"], r["ok"]) for r in stages] == [(s, "True") for s in device_check.STAGES]
    speed = _rows(out / "speed.csv")
    assert {(r["arch"], r["loader"]) for r in speed} == {
        (a, loader) for a in ("squeezenet", "squeezenet_cbn") for loader in ("pil", "device")}
    assert all(r["exit"] == "0" and float(r["images_per_s"]) > 0 for r in speed)
    short = _rows(out / "short_run.csv")
    assert [(r["arch"], float(r["epoch"])) for r in short] == [("squeezenet", 1),
                                                               ("squeezenet_cbn", 1)]
    summary = (out / "summary.md").read_text()
    assert "| squeezenet | 3687 | 2693 | 0.730 |" in summary
    assert "3 steps twice: 0 tensors differ" in summary
    log = (out / "log.txt").read_text()
    assert "could not import 'lmdb'" in log  # pytest -m cuda collected without lmdb
    assert "1 processes (gloo, cpu)" in log


@pytest.mark.slow
def test_a_failed_stage_fails_the_check_names_it_and_the_others_still_run(tmp_path):
    proc = _check(tmp_path, "pytest", "--stages", "tests", "memory")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("device check FAILED: stage(s) tests;")
    assert "stage tests: FAILED: pytest -m cuda: exit 1: " in proc.stdout
    stages = _rows(tmp_path / "out" / "stages.csv")
    assert [(r["stage"], r["ok"]) for r in stages] == [("tests", "False"), ("memory", "True")]
    assert "No module named 'pytest'" in stages[0]["error"]


def _fake_cifar_tar(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for split, count in (("train", 5), ("test", 3)):
            for name in ("cat", "dog"):
                for k in reversed(range(count)):  # stored out of order
                    data = f"{split}/{name}/{k}".encode()
                    info = tarfile.TarInfo(f"cifar10-jpeg/{split}/{name}/{k:04d}.jpg")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return path


def test_cifar_subset_keeps_the_first_images_of_every_class(tmp_path):
    source = _fake_cifar_tar(tmp_path / "cifar10-jpeg.tar.gz")
    counts = device_check.cifar_subset(source, tmp_path / "subset.tar.gz", (2, 1))
    assert counts == {"train": 4, "test": 2}
    with tarfile.open(tmp_path / "subset.tar.gz") as tar:
        names = sorted(tar.getnames())
        assert tar.extractfile("cifar10-jpeg/train/dog/0001.jpg").read() == b"train/dog/1"
    assert names == [f"cifar10-jpeg/{split}/{name}/{k:04d}.jpg" for split, ks in
                     (("test", [0]), ("train", [0, 1])) for name in ("cat", "dog") for k in ks]


def test_prepare_without_the_cifar_archive_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        device_check.prepare(tmp_path / "missing.tar.gz", (1, 1), tmp_path / "bundle")
    assert str(exit_.value) == f"error: --cifar-tar {tmp_path / 'missing.tar.gz'}: no such file"
    assert not (tmp_path / "bundle").exists()


@pytest.mark.usefixtures("one_thread")
def test_train_speed_times_the_steps_after_the_warmup(tmp_path, capsys):
    result = tmp_path / "speed.json"
    assert train_speed.main(["--warmup", "1", "--steps", "2", "--result", str(result), "--",
                             *TINY_CIFAR]) == 0
    row = json.loads(result.read_text())
    assert (row["warmup_steps"], row["timed_steps"], row["batch_size"]) == (1, 2, 4)
    assert row["images_per_s"] == pytest.approx(2 * 4 / (row["step_ms"] * 2 / 1000))
    assert json.loads(capsys.readouterr().out) == row


@pytest.mark.usefixtures("one_thread")
def test_train_speed_refuses_more_steps_than_an_epoch_has(capsys):
    assert train_speed.main(["--warmup", "10", "--steps", "30", "--", *TINY_CIFAR]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: an epoch has 4 steps, fewer than --warmup 10 + --steps 30: use more images or a "
        "smaller batch")


def test_step_timer_marks_the_end_of_the_warmup_and_of_the_timed_steps():
    import torch

    from training.engine import EpochState

    timer = train_speed.StepTimer(torch.device("cpu"), warmup=2, steps=3)
    state = EpochState(0, 10)
    stops = []
    for step in range(1, 6):
        state.step = step
        stops.append(timer(state, torch.zeros(()), 0.1))
    assert stops == [False, False, False, False, True] and len(timer.marks) == 2
    assert timer.seconds() >= 0
