"""The synced last BN in a real (gloo, CPU) process group equals BatchNorm1d on the whole batch,
and its forward reads no value back to the host (`.item()` would sync with a GPU)."""
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.syncs import HostSyncs
from training.distributed import AutocastReplica, Runtime, SyncedBatchNorm1d, wrap_model

WORLD = 2


def _check_synced_bn(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # every process draws the same global batch, then takes its shard
        x, weights = torch.randn(8, 5) * 3 + 1, torch.randn(8, 5)
        mine = slice(4 * rank, 4 * rank + 4)

        for momentum in (0.1, None):  # None: BatchNorm's cumulative average
            synced = SyncedBatchNorm1d(5, affine=False, momentum=momentum)
            reference = nn.BatchNorm1d(5, affine=False, momentum=momentum)
            x_local = x[mine].clone().requires_grad_()
            with HostSyncs(device="cpu") as counter:  # gloo: the CPU plays the GPU
                y_local = synced(x_local)
                y_local = synced(x_local)  # twice: the running statistics' second update
            assert not counter.syncs(), counter.syncs()
            (y_local * weights[mine]).sum().backward()
            x_full = x.clone().requires_grad_()
            reference(x_full)
            y_full = reference(x_full)
            (y_full * weights).sum().backward()

            torch.testing.assert_close(y_local, y_full[mine])
            torch.testing.assert_close(x_local.grad, x_full.grad[mine])
            assert synced.state_dict().keys() == reference.state_dict().keys()
            for key, value in reference.state_dict().items():
                torch.testing.assert_close(synced.state_dict()[key], value)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_synced_last_bn_matches_full_batch_statistics(tmp_path):
    mp.spawn(_check_synced_bn, args=(str(tmp_path / "init"),), nprocs=WORLD)


def test_synced_last_bn_without_process_group_is_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    torch.testing.assert_close(SyncedBatchNorm1d(4, affine=False)(x),
                               nn.BatchNorm1d(4, affine=False)(x))


class _AutocastProbe(nn.Module):
    """Records the autocast state its forward runs under."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                     nn.functional.linear(x, torch.ones(2, 2)).dtype)
        return x


def test_autocast_replica_keeps_the_runs_dtype_in_a_replica_thread():
    """DataParallel runs each replica in a thread, where the caller's autocast dtype (thread-local)
    is not set: the replica must open autocast with the run's dtype itself."""
    probe = _AutocastProbe()
    seen = {}

    def replica_thread(module: nn.Module, name: str) -> None:
        torch.set_autocast_dtype("cpu", torch.float16)  # this thread's default, as CUDA's is
        with torch.autocast("cpu", enabled=True):  # what DataParallel's threads do: no dtype
            module(torch.ones(1, 2))
        seen[name] = probe.seen

    with torch.autocast("cpu", dtype=torch.bfloat16):  # the run's --amp bf16, in the main thread
        for module, name in ((probe, "bare"), (AutocastReplica(probe, "cpu", torch.bfloat16),
                                               "wrapped")):
            thread = threading.Thread(target=replica_thread, args=(module, name))
            thread.start()
            thread.join()
    assert seen["wrapped"] == (True, torch.bfloat16, torch.bfloat16)
    assert seen["bare"] == (True, torch.float16, torch.float16)  # what DataParallel did


def test_wrap_model_puts_autocast_inside_dataparallel_only_with_amp():
    rt = Runtime(torch.device("cpu"), device_ids=[0, 1])  # without CUDA DataParallel passes through
    net = nn.Linear(2, 2)
    wrapped = wrap_model(net, rt, torch.bfloat16)
    assert isinstance(wrapped, nn.DataParallel) and isinstance(wrapped.module, AutocastReplica)
    assert wrapped.module.net is net and wrapped.module.dtype == torch.bfloat16
    assert wrap_model(net, rt).module is net
