"""Live training curves for TensorBoard (`--tensorboard`), written by rank 0 to RUN/tensorboard/.

Every point's x is the global optimizer step (the schedule's step count, which checkpoints keep),
so a resumed run continues the same curves. Its writer starts with `purge_step` just past the
checkpoint's step: TensorBoard then drops whatever a killed run had written beyond its last
checkpoint, and the resumed run writes those steps once more.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

import models

from .errors import UsageError
from .logger import LOG_COLUMNS

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

INSTALL = "pip install 'tensorboard>=2.14,<3'"
SUBDIR = "tensorboard"


def require_tensorboard() -> None:
    """Raise UsageError, with the command that installs it, unless TensorBoard is importable."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UsageError(f"--tensorboard needs the tensorboard package: {INSTALL}") from None


def last_bn_of(net: nn.Module) -> nn.BatchNorm1d | None:
    """The BatchNorm1d of a MimicNorm model's last BN (None without one)."""
    found = [m.bn for m in net.modules() if isinstance(m, models.LastBN)]
    return found[0] if len(found) == 1 else None


class TensorBoardLog:
    """The scalars (and last-BN histograms) of one run, at global optimizer steps.

    Per step (every `log_every`-th): `train/loss` (this process's batch), `train/lr`, and for
    MimicNorm models the class averages `last_bn/running_mean_abs` and `last_bn/running_var`.
    Per epoch, at its last step: `epoch/<column>` for each log.csv column and histograms of the
    last BN's running mean and variance (`last_bn/running_mean`, `last_bn/running_var`).
    """

    def __init__(self, run_dir: Path, net: nn.Module, start_step: int, log_every: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # only with --tensorboard: slow import

        self.writer: SummaryWriter = SummaryWriter(str(Path(run_dir) / SUBDIR),
                                                   purge_step=start_step + 1)
        self.last_bn = last_bn_of(net)
        self.log_every = log_every

    def step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        """Record global step `step` if it is a multiple of `log_every` (one device sync)."""
        if step % self.log_every:
            return
        values = [loss.detach()]
        if self.last_bn is not None:
            values += [self.last_bn.running_mean.abs().mean(), self.last_bn.running_var.mean()]
        loss_value, *bn = torch.stack([v.double() for v in values]).tolist()
        self.writer.add_scalar("train/loss", loss_value, step)
        self.writer.add_scalar("train/lr", lr, step)
        if bn:
            self.writer.add_scalar("last_bn/running_mean_abs", bn[0], step)
            self.writer.add_scalar("last_bn/running_var", bn[1], step)

    def epoch(self, step: int, row: dict[str, float]) -> None:
        """Record an epoch's log row (and the last BN's histograms) at its last step."""
        for column in LOG_COLUMNS[1:]:
            self.writer.add_scalar(f"epoch/{column}", row[column], step)
        if self.last_bn is not None:
            self.writer.add_histogram("last_bn/running_mean", self.last_bn.running_mean, step)
            self.writer.add_histogram("last_bn/running_var", self.last_bn.running_var, step)

    def flush(self) -> None:
        """Write everything recorded so far to the event file (before each checkpoint)."""
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()
