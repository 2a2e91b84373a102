"""Learning-rate schedule of the paper's recipes, stepped once per optimizer step."""
from __future__ import annotations

from bisect import bisect_right
from typing import Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def lr_factor(step: int, steps_per_epoch: int, warm_epochs: int, milestones: Sequence[int],
              gamma: float) -> float:
    """Factor of the base lr at optimizer step `step` (0-based, counted over the whole run).

    Linear warm-up over the first `warm_epochs` epochs, step k using (k + 1) / warm-up steps; then
    the lr is multiplied by `gamma` once per milestone m at or below the epoch (0-based), i.e. from
    the (m + 1)-th epoch on, as `torch.optim.lr_scheduler.MultiStepLR` stepped per epoch.
    """
    warm_steps = warm_epochs * steps_per_epoch
    if step < warm_steps:
        return (step + 1) / warm_steps
    return gamma ** bisect_right(list(milestones), step // steps_per_epoch)


class WarmupMultiStepLR(LRScheduler):
    """Per-iteration linear warm-up then multi-step decay; call `step()` after every optimizer step.

    Its state_dict holds the step count and the schedule itself, so resuming needs no flags.
    """

    def __init__(self, optimizer: Optimizer, steps_per_epoch: int, warm_epochs: int,
                 milestones: Sequence[int], gamma: float = 0.1, last_epoch: int = -1) -> None:
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        self.steps_per_epoch = steps_per_epoch
        self.warm_epochs = warm_epochs
        self.milestones = list(milestones)
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """The lr of every param group at the current step (`self.last_epoch` counts steps)."""
        factor = lr_factor(self.last_epoch, self.steps_per_epoch, self.warm_epochs,
                           self.milestones, self.gamma)
        return [base_lr * factor for base_lr in self.base_lrs]

    def set_steps_per_epoch(self, steps_per_epoch: int) -> None:
        """Continue the same schedule (it is defined in epochs) with `steps_per_epoch` optimizer
        steps per epoch from now on, e.g. after resuming with another batch size; only at an epoch
        boundary. Sets the optimizer's lr to the schedule's value at this point."""
        epochs, rest = divmod(self.last_epoch, self.steps_per_epoch)
        if rest:
            raise ValueError(f"the schedule is at step {rest} of an epoch of "
                             f"{self.steps_per_epoch}: steps per epoch change only at epoch ends")
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        self.steps_per_epoch, self.last_epoch = steps_per_epoch, epochs * steps_per_epoch
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr
