"""The GPU training loop waits for the device only where it means to (`tests/syncs.py` counts).

The loop runs on the `meta` device standing in for a GPU, fed by the device-resident data path
(`--loader device`), guarded as on a GPU (a loss check every `CUDA_CHECK_EVERY` steps). Intended
waits: the guard's check of the pending loss flags, and the epoch's totals read once at its end.
"""
from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from torch import nn

import models
from tests.syncs import HostSyncs
from training.data import ResumableSampler
from training.device_loader import CropFlipRotate, DeviceLoader, TensorImages
from training.engine import EpochState, evaluate, train_one_epoch
from training.guard import StepGuard, StopSignals
from training.schedule import WarmupMultiStepLR
from training.trainer import CUDA_CHECK_EVERY

pytestmark = pytest.mark.usefixtures("one_thread")
META = torch.device("meta")
STEPS, BATCH = 25, 4


@pytest.fixture
def no_autocast(monkeypatch):
    """meta has no autocast; LastBN opens one (disabled) to keep float32, which changes nothing
    else: the loop runs without --amp."""
    monkeypatch.setattr(torch, "autocast", lambda *args, **kwargs: nullcontext())


def _split(n: int, augment: CropFlipRotate | None) -> TensorImages:
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    return TensorImages(images, torch.arange(n) % 10, [0.5] * 3, [0.25] * 3,
                        [str(i) for i in range(10)], augment).to(META)


def _model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    net = models.create_model("squeezenet_cbn", 10, "cifar", width=0.25).to(META)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    models.attach_weight_mean(optimizer, net, models.centring_rule("cifar"))
    return net, optimizer


def test_training_steps_sync_only_at_the_loss_checks_and_the_epoch_end(no_autocast):
    data = _split(STEPS * BATCH, CropFlipRotate())
    sampler = ResumableSampler(data, BATCH, num_replicas=1, rank=0, shuffle=True, seed=0)
    sampler.set_epoch(0)
    loader = DeviceLoader(data, BATCH, sampler, seed=0, drop_last=True)
    net, optimizer = _model_and_optimizer()
    scheduler = WarmupMultiStepLR(optimizer, STEPS, 1, [2], 0.1)
    guard = StepGuard(StopSignals(), save=lambda state: None, hint=lambda: "",
                      check_every=CUDA_CHECK_EVERY)
    counter = HostSyncs()
    counter.step = 1

    def after_step(state: EpochState, loss: torch.Tensor, lr: float) -> bool:
        stop = guard(state, loss, lr)  # its check belongs to this step
        counter.step = state.step + 1
        return stop

    with counter:
        train_one_epoch(net, nn.CrossEntropyLoss(), optimizer, scheduler, loader, META,
                        EpochState(0, STEPS), after_step=after_step)
    # steps 10 and 20: the guard's check; 25: its check at the epoch's end; then the totals
    assert counter.syncs() == {10: 1, 20: 1, STEPS: 1, STEPS + 1: 1}
    assert counter.reads == counter.syncs()
    assert counter.non_blocking == {step: 1 for step in range(1, STEPS + 1)}  # packed params


def test_evaluation_batches_sync_only_at_the_end(no_autocast):
    data = _split(6 * BATCH, None)
    loader = DeviceLoader(data, BATCH, range(6 * BATCH))
    net, _ = _model_and_optimizer()
    counter = HostSyncs()
    with counter:
        evaluate(net, nn.CrossEntropyLoss(), loader, META,
                 check_stop=lambda: setattr(counter, "step", counter.step + 1))
    assert counter.syncs() == {6: 1}  # the totals, read once after the sixth batch
    assert counter.non_blocking == {step: 1 for step in range(6)}  # each batch's indices


def test_counter_sees_the_calls_that_used_to_sync():
    """What the loop did before: `new_tensor(n)`, one blocking copy per parameter, `.item()`."""
    totals = torch.zeros(3, dtype=torch.float64, device=META)
    counter = HostSyncs()
    with counter:
        totals.new_tensor(4)
        torch.arange(4).to(META)
        torch.arange(4).to(META, non_blocking=True)
        totals.sum().item()
        bool(totals.sum() > 0)
        totals.cpu()
    assert (counter.blocking, counter.non_blocking, counter.reads) == ({0: 2}, {0: 1}, {0: 3})
