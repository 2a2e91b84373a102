"""One training epoch and one evaluation, shared by every dataset and device set-up."""
from __future__ import annotations

import itertools
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Iterator

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader

from .distributed import all_reduce_sum


def correct_topk(output: torch.Tensor, target: torch.Tensor, ks: Iterable[int]
                 ) -> list[torch.Tensor]:
    """For each k, how many rows of `output` rank `target` among their k highest logits."""
    ks = list(ks)
    top = output.topk(min(max(ks), output.shape[1]), dim=1).indices
    hits = top.eq(target[:, None])
    return [hits[:, :k].sum() for k in ks]


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str | None) -> ContextManager[object]:
    """Mixed precision for `--amp bf16|fp16` (None: no autocast context at all)."""
    if amp is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])


class _NoBar:
    """What the loops call on a progress bar, doing nothing (progress off, or no tqdm)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: object) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, **kwargs: Any) -> Any:
    """A tqdm bar (`kwargs` are tqdm's) when `enabled` and tqdm is installed, else a `_NoBar`:
    training needs no tqdm (the GPU machine's image has none)."""
    if enabled:
        try:
            from tqdm import tqdm
        except ModuleNotFoundError:
            return _NoBar()
        return tqdm(leave=False, dynamic_ncols=True, **kwargs)
    return _NoBar()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch_to(images: torch.Tensor, target: torch.Tensor, device: torch.device,
              channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = images.to(device, non_blocking=True, memory_format=fmt)
    return images, target.to(device, non_blocking=True)


def shutdown_workers(loader: Iterable, iterator: Iterator | None = None) -> None:
    """Stop the worker processes of `loader` (or of its `iterator`), persistent ones included.

    torch has no public close(): the multi-process iterator's `_shutdown_workers` is what it calls
    itself at the end of an epoch; a DataLoader with persistent workers keeps that iterator in
    `_iterator` and would reuse it.
    """
    iterator = iterator if iterator is not None else getattr(loader, "_iterator", None)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    if getattr(loader, "_iterator", None) is iterator:
        loader._iterator = None


@contextmanager
def loader_batches(loader: Iterable) -> Iterator[Iterator[Any]]:
    """Iterate `loader`; shut its worker processes down when the loop ends, except persistent
    workers after a normal end (they serve the next epoch; see `shutdown_workers`).

    A loop left by an exception (a bad sample, a divergence, an abort) would otherwise keep the
    iterator alive in the traceback, and at interpreter exit multiprocessing would wait forever
    for workers that ignore SIGTERM (see `data.build_loaders`).
    """
    iterator = iter(loader)
    try:
        yield iterator
    except BaseException:
        shutdown_workers(loader, iterator)
        raise
    if not getattr(loader, "persistent_workers", False):
        shutdown_workers(loader, iterator)


@dataclass
class EpochState:
    """How far an epoch has got: what a checkpoint needs to continue it mid-way."""

    epoch: int  # 0-based
    steps: int  # optimizer steps in the full epoch
    step: int = 0  # steps done
    totals: torch.Tensor | None = None  # this process's sums: loss * n, correct top-1, n
    seconds: float = 0.0  # this process's training time so far

    @property
    def done(self) -> bool:
        """True once every step of the epoch has run."""
        return self.step >= self.steps


# Called after every step with the epoch's state, the step's loss and lr; True stops the epoch.
AfterStep = Callable[[EpochState, torch.Tensor, float], bool]


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: Optimizer,
                    scheduler: LRScheduler, loader: Iterable, device: torch.device,
                    state: EpochState, *, after_step: AfterStep | None = None,
                    amp: str | None = None,
                    scaler: torch.amp.GradScaler | None = None, channels_last: bool = False,
                    progress: bool = False, desc: str = "train") -> dict[str, float]:
    """Run the rest of `state`'s epoch over `loader`: forward, backward, step (the optimizer's
    step hooks run here: weight mean, `models.attach_weight_mean`), per-iteration lr step, then
    `after_step` (which may stop the epoch early).

    With a `scaler` (float16) the loss is scaled before backward and a step whose gradients are
    not finite is skipped, as GradScaler does; the loss itself stays what `after_step` checks.

    `state` is updated as steps complete. Returns loss and top-1 (%) over all processes, the last
    step's lr, the images of all processes and this process's seconds.
    """
    model.train()
    if state.totals is None:
        state.totals = torch.zeros(3, dtype=torch.float64, device=device)
    bar = progress_bar(progress, total=state.steps, initial=state.step, desc=desc)
    start = time.perf_counter() - state.seconds
    lr = optimizer.param_groups[0]["lr"]
    with loader_batches(loader) as batches:
        for images, target in itertools.islice(batches, state.steps - state.step):
            images, target = _batch_to(images, target, device, channels_last)
            with autocast(device, amp):
                output = model(images)
                loss = criterion(output, target)
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            lr = optimizer.param_groups[0]["lr"]
            with warnings.catch_warnings():
                # A step the fp16 scaler skipped still advances the per-iteration schedule.
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step")
                scheduler.step()
            n = target.shape[0]
            correct = correct_topk(output, target, [1])[0]
            # new_full fills on the device; new_tensor(n) would be a blocking host-to-device copy
            state.totals += torch.stack([loss.detach().double() * n, correct.double(),
                                         state.totals.new_full((), n)])
            state.step += 1
            state.seconds = time.perf_counter() - start
            bar.update()
            if progress and state.step % 10 == 1:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.4g}")
            if after_step is not None and after_step(state, loss.detach(), lr):
                break
    _synchronize(device)
    state.seconds = time.perf_counter() - start
    bar.close()
    loss_sum, correct, count = all_reduce_sum(state.totals.clone()).tolist()
    count = max(count, 1)
    return {"loss": loss_sum / count, "acc1": 100 * correct / count, "lr": lr, "images": count,
            "seconds": state.seconds}


@torch.no_grad()
def evaluate(model: nn.Module, criterion: nn.Module, loader: DataLoader, device: torch.device, *,
             amp: str | None = None, channels_last: bool = False, progress: bool = False,
             max_batches: int | None = None, check_stop: Callable[[], None] | None = None,
             desc: str = "test") -> dict[str, float]:
    """Loss, top-1 and top-5 (%) of `model` in eval mode over `loader` (its first `max_batches`
    batches when given), summed over processes. `check_stop` is called after every batch and
    may raise to abandon the evaluation (a stop signal)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss * n, top-1, top-5, n
    batches_total = min(len(loader), max_batches or len(loader))
    bar = progress_bar(progress, total=batches_total, desc=desc)
    with loader_batches(loader) as batches:
        for images, target in itertools.islice(batches, batches_total):
            images, target = _batch_to(images, target, device, channels_last)
            with autocast(device, amp):
                output = model(images)
                loss = criterion(output, target)
            n = target.shape[0]
            top1, top5 = correct_topk(output, target, [1, 5])
            totals += torch.stack([loss.double() * n, top1.double(), top5.double(),
                                   totals.new_full((), n)])
            bar.update()
            if check_stop is not None:
                check_stop()
    bar.close()
    loss_sum, top1, top5, count = all_reduce_sum(totals).tolist()
    count = max(count, 1)
    return {"loss": loss_sum / count, "acc1": 100 * top1 / count, "acc5": 100 * top5 / count}
