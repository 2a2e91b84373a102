"""Watching a run between steps: stop signals, non-finite losses and when to save mid-epoch."""
from __future__ import annotations

import math
import os
import signal
import threading
from dataclasses import dataclass, field
from types import FrameType
from typing import Callable

import torch

from .distributed import all_reduce_max, is_distributed
from .engine import EpochState
from .errors import TrainingDiverged

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager: the first SIGTERM/SIGINT asks the run to stop after its current step or
    test batch (it then saves, unless the epoch's training is saved already, and exits); a second
    one aborts at once with KeyboardInterrupt.

    Outside the main thread signals cannot be caught, and the manager does nothing.
    """

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """True once a stop signal has arrived."""
        return self.received is not None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}")
        self.received = signal.Signals(signum)
        os.write(2, f"\n{self.received.name} received: stopping after this step or test batch, "
                    f"with a recovery checkpoint (send it again to abort without saving)\n"
                    .encode())


@dataclass
class _Pending:
    epoch: int
    step: int  # 1-based step of the epoch
    lr: float
    finite: torch.Tensor  # bool on the training device, read at the next check


@dataclass
class StepGuard:
    """Decides after each step whether to check, save or stop, so that the training loop syncs
    with the device only every `check_every` steps (1 on CPU, where it is free).

    A check reads the pending loss flags (raising TrainingDiverged at the first non-finite loss)
    and, under torchrun, agrees on both with the other processes, so they all stop, save or raise
    at the same step. `save` is called with the epoch state every `save_every` global steps
    (except an epoch's last step, which the epoch-end checkpoint covers) and before stopping.
    """

    signals: StopSignals
    save: Callable[[EpochState], None]
    hint: Callable[[], str]  # advice appended to the divergence message
    check_every: int = 1
    save_every: int | None = None
    stop_after_epoch: bool = False  # a stop signal arrived during the epoch's last step
    _pending: list[_Pending] = field(default_factory=list)

    def __call__(self, state: EpochState, loss: torch.Tensor, lr: float) -> bool:
        """The engine's `after_step`: True means stop now (after saving)."""
        self._pending.append(_Pending(state.epoch, state.step, lr, torch.isfinite(loss).all()))
        global_step = state.epoch * state.steps + state.step
        save_now = bool(self.save_every) and global_step % self.save_every == 0 and not state.done
        local_stop = self.signals.requested and not is_distributed()
        if not (save_now or local_stop or state.done or len(self._pending) >= self.check_every):
            return False
        stop = self.check()
        if state.done:
            self.stop_after_epoch = stop
            return False
        if save_now or stop:
            self.save(state)
        return stop

    def check(self) -> bool:
        """Raise TrainingDiverged if any pending loss was non-finite; return whether to stop."""
        pending, self._pending = self._pending, []
        flags = torch.stack([p.finite for p in pending]).cpu() if pending else torch.ones(0)
        bad = (~flags.bool()).nonzero()
        first_bad = int(bad[0]) if len(bad) else math.inf
        stop = float(self.signals.requested)
        if is_distributed():  # agree: the earliest bad step anywhere, a stop anywhere
            shared = all_reduce_max(torch.tensor([-first_bad, stop], dtype=torch.float64))
            first_bad, stop = -shared[0].item(), shared[1].item()
        if first_bad != math.inf:
            p = pending[int(first_bad)]
            raise TrainingDiverged(f"training diverged: non-finite loss at epoch {p.epoch + 1} "
                                   f"step {p.step} (lr {p.lr:.4g}); {self.hint()}")
        return bool(stop)
