"""A 2-process torchrun (gloo, CPU) CIFAR run: it finishes, rank 0 alone logs and saves, the ranks
agree."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.recipes import STABLE_LR

REPO = Path(__file__).resolve().parents[1]

# Runs what Cifar/main.py runs, then saves each process's final weights for comparison.
WORKER = """
import os, sys, torch
from Cifar.data_loader import CifarData
from Cifar.utils import get_args_parser
import training
result = training.run(get_args_parser().parse_args(sys.argv[1:]), CifarData())
dump = os.path.join(os.environ["DUMP_DIR"], f"rank{os.environ['RANK']}.pt")
torch.save(result.model.state_dict(), dump)
"""


@pytest.mark.slow
@pytest.mark.parametrize("last_bn", [[], ["--sync-lastbn"]], ids=["per-process-last-bn", "synced"])
def test_torchrun_two_processes_on_cpu(tmp_path, last_bn):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(REPO), DUMP_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(worker), "-a", "squeezenet_cbn", "--weight", "mean", *last_bn,
         "-ds", "synthetic", "--synthetic-size", "16", "4", "-b", "4", "-lr", str(STABLE_LR),
         "--epochs", "2", "--max-steps", "2", "-j", "0", "--gpu", "-1", "--no-progress",
         "--out-dir", str(tmp_path / "runs"), "--run-name", "ddp"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 processes (gloo, cpu)" in proc.stdout
    assert proc.stdout.count("epoch 2/2") == 1  # only rank 0 reports
    assert "FutureWarning" not in proc.stderr  # torch's deprecation of the synced BN's all_reduce

    (run_dir,) = (tmp_path / "runs" / "squeezenet_cbn").iterdir()
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".lock", "args.json", "best.pt", "last.pt", "log.csv"]
    with open(run_dir / "log.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]

    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    saved = torch.load(run_dir / "last.pt", weights_only=True)
    assert len(saved["rng"]) == 2
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), key
        assert torch.equal(value, saved["model"][key]), key
