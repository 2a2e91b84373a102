"""scripts/device_check.py in its CPU tiny mode: every stage runs and writes its table."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_device_check_tiny_mode_writes_every_table(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, "scripts/device_check.py", "--tiny", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "skipped" in (out / "pytest.txt").read_text()  # no GPU here
    memory = (out / "memory_vs_paper.md").read_text()
    assert "| squeezenet | 3687 | 2693 | 0.730 |" in memory
    speed = _rows(out / "speed.csv")
    assert {(r["arch"], r["loader"]) for r in speed} == {
        (a, loader) for a in ("squeezenet", "squeezenet_cbn") for loader in ("pil", "device")}
    assert all(r["exit"] == "0" and float(r["images_per_s"]) > 0 for r in speed)
    short = _rows(out / "short_run.csv")
    assert [r["arch"] for r in short] == ["squeezenet", "squeezenet_cbn"]
    assert all(r["exit"] == "0" and float(r["epoch"]) == 1 for r in short)
