"""The synced last BN in a real (gloo, CPU) process group equals BatchNorm1d on the whole batch."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from training.distributed import SyncedBatchNorm1d

WORLD = 2


def _check_synced_bn(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # every process draws the same global batch, then takes its shard
        x, weights = torch.randn(8, 5) * 3 + 1, torch.randn(8, 5)
        mine = slice(4 * rank, 4 * rank + 4)

        synced, reference = SyncedBatchNorm1d(5, affine=False), nn.BatchNorm1d(5, affine=False)
        x_local = x[mine].clone().requires_grad_()
        y_local = synced(x_local)
        (y_local * weights[mine]).sum().backward()
        x_full = x.clone().requires_grad_()
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
