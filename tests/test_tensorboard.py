"""--tensorboard: the event files, read back with TensorBoard's own reader, hold the run's curves
at global optimizer steps, continue across a stop and resume without duplicated or missing steps,
and come from rank 0 alone."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from Cifar.main import main as cifar_main
from ImageNet.main import main as imagenet_main
from tests.helpers import REPO
from tests.recipes import STABLE_LR, TINY, TINY_STEPS
from tests.test_reliability import KILL_IN_SAVE
from training.logger import LOG_COLUMNS
from training.schedule import lr_factor

EPOCHS = 3
STEPS = EPOCHS * TINY_STEPS
FLAGS = [*TINY, "-j", "0", "--epochs", str(EPOCHS), "--tensorboard"]
EPOCH_TAGS = [f"epoch/{column}" for column in LOG_COLUMNS[1:]]
LAST_BN_TAGS = ["last_bn/running_mean_abs", "last_bn/running_var"]


def _events(run_dir: Path, purge: bool = True) -> EventAccumulator:
    """Every event file of the run; `purge=False` also keeps what a later writer's purge step
    orphans, i.e. shows every event as written."""
    events = EventAccumulator(str(run_dir / "tensorboard"), purge_orphaned_data=purge,
                              size_guidance={"scalars": 0, "histograms": 0})  # 0: keep all
    return events.Reload()


def _steps(events: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in events.Scalars(tag)]


def _values(events: EventAccumulator, tag: str) -> list[float]:
    return [e.value for e in events.Scalars(tag)]


def _log_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def _newest_recovery_step(run_dir: Path) -> int:
    return max((int(p.stem.split("-")[1]) for p in run_dir.glob("step-*.pt")), default=0)


def _run(tmp_path: Path, argv: list[str], env: dict[str, str] | None = None,
         stop_after_step: int | None = None) -> subprocess.CompletedProcess:
    """`python argv --out-dir tmp_path` to its end; with `stop_after_step`, SIGTERM once run
    "run" has a recovery file of that global step or a later one (needs --save-every 1)."""
    proc = subprocess.Popen([sys.executable, *argv, "--out-dir", str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if stop_after_step is not None:
        run_dir = tmp_path / "squeezenet_cbn" / "run"
        while _newest_recovery_step(run_dir) < stop_after_step and proc.poll() is None:
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_curves_continue_across_sigterm_and_resume(tmp_path):
    straight = tmp_path / "squeezenet_cbn" / "straight"
    flags = ["Cifar/main.py", *FLAGS, "--log-every", "1", "--save-every", "1"]
    # the reference runs in a subprocess too: the same torch threads as the stopped run's
    assert _run(tmp_path, [*flags, "--run-name", "straight"]).returncode == 0
    stopped = _run(tmp_path, [*flags, "--run-name", "run"], stop_after_step=3)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1].startswith("stopped: SIGTERM")
    run_dir = tmp_path / "squeezenet_cbn" / "run"
    resumed = _run(tmp_path, [*flags, "--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr
    assert len(list((run_dir / "tensorboard").iterdir())) == 2  # one event file per process

    events, reference = _events(run_dir), _events(straight)
    as_written = _events(run_dir, purge=False)
    every_step = list(range(1, STEPS + 1))
    for tag in ["train/loss", "train/lr", *LAST_BN_TAGS]:
        assert _steps(as_written, tag) == every_step, tag  # none written twice, none missing
        assert _steps(events, tag) == every_step, tag
        assert _values(events, tag) == pytest.approx(_values(reference, tag), rel=1e-5)
    schedule = [STABLE_LR * lr_factor(step - 1, TINY_STEPS, 1, [2], 0.1) for step in every_step]
    assert _values(events, "train/lr") == pytest.approx(schedule, rel=1e-6)

    rows = _log_rows(run_dir)
    epoch_ends = [TINY_STEPS * (k + 1) for k in range(EPOCHS)]
    for tag in EPOCH_TAGS:
        assert _steps(as_written, tag) == epoch_ends, tag
        column = tag.split("/", 1)[1]
        assert _values(events, tag) == pytest.approx([float(r[column]) for r in rows], rel=1e-5)
    for tag in ("last_bn/running_mean", "last_bn/running_var"):
        assert [h.step for h in events.Histograms(tag)] == epoch_ends

    final = torch.load(run_dir / "last.pt", weights_only=True)["model"]
    running_var = final["last_bn.bn.running_var"]
    assert _values(events, "last_bn/running_var")[-1] == pytest.approx(running_var.mean().item(),
                                                                        rel=1e-6)
    histogram = events.Histograms("last_bn/running_var")[-1].histogram_value
    assert (histogram.num, histogram.max) == (100, pytest.approx(running_var.max().item()))
    assert histogram.sum == pytest.approx(running_var.sum().item(), rel=1e-6)


@pytest.mark.slow
def test_steps_written_past_the_last_checkpoint_are_purged_on_resume(tmp_path):
    """SIGKILL inside the 4th checkpoint write: step 4's point is on disk, its checkpoint is not,
    so the resumed run writes step 4 again and TensorBoard keeps only the new one."""
    flags = [*FLAGS, "--log-every", "2", "--save-every", "1"]
    killed = _run(tmp_path, ["-c", KILL_IN_SAVE, *flags, "--run-name", "run"],
                  env={"DIE_IN_SAVE": "4"})
    assert killed.returncode == -signal.SIGKILL
    run_dir = tmp_path / "squeezenet_cbn" / "run"
    assert _steps(_events(run_dir), "train/loss") == [2, 4]
    resumed = _run(tmp_path, ["Cifar/main.py", *flags, "--resume", str(run_dir)])
    assert resumed.returncode == 0, resumed.stderr

    every_other = list(range(2, STEPS + 1, 2))
    assert _steps(_events(run_dir, purge=False), "train/loss") == [2, 4, *every_other[1:]]
    assert _steps(_events(run_dir), "train/loss") == every_other


@pytest.mark.slow
def test_only_rank_0_writes_under_torchrun(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "Cifar/main.py", *FLAGS, "--epochs", "1", "--log-every", "1", "--out-dir",
         str(tmp_path), "--run-name", "ddp"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "squeezenet_cbn" / "ddp"
    assert len(list((run_dir / "tensorboard").iterdir())) == 1
    steps = TINY_STEPS // 2  # the 24 images are split between the two processes
    assert _steps(_events(run_dir), "train/loss") == list(range(1, steps + 1))
    assert _steps(_events(run_dir), "epoch/test_acc1") == [steps]


def test_imagenet_entry_point_without_a_last_bn(tmp_path):
    assert imagenet_main(["-a", "resnet18", "--width", "0.25", "-ds", "synthetic",
                          "--synthetic-size", "8", "4", "--image-size", "32", "-b", "4",
                          "--epochs", "1", "-j", "0", "--gpu", "-1", "--no-progress",
                          "--tensorboard", "--log-every", "1", "--out-dir", str(tmp_path),
                          "--run-name", "tiny"]) == 0
    run_dir = tmp_path / "resnet18" / "tiny"
    events = _events(run_dir)
    assert sorted(events.Tags()["scalars"]) == sorted(["train/loss", "train/lr", *EPOCH_TAGS])
    assert events.Tags()["histograms"] == []
    (row,) = _log_rows(run_dir)
    assert _steps(events, "train/loss") == [1, 2]
    assert _values(events, "epoch/train_loss") == pytest.approx([float(row["train_loss"])],
                                                                rel=1e-5)


def test_missing_tensorboard_is_one_line_before_anything_is_written(tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    assert cifar_main([*FLAGS, "--out-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --tensorboard needs the tensorboard package: "
                   "pip install 'tensorboard>=2.14,<3'")
    assert not (tmp_path / "runs").exists()
