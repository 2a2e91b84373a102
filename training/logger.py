"""Per-epoch records: log.csv (one row per epoch, numbered from 1) and a console line."""
from __future__ import annotations

import csv
import os
import resource
import sys
from pathlib import Path

import torch

LOG_COLUMNS = ("epoch", "lr", "train_loss", "train_acc1", "test_loss", "test_acc1", "test_acc5",
               "epoch_seconds", "images_per_second", "peak_memory_mb")


class CsvLog:
    """log.csv of a run. Resuming after epoch k keeps rows 1..k and drops any later ones; when
    row k is missing (a run cut between its checkpoint and its log line), `last_row`, the
    checkpoint's copy of it, is written in its place."""

    def __init__(self, path: str | os.PathLike, resume_epoch: int | None = None,
                 last_row: dict[str, float] | None = None) -> None:
        self.path = Path(path)
        rows = []
        if resume_epoch is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= resume_epoch]
        if last_row is not None and last_row["epoch"] == resume_epoch and (
                not rows or int(rows[-1]["epoch"]) < resume_epoch):
            rows.append(_formatted(last_row))
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, LOG_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict[str, float]) -> None:
        """Append one epoch's row (keys: LOG_COLUMNS)."""
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, LOG_COLUMNS).writerow(_formatted(row))


def _formatted(row: dict[str, float]) -> dict[str, str | int]:
    return {k: row[k] if k == "epoch" else f"{row[k]:.6g}" for k in LOG_COLUMNS}


def format_row(row: dict[str, float], epochs: int) -> str:
    """The console line of one epoch's row."""
    return (f"epoch {row['epoch']}/{epochs}  lr {row['lr']:.4g}  "
            f"train loss {row['train_loss']:.4f} top-1 {row['train_acc1']:.2f}%  "
            f"test loss {row['test_loss']:.4f} top-1 {row['test_acc1']:.2f}% "
            f"top-5 {row['test_acc5']:.2f}%  {row['epoch_seconds']:.1f}s  "
            f"{row['images_per_second']:.0f} img/s  {row['peak_memory_mb']:.0f} MB")


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA only; the CPU figure is the process's lifetime peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max_memory_allocated since the last reset (everything the process holds on the GPU,
    a `--loader device` dataset included); CPU: the process's peak RSS (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, else KiB
