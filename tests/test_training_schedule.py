"""Learning-rate schedule: per-iteration warm-up, milestones, state round trip."""
import io

import pytest
import torch

from training.schedule import WarmupMultiStepLR, lr_factor


def test_warmup_is_linear_per_iteration():
    # 10 steps per epoch, 2 warm-up epochs: step k of the first 20 uses (k + 1) / 20
    assert lr_factor(0, 10, 2, [5, 8], 0.1) == pytest.approx(1 / 20)
    assert lr_factor(9, 10, 2, [5, 8], 0.1) == pytest.approx(10 / 20)
    assert lr_factor(19, 10, 2, [5, 8], 0.1) == 1.0
    assert lr_factor(20, 10, 2, [5, 8], 0.1) == 1.0


def test_no_warmup():
    assert lr_factor(0, 10, 0, [5], 0.1) == 1.0


def test_milestone_m_decays_from_epoch_m_plus_1():
    # epoch e (counted from 1) runs steps (e - 1) * 10 .. e * 10 - 1
    assert lr_factor(49, 10, 2, [5, 8], 0.1) == 1.0  # last step of epoch 5
    assert lr_factor(50, 10, 2, [5, 8], 0.1) == pytest.approx(0.1)  # first step of epoch 6
    assert lr_factor(79, 10, 2, [5, 8], 0.1) == pytest.approx(0.1)
    assert lr_factor(80, 10, 2, [5, 8], 0.1) == pytest.approx(0.01)


def test_paper_cifar_recipe():
    steps = 50_000 // 256  # full batches per CIFAR epoch at -b 256

    def lr(epoch: int, step: int = 0) -> float:  # epoch counted from 1, as in log.csv
        return 0.1 * lr_factor((epoch - 1) * steps + step, steps, 2, [80, 110, 135], 0.1)

    assert lr(1) == pytest.approx(0.1 / (2 * steps))
    assert lr(2, steps - 1) == pytest.approx(0.1)
    assert lr(80, steps - 1) == pytest.approx(0.1)
    assert lr(81) == pytest.approx(0.01)
    assert lr(111) == pytest.approx(0.001)
    assert lr(136) == pytest.approx(0.0001)
    assert lr(150, steps - 1) == pytest.approx(0.0001)


def _optimizer() -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)


def _run(optimizer: torch.optim.Optimizer, scheduler: WarmupMultiStepLR, n: int) -> list[float]:
    lrs = []
    for _ in range(n):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_scheduler_sets_the_lr_of_every_step():
    opt = _optimizer()
    lrs = _run(opt, WarmupMultiStepLR(opt, steps_per_epoch=4, warm_epochs=1, milestones=[2]), 12)
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1] + [0.1] * 4 + [0.01] * 4)


def test_state_dict_round_trips_through_a_weights_only_file():
    opt = _optimizer()
    sched = WarmupMultiStepLR(opt, steps_per_epoch=4, warm_epochs=1, milestones=[2])
    _run(opt, sched, 3)
    buffer = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    opt2 = _optimizer()
    sched2 = WarmupMultiStepLR(opt2, steps_per_epoch=1, warm_epochs=0, milestones=[100])
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    assert sched2.state_dict() == sched.state_dict()
    assert _run(opt2, sched2, 9) == _run(opt, sched, 9)
